"""A fused input projection: one Linear computes the q, k and v rows of every head and other
rows besides (Flux 2's single blocks: ``to_qkv_mlp_proj`` holds q, k, v, then the MLP's gate
and value halves), which the model splits off along the channels.

The heads' rows are the site's input map as for any fused qkv; the other rows are no head's.
When an MLP site reads them (``analysis/mlp.py`` claims the rows the attention leaves), the
Linear's rows are sliced by the active heads and the active channel groups together, as a
parallel block's out-projection is by columns (``runtime/shared_in.py``); rows that no site
routes are computed in full. The part adds no MACs: the other rows are the MLP site's, or part
of what routing never changes.

Example:
    >>> part = FusedInput("attn.to_qkv_mlp_proj", rows=288, others=[96, 288])
    >>> part.kind, part.others
    ('fused_in', [96, 288])
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dynconvert.sites import AttentionPart, register_part


@register_part("fused_in")
@dataclass
class FusedInput(AttentionPart):
    """The input projection that computes rows of no head beside the heads' q, k and v."""

    linear: str  # fqn of the fused Linear
    rows: int  # its output rows, the heads' and the others
    others: list[int] = field(default_factory=list)  # [start, stop) of the rows of no head
