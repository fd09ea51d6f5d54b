"""Gated attention: a Linear whose output, through elementwise ops, scales the attention output
per channel or per head before the out-projection.

Its rows belong to their head: ``gate_find.py`` adds them to the site's input maps, so the fast
path slices them as it slices the value rows (no runtime hook).

Example:
    >>> gate = Gate("attn.to_gate", in_features=32, rows=32)
    >>> gate.kind, Gate.V2["gate_rows"]
    ('gate', ('rows', 0))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dynconvert.sites import AttentionPart, register_part


@register_part("gate")
@dataclass
class Gate(AttentionPart):
    """The gate projection of a gated attention."""

    linear: str  # fqn of the gate Linear
    in_features: int  # its input features
    rows: int  # its output rows, every head's

    V2 = {"gate": ("linear", ""), "gate_in": ("in_features", 0), "gate_rows": ("rows", 0)}

    def added_macs(self, site: Any, seen: dict[str, int]) -> int:
        """The gate projection on the first stream's query tokens (``tokens x in x rows``),
        routed with the heads it serves."""
        return seen.get(self.linear, site.query_tokens(seen)) * self.in_features * self.rows
