"""Head-locality: which ops may stand between the projections and the attention, read from the graph.

Removing a head is the same as zeroing it only if every op between the q/k/v projections and the
attention (and between the attention and its out-projections, headout.py) treats every head
the same way and on its own. That is decided here by *replaying* the ops on index tensors, not
by a list of allowed op names:

- every row of every source Linear gets its own code (``offset of the Linear + row``);
- the ops from the Linears to the attention operands are rerun on those codes: shape ops
  (reshape, permute, split, cat, stack) for real, elementwise ops and casts as the identity, a
  reduction (``x.pow(2).mean(-1)`` of a hand-written RMSNorm) keeps one representative code;
- what arrives at the attention, (B, H, N, d), gives every head's rows in every source Linear,
  and so the code -> head map;
- then the ops are checked against that map: an elementwise op may combine two values only of
  the same head (``q * cos + rotate_half(q) * sin``), a norm or reduction may only run over the
  channels of one head (per-head qk-norm), and a tensor that does not come from a projection
  (a cos/sin table, a norm weight) must be the same for every head (size 1 on the axes along
  which the head changes).

Rotary embeddings in every form (rotate-half, interleaved pairs, complex multiply, tables indexed
by position), per-head norms (module or hand-written), casts, scaling and joint attention over
several projection sets concatenated along the sequence all pass these checks; key/value heads
shared by groups of query heads pass as units of a key/value head and its query heads (the
caller gives ``units``); a norm over all heads or per-head tables do not, each with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dynconvert.analysis.graph import OpNode
from dynconvert.analysis.layout import ChainError, describe

_PASS = ("shape", "cast", "unary", "binary", "norm", "reduce", "cat", "complex", "spatial", "conv")
_MAX_OPS = 400  # ops between the projections and one attention call; more: we left the block
_PAIR = 2**24  # view_as_complex packs a channel pair (a, b) into one code: _PAIR * (a + 1) + b


@dataclass
class Source:
    """One projection feeding an attention operand: its rows per head and the tokens it fills."""

    node: OpNode  # the Linear call
    table: torch.Tensor  # (H, d): the row of the Linear feeding channel j of head h
    tokens: tuple[int, ...]  # positions along the attention's sequence axis it fills


@dataclass
class InputLayout:
    """The sources of q, k and v, and whether anything but moving values stands in between."""

    sources: dict[str, list[Source]]  # "q" / "k" / "v" -> its sources, in sequence order
    trivial: bool  # only reshapes, casts and scaling by numbers between Linears and attention
    ops: list[OpNode] = field(default_factory=list)  # every op between them (for the plan)
    # Partial site: module fqn -> where its output is cut to the active heads (a norm across
    # all heads, or one after key/value compression). Its Linears and every op between them and
    # the module run in full.
    cuts: dict[str, Cut] = field(default_factory=dict)
    tables: list[TableUse] = field(default_factory=list)  # per-head tensors to cut with the heads


@dataclass
class Cut:
    """A module whose output, computed in full, keeps only the active heads' channels."""

    linears: tuple[str, ...]  # the projections whose every path to the attention passes it
    table: torch.Tensor  # (H, d): the output column (last axis) of channel j of head h


class _AcrossHeads(ChainError):
    """A norm or reduction over several heads' channels (maybe a cut point, see derive_inputs)."""

    def __init__(self, reason: str, node: OpNode):
        super().__init__(reason)
        self.node = node


def linear_ancestry(nodes: list[OpNode]) -> set[int]:
    """Ids of the nodes computed (through any ops) from some Linear's output."""
    out: set[int] = set()
    for n in nodes:  # execution order: inputs come first
        if n.kind == "linear" or any(i.kind == "linear" or id(i) in out for i in n.inputs):
            out.add(id(n))
    return out


def _writes(fresh: OpNode) -> list[tuple[OpNode, OpNode]]:
    """(view, copy_) pairs writing into a fresh tensor: ``out = empty_like(x); out[..., ::2] = a``."""
    out = []
    for view in fresh.real_users:
        if view.kind != "shape":
            continue
        for c in view.real_users:
            if c.kind == "mutate" and c.args and c.args[0] is view:
                out.append((view, c))
    return out


def _tracked_set(operands: list[OpNode], from_linear: set[int]) -> tuple[set[int], list[OpNode]]:
    """The ops between the operands and their source Linears, and the Linears themselves.

    A node is tracked when a Linear is reachable from it backwards through head-local kinds of
    ops. An op of another kind computed from a Linear on the way is refused; one computed from
    no Linear (a rotary table built from positions) is a constant for the replay.
    """
    tracked: dict[int, bool] = {}
    sources: list[OpNode] = []
    count = 0

    def visit(n: OpNode) -> bool:
        nonlocal count
        if id(n) in tracked:
            return tracked[id(n)]
        count += 1
        if count > _MAX_OPS:
            raise ChainError("the path from the projections to the attention is too long to follow")
        if n.kind == "linear":
            tracked[id(n)] = True
            sources.append(n)
            return True
        if n.kind == "fresh":
            # Its values are only what is written into it: follow the writes' sources.
            tracked[id(n)] = False
            hit = False
            for view, c in _writes(n):
                src = c.args[1] if len(c.args) > 1 and isinstance(c.args[1], OpNode) else None
                if src is not None and visit(src):
                    hit = True
                    tracked[id(view)] = tracked[id(c)] = True
            tracked[id(n)] = hit
            return hit
        if n.kind not in _PASS:
            if id(n) in from_linear:
                raise ChainError(f"{describe(n)} lies between the projection and the attention")
            tracked[id(n)] = False
            return False
        tracked[id(n)] = False  # guards a cycle (none in a dataflow graph)
        hit = False
        for i in n.inputs:
            hit = visit(i) or hit
        tracked[id(n)] = hit
        return hit

    for op in operands:
        if not visit(op):
            raise ChainError("an attention operand does not come from a Linear projection")
    return {k for k, v in tracked.items() if v}, sources


def substitute(a: Any, values: dict[int, torch.Tensor]) -> Any:
    """Arguments for rerunning a shape op: tracked nodes by their codes, others by -1 codes."""
    if isinstance(a, OpNode):
        if id(a) in values:
            return values[id(a)]
        if a.kind == "const":
            return a.args[0]
        if a.shape is not None:  # a value from no projection (learned tokens, a cat partner)
            return torch.full(a.shape, -1, dtype=torch.long)
        raise ChainError(f"cannot replay {describe(a)}: its value is unknown")
    if isinstance(a, (list, tuple)):
        return type(a)(substitute(x, values) for x in a)
    return a


def _dims(n: OpNode, rank: int) -> list[int]:
    """The reduced dims of a reduction node, non-negative (all dims when none are given)."""
    pos = 2 if n.op == "linalg_vector_norm" else 1
    d = n.arg(pos, "dim")
    if d is None or d == []:
        return list(range(rank))
    d = [d] if isinstance(d, int) else list(d)
    return sorted(x % rank for x in d)


class _Replay:
    """Codes of every tracked node, and the checks to run once heads are known."""

    def __init__(self, order: dict[int, int]):
        self.order = order
        self.values: dict[int, torch.Tensor] = {}
        self.same: list[tuple[OpNode, torch.Tensor, torch.Tensor]] = []  # must share heads
        self.const: list[tuple[OpNode, torch.Tensor, list[int]]] = []  # one head along dims
        self.bcast: list[tuple[OpNode, torch.Tensor, OpNode]] = []  # must be the same per head
        self.wide: list[OpNode] = []  # depthwise convolutions: a weight per channel, cut after
        self.trivial = True

    def run(self, nodes: list[OpNode], sources: list[OpNode], tracked: set[int]) -> None:
        offset = 0
        for s in sorted(sources, key=lambda n: self.order[id(n)]):
            width = s.shape[-1]
            self.values[id(s)] = torch.arange(width).expand(*s.shape) + offset  # a new tensor
            offset += width
        for n in sorted(nodes, key=lambda n: self.order[id(n)]):
            if id(n) in tracked and n.kind != "linear":
                self.values[id(n)] = self.step(n, tracked)

    def step(self, n: OpNode, tracked: set[int]) -> torch.Tensor:
        ins = [i for i in n.inputs if id(i) in tracked]
        vals = [self.values[id(i)] for i in ins]
        if n.kind in ("shape", "cat"):
            args = substitute(n.args, self.values)
            kwargs = {k: substitute(v, self.values) for k, v in n.kwargs.items()}
            return n.replay(*args, **kwargs)  # a slice of a fresh tensor stays a view of it
        if n.kind == "fresh":
            self.trivial = False
            return torch.full(n.shape, -1, dtype=torch.long)  # nothing written yet
        if n.kind == "mutate":
            view, src = self.values[id(n.args[0])], self.values[id(n.args[1])]
            return view.copy_(src.expand_as(view))  # writes through into the fresh tensor
        if n.kind == "complex":
            self.trivial = False
            v = vals[0]
            if n.op == "view_as_complex":  # (..., d/2, 2) -> (..., d/2): a pair becomes one value
                self.same.append((n, v[..., 0], v[..., 1]))
                return _PAIR * (v[..., 0] + 1) + v[..., 1]
            return torch.stack([v // _PAIR - 1, v % _PAIR], -1)  # view_as_real: back to pairs
        if n.kind == "reduce":
            self.trivial = False
            v = vals[0]
            dims = _dims(n, v.dim())
            self.const.append((n, v, dims))
            keep = bool(n.arg(3 if n.op == "linalg_vector_norm" else 2, "keepdim", False))
            for d in reversed(dims):
                v = v.narrow(d, 0, 1) if keep else v.select(d, 0)
            return v
        if n.kind in ("spatial", "conv"):
            self.trivial = False
            return self._grid_op(n, vals[0])
        if n.kind == "norm":
            self.trivial = False
            v = vals[0]
            shape = n.arg(1, "normalized_shape") or []
            width = len(shape) if isinstance(shape, (list, tuple)) else 1
            self.const.append((n, v, list(range(v.dim() - width, v.dim()))))
            return v
        out_shape = n.shape if n.shape is not None else tuple(vals[0].shape)
        out = vals[0].expand(*out_shape) if tuple(vals[0].shape) != tuple(out_shape) else vals[0]
        others = [a for a in n.inputs if id(a) not in tracked and a.shape is not None]
        if n.kind == "binary" and (len(vals) > 1 or others):
            self.trivial = False
        for v in vals[1:]:
            self.same.append((n, out, v.expand(*out_shape)))
        for a in others:
            self.bcast.append((n, out, a))
        return out

    def _grid_op(self, n: OpNode, v: torch.Tensor) -> torch.Tensor:
        """Codes after an op on a channels-first grid (B, C, *spatial): pooling or resizing
        keeps every channel's code; a depthwise convolution (each output channel reads one
        input channel) too, but has a weight per channel, so it needs a cut after it; any other
        convolution mixes channels (checked like a norm over them)."""
        out_shape = n.shape
        if out_shape is None or v.dim() < 3 or len(out_shape) != v.dim():
            raise ChainError(f"{describe(n)} lies between the projection and the attention")
        flat = v.flatten(2)  # (B, C, positions): a projection gives every token the same codes
        if not torch.equal(flat.amin(-1), flat.amax(-1)):
            raise ChainError(f"{describe(n)} runs over a grid whose tokens come from different projections")
        per = flat[..., 0]  # (B, C_in)
        c_in, c_out = per.shape[1], out_shape[1]
        if n.kind == "spatial":
            src = torch.arange(c_in)
        else:
            w = n.args[1] if len(n.args) > 1 else None
            w_shape = w.shape if isinstance(w, (OpNode, torch.Tensor)) else None
            transposed = "transpose" in n.op or (n.op == "convolution" and bool(n.arg(6)))
            if w_shape is None or transposed:
                raise ChainError(f"{describe(n)} lies between the projection and the attention")
            if w_shape[1] == 1 and c_out % c_in == 0:  # depthwise: out channel o reads o // mult
                src = torch.arange(c_out) // (c_out // c_in)
                self.wide.append(n)
            else:  # every output channel reads several input channels
                self.const.append((n, v, [1]))
                src = torch.zeros(c_out, dtype=torch.long)
        per = per[:, src]  # (B, C_out)
        return per.reshape(*per.shape, *[1] * (len(out_shape) - 2)).expand(*out_shape)

    def check(
        self,
        head_of: torch.Tensor,
        skip: set[str] | frozenset = frozenset(),
        shadow: set[int] | frozenset = frozenset(),
        only_norms: bool = False,
        tables: list[TableUse] | None = None,
    ) -> None:
        """Run the recorded checks with the code -> head map (-1: no head); ops inside the
        modules of ``skip`` (cut points) or in ``shadow`` (ids of ops whose every path to the
        attention passes a cut) are exempt; ``only_norms``: the checks that may ask for a cut;
        ``tables``: collects tensors that differ per head along one axis instead of refusing."""

        def exempt(n: OpNode) -> bool:
            return id(n) in shadow or _inside(n, skip)

        def heads(v: torch.Tensor) -> torch.Tensor:
            v = torch.where(v >= _PAIR, v // _PAIR - 1, v)  # a complex pair: its first channel
            return torch.where(v >= 0, head_of[v.clamp(min=0)], torch.full_like(v, -2))

        for n, v, dims in self.const:
            if exempt(n):
                continue
            h = heads(v)
            lo, hi = h, h
            for d in dims:
                lo, hi = lo.amin(d, keepdim=True), hi.amax(d, keepdim=True)
            if not torch.equal(lo, hi):
                if n.kind == "conv":
                    raise _AcrossHeads(
                        f"{describe(n)} mixes channels of several heads between the projection "
                        "and the attention; removing heads would change it",
                        n,
                    )
                what = "normalises" if n.kind == "norm" else "reduces over"
                raise _AcrossHeads(
                    f"qk-norm across all heads: {describe(n)} {what} channels of several heads; "
                    "removing heads would change it",
                    n,
                )
        for n in self.wide:
            if not exempt(n):
                raise _AcrossHeads(
                    f"{describe(n)} (a depthwise convolution, key/value compression) has a weight "
                    "per channel between the projection and the attention, and no module after it "
                    "whose output could be cut to the active heads",
                    n,
                )
        if only_norms:
            return
        for n, a, b in self.same:
            if exempt(n):
                continue
            if not torch.equal(heads(a), heads(b)):
                raise ChainError(
                    f"{describe(n)} combines values of different heads (or of a tensor computed "
                    "from another Linear) before the attention"
                )
        for n, v, a in self.bcast:
            if exempt(n):
                continue
            use = _table_use(n, heads(v), a)
            if use is None:
                continue
            if isinstance(use, str):
                raise ChainError(use)
            if tables is None:
                raise ChainError(
                    f"{describe(n)} combines the projection with a tensor that differs per "
                    "head; removing heads would misalign it"
                )
            tables.append(use)


@dataclass
class TableUse:
    """A tensor that is not from a projection but differs per head where it meets one (rotary
    tables over the whole width, LTX): removing heads needs it cut along ``dim`` too."""

    node: OpNode  # the tensor as the op reads it
    op: OpNode  # the op combining it with the projection's values
    dim: int  # its axis along which the head changes (negative: counted from the end)
    heads: torch.Tensor  # (size,): the unit of each position along that axis


def _table_use(n: OpNode, h: torch.Tensor, a: OpNode) -> TableUse | str | None:
    """None when tensor ``a`` is the same for every head where ``n`` combines it with heads
    ``h``; else how it differs: a TableUse when along one axis, each position in one head, else
    the reason it cannot be cut."""
    shape = tuple(a.shape)
    offset = h.dim() - len(shape)
    varying = []
    for axis in range(h.dim()):
        j = axis - offset
        if j < 0 or shape[j] == 1:
            continue
        if not torch.equal(h, h.narrow(axis, 0, 1).expand_as(h)):
            varying.append(axis)
    if not varying:
        return None
    if len(varying) != 1:
        return f"{describe(n)} combines the projection with a tensor that differs per head along several axes"
    axis = varying[0]
    per = h.movedim(axis, 0).reshape(h.shape[axis], -1)  # (positions, everything else)
    if not torch.equal(per, per[:, :1].expand_as(per)) or int(per.min()) < 0:
        return f"{describe(n)} combines the projection with a tensor whose positions do not each belong to one head"
    return TableUse(a, n, axis - h.dim(), per[:, 0].clone())


def derive_inputs(
    q: OpNode,
    k: OpNode,
    v: OpNode,
    key_layout: str,
    order: dict[int, int],
    from_linear: set[int],
    units: int | None = None,
    q_layout: str = "bhnd",
    v_layout: str = "bhnd",
) -> InputLayout:
    """Rows of every (head, channel) in every Linear feeding q, k and v, checked for head-locality.

    Args:
        q, k, v: the attention operands, (B, H, N, d) (k is (B, H, d, M) when ``key_layout`` is
            "bhdn", a hand-written q @ k^T).
        key_layout: "bhnd" or "bhdn".
        order: node id -> position in the graph (execution order).
        from_linear: ids of nodes computed from some Linear (:func:`linear_ancestry`).
        units: grouped-query attention: the number of key/value heads; the units routed are
            then groups of H / units consecutive query heads with their key/value head (a
            table of H rows maps row r to unit r * units // H). None: one unit per head.
        q_layout, v_layout: "bhnd", or "bhdn" for channels-first operands (linear attention).

    Raises:
        ChainError: with the reason, when removing a head would not be the same as zeroing it.
    """
    tracked, sources = _tracked_set([q, k, v], from_linear)
    nodes = list(_collect(q, k, v, tracked))
    replay = _Replay(order)
    replay.run(nodes, sources, tracked)
    offsets = {}
    off = 0
    for s in sorted(sources, key=lambda n: order[id(n)]):
        offsets[id(s)] = (off, s.shape[-1])
        off += s.shape[-1]
    by_role: dict[str, list[Source]] = {}
    for role, node in (("q", q), ("k", k), ("v", v)):
        value = replay.values[id(node)]
        if value.dim() != 4:
            raise ChainError(
                f"attention operands have {value.dim()} dims; only (batch, heads, tokens, dim) is "
                "supported"
            )
        layout = {"q": q_layout, "k": key_layout, "v": v_layout}[role]
        if layout == "bhdn":
            value = value.transpose(-1, -2)
        by_role[role] = _split_sources(value, sources, offsets)
    # 1. Norms across all heads (and depthwise convolutions) first, on the codes as they reach
    #    the attention: each must be followed by a module to cut at, or the site is refused.
    operands = (q, k, v)
    calls: dict[str, list[tuple[OpNode, torch.Tensor]]] = {}
    shadow: set[int] = set()
    while True:
        try:
            replay.check(_head_map(by_role, offsets, off, units), set(calls), shadow, only_norms=True)
            break
        except _AcrossHeads as e:
            cut = _cut_point(e.node, nodes, sources, replay, offsets)
            if cut is None or cut[0] in calls:
                raise ChainError(e.reason) from None
            calls[cut[0]] = cut[1]
            shadow = _shadowed(nodes, operands, set(calls), order)
    for m in list(calls):  # a cut before another cut: only the later one is cut
        others = set(calls) - {m}
        if others and all(id(x) in _shadowed(nodes, operands, others, order) for x in _exits(m, nodes, replay)):
            del calls[m]
            shadow = _shadowed(nodes, operands, set(calls), order)
    # 2. Values combined elementwise stand for each other: rotary's x1 * cos - x2 * sin reaches
    #    the attention with x1's code only. Every head's rows are completed with their partners
    #    (ops inside a cut module, which mixes every head, do not count).
    same = [x for x in replay.same if not _inside(x[0], calls) and id(x[0]) not in shadow]
    if same:  # nothing combined (plain reshapes): every code already stands alone
        component = _components(same, off)
        for found in by_role.values():
            for s in found:
                base, width = offsets[id(s.node)]
                s.table = _complete(s.table + base, component, base, base + width) - base
    # 3. Every check, with the completed heads; tensors that differ per head along one axis
    #    (rotary tables over the whole width) are kept for the caller to cut with the heads.
    tables: list[TableUse] = []
    replay.check(_head_map(by_role, offsets, off, units), set(calls), shadow, tables=tables)
    cuts = {m: _cut_table(m, found, by_role, offsets, shadow) for m, found in calls.items()}
    chain = [n for n in nodes if n.kind != "linear"]
    return InputLayout(by_role, replay.trivial, chain, cuts, tables)


def _cut_point(
    n: OpNode,
    nodes: list[OpNode],
    sources: list[OpNode],
    replay: _Replay,
    offsets: dict[int, tuple[int, int]],
) -> tuple[str, list[tuple[OpNode, torch.Tensor]]] | None:
    """Where heads can be dropped exactly after an op that needs every head (a norm across
    all heads, a depthwise convolution): the module running it, when each of its calls reads
    one tensor and returns it with the same channels in the same places, channels last
    (``norm_q(to_q(x))``; PixArt-Sigma's ``norm(sr(k))``, called for k and then v), and those
    channels come from one projection. Returns the module and, per call, that projection and
    the codes along the output's last axis; None when there is no such module."""
    m = n.module
    if not m:
        return None
    inside = [x for x in nodes if _inside(x, {m})]
    ids = {id(x) for x in inside}
    out = []
    for call in _connected(inside, ids):
        entries = {id(i): i for x in call for i in x.inputs if id(i) not in ids and id(i) in replay.values}
        exits = [x for x in call if any(id(u) not in ids and id(u) in replay.values for u in x.real_users)]
        if len(entries) != 1 or len(exits) != 1:
            return None
        (entry,) = entries.values()
        before, after = replay.values[id(entry)], replay.values[id(exits[0])]
        if before.shape != after.shape or not torch.equal(before, after):
            return None  # the module moves channels (or tokens)
        rows = after.reshape(-1, after.shape[-1])
        if not torch.equal(rows, rows[:1].expand_as(rows)):
            return None  # channels are not along the last axis
        codes = rows[0]
        owner = [s for s in sources if offsets[id(s)][0] <= int(codes.min()) and int(codes.max()) < sum(offsets[id(s)])]
        if int(codes.min()) < 0 or len(owner) != 1:
            return None
        out.append((owner[0], codes))
    return (m, out) if out else None


def _connected(inside: list[OpNode], ids: set[int]) -> list[list[OpNode]]:
    """The ops of a module split by call: groups connected through each other's values."""
    seen: set[int] = set()
    groups = []
    for start in inside:
        if id(start) in seen:
            continue
        group, stack = [], [start]
        seen.add(id(start))
        while stack:
            x = stack.pop()
            group.append(x)
            for y in [*x.inputs, *x.real_users]:
                if id(y) in ids and id(y) not in seen:
                    seen.add(id(y))
                    stack.append(y)
        groups.append(group)
    return groups


def _exits(m: str, nodes: list[OpNode], replay: _Replay) -> list[OpNode]:
    """The ops of module ``m`` whose values leave it on the way to the attention."""
    inside = {id(x) for x in nodes if _inside(x, {m})}
    return [x for x in nodes if id(x) in inside and any(id(u) not in inside and id(u) in replay.values for u in x.real_users)]


def _shadowed(nodes: list[OpNode], operands: tuple[OpNode, ...], cuts: set[str], order: dict[int, int]) -> set[int]:
    """Ids of the ops whose every path to the attention passes a cut module (and the modules'
    own ops): they run in full before the cut, so removing heads does not touch them."""
    tracked = {id(x) for x in nodes}
    live = {id(o) for o in operands}
    for x in sorted(nodes, key=lambda n: order[id(n)], reverse=True):
        if id(x) in live:
            continue
        for u in x.real_users:
            if id(u) in tracked and not _inside(u, cuts) and (id(u) in live or u.kind == "mutate"):
                live.add(id(x))
                break
    return {id(x) for x in nodes if id(x) not in live or _inside(x, cuts)}


def _cut_table(
    m: str,
    calls: list[tuple[OpNode, torch.Tensor]],
    by_role: dict[str, list[Source]],
    offsets: dict[int, tuple[int, int]],
    shadow: set[int],
) -> Cut:
    """The cut of module ``m``: its projections (which must reach the attention through cuts
    only) and the output column of every head's channels, the same in every call."""
    table = None
    for lin, codes in calls:
        if id(lin) not in shadow:
            raise ChainError(
                f"{lin.linear} reaches the attention both through {m}, which mixes heads, and "
                "without it (a fused projection): its rows cannot be cut after the module"
            )
        column = torch.full((int(codes.max()) + 1,), -1, dtype=torch.long)
        column[codes] = torch.arange(codes.numel())
        base = offsets[id(lin)][0]
        for s in (s for found in by_role.values() for s in found if s.node is lin):
            absolute = s.table + base
            if int(absolute.max()) >= column.numel() or bool((column[absolute] < 0).any()):
                continue  # another role of the same projection, cut in another call
            t = column[absolute]
            if table is not None and not torch.equal(t, table):
                raise ChainError(f"the calls of {m} keep different columns per head")
            table = t
    if table is None:
        raise ChainError(f"no head's channels leave {m}")
    return Cut(tuple(sorted({lin.linear for lin, _ in calls})), table)


def _inside(n: OpNode, modules: dict[str, str] | set[str]) -> bool:
    """Whether op ``n`` runs inside one of ``modules``."""
    return any(n.module == m or n.module.startswith(m + ".") for m in modules)


def _head_map(
    by_role: dict[str, list[Source]],
    offsets: dict[int, tuple[int, int]],
    size: int,
    units: int | None = None,
) -> torch.Tensor:
    """Code -> unit (-1: reaches no head), from every source's (H, d) table: the head, or with
    grouped key/value heads (``units`` of them) the group of row r of a table of H rows,
    r * units // H (consecutive query heads share a key/value head, as repeat_interleave and
    ``enable_gqa`` lay them out)."""
    head_of = torch.full((max(size, 1),), -1, dtype=torch.long)
    for found in by_role.values():
        for s in found:
            codes = s.table + offsets[id(s.node)][0]  # (H, d)
            prev = head_of[codes]
            rows = codes.shape[0]
            h = torch.arange(rows) if units is None else torch.arange(rows) * units // rows
            h = h[:, None].expand_as(codes)
            if ((prev >= 0) & (prev != h)).any():
                raise ChainError("a projection row feeds several heads")
            head_of[codes] = h
            if not torch.equal(head_of[codes], h):  # one row repeated to several heads (GQA)
                raise ChainError("a projection row feeds several heads")
    return head_of


def _components(same: list[tuple[OpNode, torch.Tensor, torch.Tensor]], size: int) -> torch.Tensor:
    """Code -> component: codes that an elementwise op combined (union-find over the pairs)."""
    parent = list(range(size))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for _, a, b in same:
        a, b = torch.broadcast_tensors(a, b)
        pairs = torch.stack([a.reshape(-1), b.reshape(-1)], 1)
        pairs = pairs[(pairs >= 0).all(1) & (pairs < size).all(1)].unique(dim=0)
        for x, y in pairs.tolist():
            rx, ry = find(x), find(y)
            if rx != ry:
                parent[rx] = ry
    return torch.tensor([find(a) for a in range(size)], dtype=torch.long)


def _complete(table: torch.Tensor, component: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """(H, d) codes -> each head's codes with all their partners in [lo, hi).

    A table whose codes are distinct and already hold all their partners is kept as it is (its
    order is the attention's channel order); a completed one lists each head's rows ascending.
    """
    own = component[lo:hi]
    rows = []
    for h in range(table.shape[0]):
        comps = component[table[h]].unique()
        rows.append(torch.isin(own, comps).nonzero().squeeze(1) + lo)
    if all(r.numel() == table.shape[1] for r in rows) and all(
        table[h].unique().numel() == table.shape[1] for h in range(table.shape[0])
    ):
        return table
    if len({r.numel() for r in rows}) != 1:
        raise ChainError("heads do not have the same number of rows in the projection")
    return torch.stack(rows)


def _collect(q: OpNode, k: OpNode, v: OpNode, tracked: set[int]) -> list[OpNode]:
    """The tracked nodes reachable backwards from the operands (each once)."""
    seen: dict[int, OpNode] = {}
    stack = [q, k, v]
    while stack:
        n = stack.pop()
        if id(n) in seen or id(n) not in tracked:
            continue
        seen[id(n)] = n
        if n.kind == "fresh":  # what is written into it, and the writes themselves
            stack.extend(x for pair in _writes(n) for x in pair)
        elif n.kind != "linear":
            stack.extend(n.inputs)
    return list(seen.values())


def _split_sources(
    value: torch.Tensor, sources: list[OpNode], offsets: dict[int, tuple[int, int]]
) -> list[Source]:
    """Per source Linear present in ``value`` (B, H, N, d): its (H, d) row table and tokens.

    The tables are read at each source's first token, then one comparison checks that every
    token of every sample and head holds exactly them (so a head's channels come from one
    projection, the same rows for every token).
    """
    order = sorted(sources, key=lambda s: offsets[id(s)][0])
    bases = torch.tensor([offsets[id(s)][0] for s in order[1:]], dtype=value.dtype)
    first = value[0, 0, :, 0].contiguous()  # (N,): head 0, channel 0 of every token
    if int(first.min()) < 0:
        raise ChainError("some attention tokens do not come from a projection (learned tokens)")
    per_token = torch.bucketize(first, bases, right=True)  # (N,): the source of each token
    expected = torch.empty_like(value[0])  # (H, N, d)
    out: list[Source] = []
    for i in dict.fromkeys(per_token.tolist()):
        s = order[i]
        base, width = offsets[id(s)]
        pos = (per_token == i).nonzero().squeeze(1)
        table = value[0, :, int(pos[0]), :]  # (H, d) codes at its first token
        if int(table.min()) < base or int(table.max()) >= base + width:
            raise ChainError("a head's channels come from several projections")
        expected[:, pos, :] = table[:, None, :]
        out.append(Source(s, (table - base).contiguous(), tuple(pos.tolist())))
    if not torch.equal(value, expected[None].expand_as(value)):
        raise ChainError("the projection's rows are not the same for every token, head and sample")
    return out
