"""The rules of a fused input projection, on both sides: the attention's (the q/k/v Linear also
computes one block of rows of no head, split off along the channels) and the MLP's (its fc1 is
that block: one piece of the fused Linear's output).

The model splits the fused output by sizes it computes from its attributes (Flux 2:
``3 * inner_dim`` and ``mlp_hidden_dim * mlp_mult_factor``); the graph holds them as
constants. So the sliced call is checked once at convert (verify.py) with the attributes
lowered: the heads' by the attention site (registry.py), the hidden width's by the MLP site
(:func:`width_attrs`).

Example:
    >>> from dynconvert.analysis import analyze
    >>> from dynconvert.testing import PATTERN_MODELS
    >>> plan = analyze(*PATTERN_MODELS["fused-parallel"]())
    >>> attn = [s for s in plan.attention if "fused_in" in s.parts][0]
    >>> mlp = [s for s in plan.mlp if s.fc1 == [attn.parts["fused_in"].linear]][0]
    >>> attn.parts["fused_in"].others == [mlp.fc1_offset, mlp.fc1_offset + 2 * mlp.hidden]
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynconvert.analysis.evidence import Evidence, Finding
from dynconvert.analysis.graph import OpNode
from dynconvert.analysis.layout import ChainError
from dynconvert.analysis.mlp_region import SPLIT_OPS, Region, hidden_region
from dynconvert.sites import register_finder
from dynconvert.sites.fused_in import FusedInput


@register_finder("fused_in")
def find_fused_in(ev: Evidence) -> Finding | None:
    """The fused part when a q/k/v Linear computes more rows than the heads take.

    Raises:
        ChainError: the other rows lie between the heads' rows, or reach anything but a split
            of the output along its channels.
    """
    by_linear: dict[str, tuple[OpNode, set[int]]] = {}
    for role in "qkv":
        for s in ev.layout.sources[role]:
            _, rows = by_linear.setdefault(s.node.linear, (s.node, set()))
            rows.update(int(r) for r in s.table.reshape(-1))
    fused = [(n, rows) for n, rows in by_linear.values() if len(rows) < (n.shape or (0,))[-1]]
    if not fused:
        return None
    if len(fused) > 1:
        raise ChainError("several q/k/v projections also compute channels that are not heads")
    node, rows = fused[0]
    width = node.shape[-1]
    others = sorted(set(range(width)) - rows)
    if others != list(range(others[0], others[-1] + 1)) or others[0] not in (0, len(rows)):
        raise ChainError(
            f"{node.linear} computes channels that are not heads between the heads' rows"
        )
    if not all(_channel_cut(u) for u in node.real_users):
        raise ChainError(
            f"{node.linear} also computes channels that are not heads, and its output is used "
            "otherwise than split along the channels"
        )
    part = FusedInput(node.linear, width, [others[0], others[-1] + 1])
    return Finding(part, shared=[node.linear], unverified=True)


def _channel_cut(n: OpNode) -> bool:
    """Whether ``n`` cuts its input along the last dim (a split, chunk, slice or narrow)."""
    if n.kind != "shape" or n.op not in (*SPLIT_OPS, "slice", "narrow"):
        return False
    src = n.args[0] if n.args and isinstance(n.args[0], OpNode) else None
    rank = len(src.shape or ()) if src is not None else 0
    dim = n.arg(2, "dim", 0) if n.op in SPLIT_OPS else n.arg(1, "dim", 0)
    return rank > 0 and isinstance(dim, int) and dim % rank == rank - 1


@dataclass
class FusedPiece:
    """An MLP's fc1 that is one piece of a fused input projection's output."""

    linear: OpNode  # the fused Linear
    piece: OpNode  # its output's piece the MLP reads: (B, N, rows)
    offset: int  # the piece's first row in the Linear
    region: Region  # the MLP's hidden region, from the piece to fc2


def fused_piece(
    fc2: OpNode, start: OpNode | None, region: Region, shared: dict[str, tuple[int, int]]
) -> FusedPiece | None:
    """The piece of a fused Linear an MLP reads, when the walk from fc2 (``region``) reached
    only that Linear through a cut of its output into rows the attention left (``shared``:
    fused Linear -> [start, stop) of those rows); None otherwise."""
    if len(region.sources) != 1 or region.sources[0].linear not in shared:
        return None
    linear = region.sources[0]
    lo, hi = shared[linear.linear]
    for n in region.nodes:
        rows = _piece_rows(n, linear)
        if rows is None:
            continue
        if not lo <= rows[0] < rows[1] <= hi:
            return None  # the MLP reads rows of the heads
        inner = hidden_region(fc2, start, stops={id(n)})
        if inner is None or [id(s) for s in inner.sources] != [id(n)]:
            return None
        return FusedPiece(linear, n, rows[0], inner)
    return None


def _piece_rows(n: OpNode, linear: OpNode) -> tuple[int, int] | None:
    """[start, stop) of ``linear``'s rows that ``n`` takes: one output of a split of the
    Linear's output along its channels, or a slice / narrow of it; None for anything else."""
    width = (linear.shape or (0,))[-1]
    src = n.args[0] if n.args else None
    if n.op == "getitem" and isinstance(src, OpNode) and src.args and src.args[0] is linear:
        if src.op not in SPLIT_OPS or not _channel_cut(src):
            return None
        i = n.arg(1)
        if src.op == "chunk":
            chunks = src.arg(1, "chunks")
            sizes = [-(-width // chunks)] * chunks
        else:
            sizes = src.arg(1, "split_size_or_sections")
            sizes = [sizes] * -(-width // sizes) if isinstance(sizes, int) else list(sizes)
        if not isinstance(i, int) or not 0 <= i < len(sizes):
            return None
        start = sum(sizes[:i])
        return start, min(width, start + sizes[i])
    if n.op in ("slice", "narrow") and src is linear and _channel_cut(n):
        a, b = n.arg(2, "start", 0), n.arg(3, "end" if n.op == "slice" else "length", None)
        a = 0 if a is None else a
        b = width if b is None else (a + b if n.op == "narrow" else min(b, width))
        return (a, b) if isinstance(a, int) and isinstance(b, int) else None
    return None


def width_attrs(module: torch.nn.Module, hidden: int) -> list[str]:
    """Integer attributes of ``module`` equal to the MLP's hidden width: the model may split the
    fused output by them, so a sliced call lowers them to the active groups' channels (verify.py
    checks the result once at convert).

    Example:
        >>> m = torch.nn.Module()
        >>> m.mlp_hidden_dim, m.heads = 96, 2
        >>> width_attrs(m, 96)
        ['mlp_hidden_dim']
    """
    out = []
    for attr, value in vars(module).items():
        if attr.startswith("_") or isinstance(value, bool) or not isinstance(value, int):
            continue
        if value == hidden:
            out.append(attr)
    return out
