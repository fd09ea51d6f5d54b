"""Head-locality decided on a reduced problem: once per group of twin blocks, at a few tokens.

Whether removing a head equals zeroing it is decided by replaying the ops between the
projections and the attention on index tensors (headlocal.py, headout.py). That replay costs
in proportion to tokens x channels and is paid again in every block, although its answer
depends on the channels and heads only, and twin blocks get the same answer. So the
:class:`Deriver` answers each call:

- on the probe, the model captured at a few tokens and aligned node for node with the capture
  at the real shapes (correspond.align), when one was given;
- once per group of structurally identical blocks (correspond.twin_blocks): for the first
  block of the group, then mapped onto the others (nodes by place, module paths renamed);
- carried to the real capture: nodes by place, each projection's token positions scaled from
  the rows it computes there, and checked against the real call's sequence lengths. A call
  whose answer does not carry over is replayed at the real shapes, and the plan's coverage
  says how many were.

Per-head tables (TableUse) stay in the terms of the graph the replay ran on (``Deriver.graph``),
where table_find.resolve finds which argument of the attention module each one is.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from dynconvert.analysis.calls import AttentionCall
from dynconvert.analysis.correspond import Twin, align, twin_blocks
from dynconvert.analysis.graph import OpGraph, OpNode, block_of
from dynconvert.analysis.headcuts import Cut
from dynconvert.analysis.headlocal import InputLayout, Source, derive_inputs, linear_ancestry
from dynconvert.analysis.headout import OutGate, OutTarget, derive_outputs
from dynconvert.analysis.layout import ChainError
from dynconvert.analysis.replay import TableUse

_SEQ_AXIS = {"bhnd": 2, "bnhd": 1, "bhdn": 3}  # the tokens' axis of an operand in each layout
Outputs = tuple[list[OutTarget], list[OutGate]]


class Deriver:
    """Where the head-locality of each attention call is decided (see the module docstring).

    Args:
        real: the capture at the real shapes (the plan's).
        probe: the same model captured at a few tokens, or None.
        probe_inputs: the ``(args, kwargs)`` the probe was captured with.
        twins: analyse each group of structurally identical blocks once.

    Example:
        >>> from dynconvert.analysis import analyze
        >>> from dynconvert.testing import tiny_dit
        >>> model = tiny_dit()
        >>> fast = analyze(model, model.example_inputs(2), probe_inputs=model.example_inputs(1))
        >>> fast == analyze(model, model.example_inputs(2))
        True
    """

    def __init__(
        self,
        real: OpGraph | None,
        probe: OpGraph | None = None,
        probe_inputs: tuple[tuple, dict] | None = None,
        twins: bool = True,
    ):
        self.graph = real  # where the replay runs: the probe when it aligns, else the real one
        self.inputs_of_graph = probe_inputs
        self.to_real: dict[int, OpNode] | None = None  # probe node id -> real node
        self.to_graph: dict[int, OpNode] = {}  # real node id -> probe node
        self.notes: list[str] = []
        self.slow = 0  # calls replayed at the real shapes: the probe's answer did not carry
        if probe is not None and real is not None:
            got = align(probe, real)
            if isinstance(got, str):
                self.notes.append(f"the probe was not used: {got}")
            else:
                self.graph, self.to_real = probe, got
                self.to_graph = {id(r): probe.nodes[i] for i, r in enumerate(real.nodes)}
        self.use_twins = twins and self.graph is not None
        self._twins: dict[str, Twin] | None = None
        self._order: dict[int, int] = {}
        self._from_linear: set[int] = set()
        self._cache: dict[tuple, Any] = {}
        self._queries: dict[int, list] = {}  # real q id -> its projections' query ranges

    # -- the two questions attention.py asks ------------------------------------------------
    def inputs(
        self, call: AttentionCall, units: int | None, order: dict[int, int], from_linear: set[int]
    ) -> InputLayout:
        """``derive_inputs`` of the call (``order``, ``from_linear``: the real graph's)."""

        def run(q: OpNode, k: OpNode, v: OpNode, order: dict, from_linear: set) -> InputLayout:
            return derive_inputs(
                q, k, v, call.key_layout, order, from_linear, units, call.q_layout, call.v_layout
            )

        key = ("in", units, call.key_layout, call.q_layout, call.v_layout)
        nodes = [call.q, call.k, call.v]
        got = self._answer(key, nodes, run, _twin_layout)
        if got is None:
            return run(*nodes, order, from_linear)
        if self.to_real is None:
            return got
        carried = _carry_layout(got, call, self._probe_call(call), self.to_real)
        if carried is None:
            self.slow += 1
            return run(*nodes, order, from_linear)
        layout, self._queries[id(call.q)] = carried
        return layout

    def outputs(
        self, call: AttentionCall, heads: int, v_head_dim: int, order: dict[int, int]
    ) -> Outputs:
        """``derive_outputs`` of the call (``order``: the real graph's)."""

        def run(out: OpNode, order: dict, _: set) -> Outputs:
            return derive_outputs(out, heads, v_head_dim, order, call.out_layout)

        key = ("out", heads, v_head_dim, call.out_layout)
        got = self._answer(key, [call.output], run, _twin_outputs)
        if got is None:
            return run(call.output, order, set())
        if self.to_real is None:
            return got
        segments = self._queries.get(id(call.q))
        carried = _carry_outputs(got, segments, self.to_real) if segments else None
        if carried is None:
            self.slow += 1
            return run(call.output, order, set())
        return carried

    # -- shared machinery ---------------------------------------------------------------------
    def _answer(
        self, key: tuple, nodes: list[OpNode], run: Callable, twin_map: Callable
    ) -> Any | None:
        """The answer in the terms of ``self.graph`` (None: answer on the real nodes)."""
        if self.graph is None:
            return None
        if self.to_real is not None:
            nodes = [self.to_graph.get(id(n)) for n in nodes]
            if any(n is None for n in nodes):
                return None
        if not self._order:
            self._order = {id(n): i for i, n in enumerate(self.graph.nodes)}
            self._from_linear = linear_ancestry(self.graph.nodes)
        twin = self._twin_of(nodes) if self.use_twins else None
        if twin is not None and twin.rep != twin.name:
            rep_nodes = [twin.to_rep[id(n)] for n in nodes]
            got = self._cached(key, rep_nodes, run)
            mapped = twin_map(got, twin) if not isinstance(got, ChainError) else got
            if mapped is not None:
                return _raise_or(_rename_error(mapped, twin))
        return _raise_or(self._cached(key, nodes, run))

    def _cached(self, key: tuple, nodes: list[OpNode], run: Callable) -> Any:
        ck = (key, *(id(n) for n in nodes))
        if ck not in self._cache:
            try:
                self._cache[ck] = run(*nodes, self._order, self._from_linear)
            except ChainError as e:
                self._cache[ck] = e
        return self._cache[ck]

    def _twin_of(self, nodes: list[OpNode]) -> Twin | None:
        """The twin record of the block holding ``nodes`` (all in one block), else None."""
        if self._twins is None:
            names = list(dict.fromkeys(block_of(n.module) for n in self.graph.nodes if n.module))
            self._twins = twin_blocks(self.graph, names, self._from_linear)
        blocks = {block_of(n.module) for n in nodes}
        twin = self._twins.get(blocks.pop()) if len(blocks) == 1 else None
        return twin if twin is not None and all(id(n) in twin.to_rep for n in nodes) else None

    def _probe_call(self, call: AttentionCall) -> AttentionCall:
        """The call at the probe's shapes (its operands, for their batch and sequence sizes)."""
        q, k, v, out = (self.to_graph[id(n)] for n in (call.q, call.k, call.v, call.output))
        return AttentionCall(out, q, k, v, call.key_layout, q_layout=call.q_layout,
                             v_layout=call.v_layout, out_layout=call.out_layout)  # fmt: skip

    def coverage(self) -> str:
        """What the plan's coverage says about how head-locality was decided ("" if nothing)."""
        notes = list(self.notes)
        if self.to_real is not None:
            notes.append("head-locality decided on the probe's shapes")
        if self.slow:
            notes.append(f"{self.slow} answer(s) did not carry to the real shapes: replayed there")
        return "; ".join(notes)


def _raise_or(got: Any) -> Any:
    if isinstance(got, ChainError):
        raise ChainError(got.reason)
    return got


def _rename(text: str, twin: Twin) -> str:
    """Module paths of the representative block renamed to the twin's (``blocks.1`` is not
    ``blocks.10``)."""
    return re.sub(re.escape(twin.rep) + r"(?![\w])", twin.name, text)


def _rename_error(got: Any, twin: Twin) -> Any:
    return ChainError(_rename(got.reason, twin)) if isinstance(got, ChainError) else got


def _mapper(twin: Twin) -> Callable[[OpNode], OpNode]:
    def node(n: OpNode) -> OpNode:
        return twin.from_rep[id(n)]  # KeyError: a node outside the block and its inputs

    return node


def _twin_layout(layout: InputLayout, twin: Twin) -> InputLayout | None:
    """The representative's input layout on the twin block (None: it reads outside both)."""
    node = _mapper(twin)
    try:
        sources = {
            role: [Source(node(s.node), s.table, s.tokens) for s in found]
            for role, found in layout.sources.items()
        }
        ops = [node(n) for n in layout.ops]
        tables = [TableUse(node(t.node), node(t.op), t.dim, t.heads) for t in layout.tables]
    except KeyError:
        return None
    cuts = {
        _rename(m, twin): Cut(tuple(_rename(x, twin) for x in c.linears), c.table)
        for m, c in layout.cuts.items()
    }
    return InputLayout(sources, layout.trivial, ops, cuts, tables)


def _twin_outputs(got: Outputs, twin: Twin) -> Outputs | None:
    """The representative's out-projections and gates on the twin block."""
    node = _mapper(twin)
    targets, gates = got
    try:
        return (
            [OutTarget(node(t.node), t.table, t.keep, t.tokens) for t in targets],
            [OutGate(node(g.node), g.table) for g in gates],
        )
    except KeyError:
        return None


def _rows(n: OpNode) -> int:
    return math.prod(n.shape[:-1]) if n.shape else 0


def _segments(
    found: list[Source], small: OpNode, real: OpNode, layout: str, to_real: dict[int, OpNode]
) -> list[tuple[tuple[int, ...], tuple[int, ...]]] | None:
    """Per source of one operand, (its positions at the probe, at the real shapes): each fills
    one contiguous range, in the same order, its length scaled from the rows its projection
    computes at each size; None unless they fill the real operand's sequence exactly."""
    axis = _SEQ_AXIS[layout]
    if not small.shape or not real.shape or len(real.shape) <= axis:
        return None
    ordered = sorted(found, key=lambda s: min(s.tokens))
    start, real_start, out = 0, 0, []
    for s in ordered:
        if s.tokens != tuple(range(start, start + len(s.tokens))):
            return None  # interleaved, or leaves a gap
        rows_per = Fraction(_rows(s.node), len(s.tokens) * small.shape[0])  # per position
        length = Fraction(_rows(to_real[id(s.node)]), real.shape[0]) / rows_per
        if length.denominator != 1 or length < 1:
            return None
        n = int(length)
        out.append((s.tokens, tuple(range(real_start, real_start + n))))
        start, real_start = start + len(s.tokens), real_start + n
    if start != small.shape[axis] or real_start != real.shape[axis]:
        return None
    return out


def _carry_layout(
    layout: InputLayout, call: AttentionCall, small: AttentionCall, to_real: dict[int, OpNode]
) -> tuple[InputLayout, list] | None:
    """The probe's input layout at the real shapes (see :func:`_segments`), and the query
    ranges; None if it does not carry. Tables stay in the probe's terms (table_find.resolve
    runs there)."""
    sources: dict[str, list[Source]] = {}
    queries: list = []
    for role in "qkv":
        small_op, real_op = getattr(small, role), getattr(call, role)
        layout_of = {"q": call.q_layout, "k": call.key_layout, "v": call.v_layout}[role]
        segs = _segments(layout.sources[role], small_op, real_op, layout_of, to_real)
        if segs is None:
            return None
        real_of = dict(segs)
        queries = segs if role == "q" else queries
        sources[role] = [
            Source(to_real[id(s.node)], s.table, real_of[s.tokens]) for s in layout.sources[role]
        ]
    ops = [to_real[id(n)] for n in layout.ops]
    carried = InputLayout(sources, layout.trivial, ops, dict(layout.cuts), list(layout.tables))
    return carried, queries


def _carry_outputs(
    got: Outputs, segments: list[tuple[tuple[int, ...], tuple[int, ...]]], to_real: dict
) -> Outputs | None:
    """The probe's out-projections at the real shapes: each reads a union of whole query
    ranges of the projections (``segments``, from :func:`_carry_layout`), carried as they
    are; None when one reads part of a range."""
    targets, gates = got
    carried = []
    for t in targets:
        wanted = set(t.tokens)
        parts = [(s, r) for s, r in segments if wanted.issuperset(s)]
        if sum(len(s) for s, _ in parts) != len(wanted):
            return None
        tokens = tuple(sorted(i for _, r in parts for i in r))
        carried.append(OutTarget(to_real[id(t.node)], t.table, t.keep, tokens))
    return carried, [OutGate(to_real[id(g.node)], g.table) for g in gates]
