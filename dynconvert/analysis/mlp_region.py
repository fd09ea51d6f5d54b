"""The hidden region of an MLP: the ops between its input projection(s) and fc2.

Walking back from fc2's input must reach one or two Linears (fc1, or the value and gate
projections of a gated MLP) through ops that act on each hidden channel on its own: only then
is cutting the hidden width into channel groups the same as zeroing those groups. A fused
value-and-gate fc1 is split (``chunk``, ``split``) or sliced into halves on the way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dynconvert.analysis.graph import OpNode
from dynconvert.analysis.layout import describe

SPLIT_OPS = ("chunk", "split", "split_with_sizes")  # a fused value/gate output cut in two
_MAX_REGION_OPS = 32  # an MLP has a handful of ops between fc1 and fc2; more: we left the MLP


@dataclass
class Region:
    """The ops between the input projection(s) and fc2."""

    sources: list[OpNode] = field(default_factory=list)  # fc1, or the value and gate Linears
    nodes: list[OpNode] = field(default_factory=list)  # every op between them and fc2
    split: OpNode | None = None  # the split of a fused value-and-gate fc1 output, if any
    halves: list[int] = field(default_factory=list)  # or its halves sliced apart: 0 first, 1 second
    width_reason: str = ""  # why the hidden width cannot be routed ("" when it can)


def hidden_region(
    fc2: OpNode, start: OpNode | None = None, stops: set[int] | None = None
) -> Region | None:
    """Walk back from fc2's input to the Linear(s) feeding it, or None when it is not an MLP.

    A depth-first walk over the tensor inputs of each op (parameters and constants are not
    followed). It stops at Linears, the sources, and gives up on an op that cannot lie inside
    an MLP (see :func:`_region_inputs`) or on a value whose width is not the hidden width.
    ``start`` is the MLP part of fc2's input when fc2 reads concat(attention, MLP hidden);
    ``stops`` are ids of nodes that are sources too (the MLP's piece of a fused projection).
    """
    start = start if start is not None else fc2.args[0]  # fc2's input: (B, N, hidden)
    if not isinstance(start, OpNode):
        return None
    hidden = start.shape[-1] if start.shape else -1
    region = Region()
    stack, seen = [start], set()
    while stack:
        n = stack.pop()
        if id(n) in seen:  # reached twice: x * x, or the two halves of one split
            continue
        seen.add(id(n))
        if n.kind == "linear" or id(n) in (stops or ()):
            region.sources.append(n)
            continue
        region.nodes.append(n)
        if len(region.nodes) > _MAX_REGION_OPS:
            return None
        # Between fc1 and fc2 every value is hidden wide (2 * hidden before a value/gate split);
        # any other width means the walk has left the MLP (for example into the block's input).
        # Ops that return several tensors (a split) have no single shape and pass.
        if n.shape is not None and n.shape[-1] not in (hidden, 2 * hidden):
            return None
        follow = _region_inputs(n, region)
        if follow is None:
            return None
        stack.extend(follow)
    if not 1 <= len(region.sources) <= 2:  # fc1, or the two Linears of a gated MLP
        return None
    return region


def _region_inputs(n: OpNode, region: Region) -> list[OpNode] | None:
    """The inputs of ``n`` the walk goes on with, or None when ``n`` cannot lie inside an MLP.

    A split of a fused value-and-gate projection is recorded in ``region.split``, a norm over the
    hidden channels in ``region.width_reason``.
    """
    tracked = [i for i in n.inputs if i.kind not in ("param", "const")]
    if n.kind in ("unary", "cast"):  # activation, dropout, dtype cast
        return tracked if len(tracked) == 1 else None
    if n.kind == "binary":
        # value * gate (two tensors), or one tensor with plain numbers (x * 0.5). Any other
        # operand (a parameter, a constant computed in the graph) ends the walk.
        numbers = [a for a in n.args if not isinstance(a, OpNode)]
        if len(tracked) == 2 or (len(tracked) == 1 and len(numbers) == len(n.args) - 1):
            return tracked
        return None
    if n.kind == "shape" and n.op == "getitem" and tracked and tracked[0].op in SPLIT_OPS:
        return tracked[:1]  # one half of a split fc1 output: go on with the split
    if n.kind == "shape" and n.op in ("getitem", "slice", "narrow") and len(tracked) == 1:
        # x[..., :h] and x[..., h:] of a fused fc1 (Flux 2's SwiGLU): a split written as two
        # slices. Any other indexing ends the walk.
        half = _channel_half(n, tracked[0].shape)
        if half is None:
            return None
        region.halves.append(half)
        return tracked
    if n.kind == "shape" and n.op in SPLIT_OPS:
        # A fused fc1 holding value and gate. Only a split of the last (channel) dim keeps
        # tokens apart; chunk(x, chunks, dim) and split(x, sizes, dim) both take dim third.
        if not tracked:
            return None
        dim = n.arg(2, "dim", 0)
        rank = len(tracked[0].shape or ())
        if dim not in (-1, rank - 1):
            return None
        region.split = n
        return tracked
    if n.kind == "norm" and tracked:
        # A norm over the hidden channels mixes them: removing a group changes the statistics of
        # the others, so width routing is off. Tokens stay independent: token routing may stay.
        region.width_reason = f"a norm over the hidden channels ({describe(n)}) runs inside the MLP"
        return tracked[:1]
    return None


def _channel_half(n: OpNode, shape: tuple[int, ...] | None) -> int | None:
    """0 or 1 when ``n`` takes the first or the second half of its input's last dim, else None.

    Accepts ``aten.slice(x, dim, start, end)``, ``narrow(x, dim, start, length)`` and
    ``x[..., a:b]`` (a getitem whose index leaves every other dim whole).
    """
    if not shape:
        return None
    width, rank = shape[-1], len(shape)
    if n.op == "slice":
        dim, start, end = n.arg(1, "dim", 0), n.arg(2, "start", None), n.arg(3, "end", None)
        step = n.arg(4, "step", 1)
    elif n.op == "narrow":
        dim, start, length = n.arg(1, "dim", 0), n.arg(2, "start", 0), n.arg(3, "length", 0)
        end, step = (
            (start + length if isinstance(start, int) and isinstance(length, int) else None),
            1,
        )
    else:  # getitem
        index = n.arg(1)
        index = index if isinstance(index, tuple) else (index,)
        if not index or not isinstance(index[-1], slice):
            return None
        lead = index[:-1]
        whole = all(i is Ellipsis or i == slice(None) for i in lead)
        if not whole or (Ellipsis not in lead and len(index) != rank):
            return None
        dim, start, end, step = -1, index[-1].start, index[-1].stop, index[-1].step or 1
    if dim not in (-1, rank - 1) or step != 1 or width % 2:
        return None
    start = 0 if start is None else start
    end = width if end is None or (isinstance(end, int) and end > width) else end
    if (start, end) == (0, width // 2):
        return 0
    if (start, end) == (width // 2, width):
        return 1
    return None
