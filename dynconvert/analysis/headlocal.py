"""Head-locality: which ops may stand between the projections and the attention (from the graph).

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
  which the head changes), or differ along one axis only: a table the caller cuts with the
  heads (tables.py). The replay itself is replay.py.

Rotary embeddings in every form (rotate-half, interleaved pairs, complex multiply, rotation
matrices, tables indexed by position), per-head norms (module or hand-written), casts, scaling,
pooling of keys and values, and joint attention over several projection sets concatenated along
the sequence all pass these checks; key/value heads shared by groups of query heads pass as
units of a key/value head and its query heads (the caller gives ``units``). A norm over all
heads, or a depthwise convolution, passes only with a module after it whose output can be cut
to the active heads (a partial site: everything before the cut runs in full, headcuts.py);
otherwise the site is refused with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dynconvert.analysis.graph import OpNode
from dynconvert.analysis.headcuts import Cut, cut_point, cut_table, exits, shadowed
from dynconvert.analysis.layout import ChainError, describe
from dynconvert.analysis.replay import AcrossHeads, Replay, TableUse, in_modules

REPLAYED = (
    "shape",
    "cast",
    "unary",
    "binary",
    "norm",
    "reduce",
    "cat",
    "complex",
    "spatial",
    "conv",
)
"""Kinds of ops the replay follows from an attention operand back to its projections."""
_MAX_OPS = 400  # ops between the projections and one attention call; more: we left the block


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


def linear_ancestry(nodes: list[OpNode]) -> set[int]:
    """Ids of the nodes computed (through any ops) from some Linear's output."""
    out: set[int] = set()
    for n in nodes:  # execution order: inputs come first
        if n.kind == "linear" or any(i.kind == "linear" or id(i) in out for i in n.inputs):
            out.add(id(n))
    return out


def _writes(fresh: OpNode) -> list[tuple[OpNode, OpNode]]:
    """(view, copy_) pairs writing into a fresh tensor.

    As in ``out = empty_like(x); out[..., ::2] = a``.
    """
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
        if n.kind not in REPLAYED:
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
    replay = Replay(order)
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
        elif layout == "bnhd":  # (B, N, H, d), as flash-attn takes it
            value = value.transpose(1, 2)
        by_role[role] = _split_sources(value, sources, offsets)
    # 1. Norms across all heads (and depthwise convolutions) first, on the codes as they reach
    #    the attention: each must be followed by a module to cut at, or the site is refused.
    operands = (q, k, v)
    calls: dict[str, list[tuple[OpNode, torch.Tensor]]] = {}
    shadow: set[int] = set()
    while True:
        try:
            head_of = _lend_heads(_head_map(by_role, offsets, off, units), replay.same)
            replay.check(head_of, set(calls), shadow, only_norms=True)
            break
        except AcrossHeads as e:
            cut = cut_point(e.node, nodes, sources, replay, offsets)
            if cut is None or cut[0] in calls:
                raise ChainError(e.reason) from None
            calls[cut[0]] = cut[1]
            shadow = shadowed(nodes, operands, set(calls), order)
    for m in list(calls):  # a cut before another cut: only the later one is cut
        others = set(calls) - {m}
        if others and all(
            id(x) in shadowed(nodes, operands, others, order) for x in exits(m, nodes, replay)
        ):
            del calls[m]
            shadow = shadowed(nodes, operands, set(calls), order)
    # 2. Values combined elementwise stand for each other: rotary's x1 * cos - x2 * sin reaches
    #    the attention with x1's code only. Every head's rows are completed with their partners
    #    (ops inside a cut module, which mixes every head, do not count).
    same = [x for x in replay.same if not in_modules(x[0], calls) and id(x[0]) not in shadow]
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
    roles = [(s.node, s.table) for found in by_role.values() for s in found]
    cuts = {m: cut_table(m, found, roles, offsets, shadow) for m, found in calls.items()}
    chain = [n for n in nodes if n.kind != "linear"]
    return InputLayout(by_role, replay.trivial, chain, cuts, tables)


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


def _lend_heads(
    head_of: torch.Tensor, same: list[tuple[OpNode, torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """The code -> head map with codes that reach no head given the head of a value they were
    combined with (the second channel of a rotary pair summed into the first), so that a
    per-head norm before them is not mistaken for one across heads. Two codes that both have
    a head are left alone: whether they may be combined is checked later."""
    head_of = head_of.clone()
    size = head_of.numel()
    pairs = []
    for _, a, b in same:
        a, b = torch.broadcast_tensors(a, b)
        p = torch.stack([a.reshape(-1), b.reshape(-1)], 1)
        pairs.append(p[((p >= 0) & (p < size)).all(1)].unique(dim=0))
    if not pairs:
        return head_of
    p = torch.cat(pairs)
    for _ in range(8):  # a chain of combinations hands a head on one link per pass
        ha, hb = head_of[p[:, 0]], head_of[p[:, 1]]
        to_b, to_a = (ha >= 0) & (hb < 0), (hb >= 0) & (ha < 0)
        if not (to_a.any() or to_b.any()):
            break
        head_of[p[to_b, 1]] = ha[to_b]
        head_of[p[to_a, 0]] = hb[to_a]
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
