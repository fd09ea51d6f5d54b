"""A partial site: a norm across all heads (qk-norm over the whole width, or a norm after
key/value compression) stops the Linears feeding it from being sliced. They and the norm run in
full, then the norm module's output is cut to the active heads (``cut_maps``, keyed by the
module's fqn: ``partial_run.py`` hooks it). Saved: the attention matmuls, the other projections
and the out-projection of the inactive heads.

Example:
    >>> from dynconvert.sites.units import UnitMap
    >>> cut = PartialCut([UnitMap("attn.q_norm", "rows", 2, [(0, 8, 8)])], ["attn.to_q"])
    >>> [m.linear for m in cut.head_maps()]
    ['attn.q_norm']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dynconvert.sites import AttentionPart, register_part
from dynconvert.sites.units import UnitMap


@register_part("partial")
@dataclass
class PartialCut(AttentionPart):
    """Projections left unsliced, and the norms whose outputs are cut to the active heads."""

    cut_maps: list[UnitMap]  # output channels per unit of each cut module (a norm)
    unsliced: list[str]  # fqns of the Linears that run at full width

    V2 = {"cut_maps": ("cut_maps", []), "unsliced": ("unsliced", [])}

    def fixed_macs(self, site: Any, seen: dict[str, int]) -> int:
        """The unsliced projections at full width: no routing saves them."""
        h, hk, dq, dv = site.heads, site.units, site.head_dim, site.v_head_dim
        total = 0
        for s in site.every_stream():
            if s.q in self.unsliced:
                total += seen.get(s.q, s.tokens_q) * s.q_in * h * dq
            m = seen.get(s.k, s.tokens_kv)
            if s.k in self.unsliced:  # a fused key/value projection holds the value rows too
                total += m * s.kv_in * hk * (dq + (dv if s.v == s.k else 0))
            if s.v in self.unsliced and s.v != s.k:  # cut after key/value compression
                total += seen.get(s.v, m) * (s.v_in or s.kv_in) * hk * dv
        return total

    def head_maps(self) -> list[UnitMap]:
        """The cut modules' output channels, cut with the heads on the fast path."""
        return self.cut_maps

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PartialCut:
        """The part from its dict (the maps as UnitMaps again)."""
        return cls([UnitMap.from_dict(m) for m in data["cut_maps"]], list(data["unsliced"]))
