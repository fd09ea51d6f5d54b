"""The interface between the attention core (attention.py) and the attention forms' rules
(``dynconvert/sites/<form>_find.py``): what the core found about one call (:class:`Evidence`),
what a rule hands back (:class:`Finding`), and the helpers that write unit maps.

Example:
    >>> unit_map("attn.qkv", "rows", 2, [torch.tensor([[0, 1], [2, 3]])]).indices(1)
    [2, 3]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dynconvert.analysis.calls import AttentionCall
from dynconvert.analysis.graph import OpNode
from dynconvert.analysis.headlocal import InputLayout
from dynconvert.analysis.headout import OutGate
from dynconvert.analysis.layout import as_parts
from dynconvert.sites import AttentionPart
from dynconvert.sites.units import UnitMap


@dataclass
class Evidence:
    """What the core found about one attention call: what the forms' rules read.

    Example:
        >>> ev = Evidence(None, None, [], units=2, stride=1, projections={"qkv"})
        >>> ev.per_unit(torch.arange(8).reshape(4, 2)).tolist()  # 4 heads in 2 units
        [[0, 1, 2, 3], [4, 5, 6, 7]]
    """

    call: AttentionCall
    layout: InputLayout  # the q/k/v sources and what stands between them and the attention
    gates: list[OutGate]  # Linears multiplied into the attention output (headout.py)
    units: int  # routed units: heads, or key/value heads with their query heads
    stride: int  # projection rows per attention key (streams.kv_stride)
    projections: set[str]  # fqns of the q, k and v Linears

    def per_unit(self, table: torch.Tensor) -> torch.Tensor:
        """A (rows, d) index table of a head-ordered source as (units, size)."""
        return per_unit(table, self.units)

    def unit_map(self, linear: str, tables: list[torch.Tensor]) -> UnitMap:
        """The row map of ``linear`` from one (units, size) table per part."""
        return unit_map(linear, "rows", self.units, tables)


@dataclass
class Finding:
    """One form found in an attention call: its part, and what the core does for it."""

    part: AttentionPart
    # More input projections sliced with the heads: (the Linear call, its rows per unit).
    inputs: list[tuple[OpNode, torch.Tensor]] = field(default_factory=list)
    full_width: list[str] = field(default_factory=list)  # projections left unsliced
    # Projections that also compute rows of no head (a fused input projection): those rows run
    # in full beside the active heads' (runtime/shared_in.py), so the site can run sliced.
    shared: list[str] = field(default_factory=list)
    unverified: bool = False  # its sliced call is checked once at convert (verify.py)


def unit_map(
    linear: str, axis: str, units: int, tables: list[torch.Tensor], keep: list[int] | None = None
) -> UnitMap:
    """A UnitMap from one (units, size) index table per part: regular parts where every table
    is ``base + u * stride + j``, else the explicit indices.

    Example:
        >>> unit_map("qkv", "rows", 2, [torch.tensor([[0, 1], [2, 3]])]).parts
        [(0, 2, 2)]
    """
    parts = [as_parts(t) for t in tables]
    keep = list(keep or [])
    if any(p is None for p in parts):
        explicit = [t.tolist() for t in tables]
        return UnitMap(linear=linear, axis=axis, units=units, explicit=explicit, keep=keep)
    return UnitMap(linear=linear, axis=axis, units=units, parts=parts, keep=keep)


def per_unit(table: torch.Tensor, units: int) -> torch.Tensor:
    """A source's (rows, d) index table as (units, size): a query or output table of H rows
    joins the g heads of each unit; a key/value table repeated to H rows keeps one copy (the
    replay checked that the copies hold the same rows).

    Example:
        >>> per_unit(torch.tensor([[0, 1], [0, 1], [2, 3], [2, 3]]), 2).tolist()  # repeated k/v
        [[0, 1], [2, 3]]
    """
    rows = table.shape[0]
    if rows == units:
        return table
    grouped = table.reshape(units, rows // units, -1)  # (units, g, d)
    if bool((grouped == grouped[:, :1]).all()):  # a repeated key/value head
        return grouped[:, 0]
    return grouped.reshape(units, -1)
