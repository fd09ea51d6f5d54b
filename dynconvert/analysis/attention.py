"""Find attention sites in an OpGraph: the call, its q/k/v projections and out-projection.

Row layouts are read, not guessed: the ops between each projection and the attention call are
replayed on a tensor of row numbers (layout.py), so a fused qkv, separate q/k/v Linears or any
reshaping code give the exact rows of every (head, channel). A site is refused, with the reason,
wherever removing a head would not be the same as zeroing it (design.md, "Traps").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch

from dynconvert.analysis.costs import node_macs
from dynconvert.analysis.graph import OpGraph, OpNode, block_of, call_lca, module_lca
from dynconvert.analysis.headlocal import InputLayout, Source, derive_inputs
from dynconvert.analysis.headout import OutTarget, derive_outputs
from dynconvert.analysis.layout import ChainError, as_parts, describe
from dynconvert.analysis.registry import attention_attrs
from dynconvert.analysis.replay import TableUse, substitute
from dynconvert.plan import AttentionSite, AttentionStream, SkippedSite, UnitMap


@dataclass
class AttentionCall:
    """One attention computation: fused (sdpa) or written out (matmul, softmax, matmul)."""

    output: OpNode  # (B, H, N, dv): the sdpa call, or the probabilities @ v matmul
    q: OpNode  # (B, H, N, d)
    k: OpNode  # (B, H, M, d), or (B, H, d, M) when the key is transposed for q @ k^T
    v: OpNode  # (B, H, M, dv)
    key_layout: str  # "bhnd" for sdpa, "bhdn" for q @ k^T
    cost_nodes: list[OpNode] = field(default_factory=list)  # the ops holding QK^T and AV
    # Linear (kernel) attention holds q, v and its output channels-first: (B, H, d, N).
    q_layout: str = "bhnd"
    v_layout: str = "bhnd"
    out_layout: str = "bhnd"
    # A tensor other than q k^T joins the scores before the softmax (an additive mask or bias,
    # maybe per head): the sliced call is checked once at convert.
    scores_extra: bool = False
    folded: bool = False  # heads were folded into the batch (read batch-major, see _unfold_heads)
    # Another library's kernel (flash-attn, xformers, flex attention, a custom op): its
    # semantics are not known, so its sliced call is checked at convert; ``alt`` is the same
    # call read in the other layout ((B, N, H, d) as flash-attn takes it), tried when this fails.
    kernel: bool = False
    alt: AttentionCall | None = None


def find_calls(graph: OpGraph) -> list[AttentionCall]:
    """Every attention call of the graph, in execution order."""
    calls: list[AttentionCall] = []
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    for n in graph.nodes:
        if n.kind == "attention":  # scaled_dot_product_attention(q, k, v, ...)
            q, k, v = n.args[0], n.args[1], n.args[2]
            calls.append(AttentionCall(output=n, q=q, k=k, v=v, key_layout="bhnd", cost_nodes=[n]))
        elif n.kind == "softmax":  # written out: softmax(q @ k^T * scale) @ v
            call = _manual_call(n)
            if call is not None:
                calls.append(call)
        elif n.kind == "other" and ("attn" in n.op.lower() or "attention" in n.op.lower()):
            call = _kernel_call(n)  # another library's attention kernel, by its name and shapes
            if call is not None:
                calls.append(call)
        elif n.kind == "matmul":  # linear attention: (pad(v) @ k) @ q, no softmax
            call = _linear_call(n, order)
            if call is not None:
                calls.append(call)
    return calls


_PAD_OPS = ("pad", "constant_pad_nd")


def _kernel_call(n: OpNode) -> AttentionCall | None:
    """An op of another library named like an attention (``flash_attn_func``, xformers'
    ``memory_efficient_attention``, ``flex_attention``, a ``torch.library`` custom op) whose
    first three arguments are 4-D q, k, v and whose output (or first output) is q's shape with
    v's channels. Read as (B, H, N, d), else as (B, N, H, d); the replay tells which holds."""
    q, k, v = (n.args + (None, None, None))[:3]
    if not all(isinstance(a, OpNode) and a.shape and len(a.shape) == 4 for a in (q, k, v)):
        return None
    out = n if n.shape is not None else next(
        (u for u in n.real_users if u.op == "getitem" and len(u.args) > 1 and u.args[1] == 0), None
    )
    if out is None or out.shape is None or tuple(out.shape[:3]) != tuple(q.shape[:3]) or out.shape[3] != v.shape[3]:
        return None
    calls = []
    for layout, h, t in (("bhnd", 1, 2), ("bnhd", 2, 1)):  # the heads' axis, the tokens' axis
        if q.shape[h] % k.shape[h] == 0 and k.shape[h] == v.shape[h] and k.shape[t] == v.shape[t]:
            calls.append(
                AttentionCall(
                    output=out, q=q, k=k, v=v, key_layout=layout, cost_nodes=[n], q_layout=layout,
                    v_layout=layout, out_layout=layout, kernel=True,
                )
            )  # fmt: skip
    if not calls:
        return None
    for a, b in zip(calls, calls[1:]):
        a.alt = b
    return calls[0]


def _linear_call(out: OpNode, order: dict[int, int]) -> AttentionCall | None:
    """Linear (kernel) attention as Sana writes it: v (B, H, d, M), optionally padded with a
    row of ones (the normaliser), times k (B, H, M, d) gives (B, H, d', d); times q (B, H, d, N)
    gives (B, H, d', N); then per-head elementwise work (dividing by the normaliser row). Every
    product runs per (batch, head), so heads stay independent as in softmax attention."""
    first = out.args[0] if len(out.args) > 1 else None
    if out.op not in ("matmul", "__matmul__") or not isinstance(first, OpNode) or first.kind != "matmul":
        return None
    if first.op not in ("matmul", "__matmul__") or len(first.real_users) != 1:
        return None
    v, k, q = first.args[0], first.args[1], out.args[1]
    if not all(isinstance(a, OpNode) and a.shape and len(a.shape) == 4 for a in (v, k, q)):
        return None
    while v.op in _PAD_OPS or v.kind == "cast":  # the normaliser row, then v itself
        v = v.args[0]
    if not v.shape or len(v.shape) != 4 or not (q.shape[1] == k.shape[1] == v.shape[1]):
        return None
    if k.shape[3] != q.shape[2] or k.shape[2] != v.shape[3]:  # (d, M) @ (M, d) @ (d, N)
        return None
    # The attention's end: the per-head work on the product (4-D, same batch and heads) up to
    # where it leaves that shape (flattening the heads for the out-projection).
    end, inside, kept = out, {id(out)}, [out]
    for n in sorted(_per_head_users(out), key=lambda x: order[id(x)]):
        if n.shape and len(n.shape) == 4 and n.shape[:2] == out.shape[:2] and all(
            id(i) in inside or i.kind in ("param", "const") for i in n.inputs
        ):
            inside.add(id(n))
            kept.append(n)
            end = n
    if any(id(u) not in inside for n in kept if n is not end for u in n.real_users):
        return None  # the per-head work has more than one way out
    return AttentionCall(
        output=end, q=q, k=k, v=v, key_layout="bhnd", cost_nodes=[first, out],
        q_layout="bhdn", v_layout="bhdn", out_layout="bhdn",
    )  # fmt: skip


def _per_head_users(n: OpNode) -> list[OpNode]:
    """The ops reading ``n``'s value, directly or through others, that keep its batch and head
    axes (4-D, same leading sizes); the walk stops where the shape leaves them."""
    seen, found, stack = {id(n)}, [], list(n.real_users)
    while stack:
        u = stack.pop()
        if id(u) in seen:
            continue
        seen.add(id(u))
        if not u.shape or len(u.shape) != 4 or u.shape[:2] != n.shape[:2]:
            continue
        found.append(u)
        stack.extend(u.real_users)
    return found


def _manual_call(softmax: OpNode) -> AttentionCall | None:
    """The written-out attention around ``softmax``, or None when it is some other softmax."""
    # Back from the softmax to the score matmul (through scaling, masking, casts).
    cur = softmax.args[0] if softmax.args and isinstance(softmax.args[0], OpNode) else None
    while cur is not None and cur.kind in ("binary", "cast", "unary"):
        cur = next((i for i in cur.inputs if i.kind not in ("param",)), None)
    if cur is not None and cur.op == "einsum":
        return _einsum_call(cur, softmax)
    if cur is None or cur.kind != "matmul" or cur.op not in ("matmul", "bmm", "__matmul__", "baddbmm"):
        return None
    scores = cur  # q @ k^T: (B, H, N, M), or (B * H, N, M) with the heads folded into the batch
    nxt = _value_product(softmax, lambda n: n.kind == "matmul" and n.args[0] is not None)
    if nxt is None or nxt.op not in ("matmul", "bmm", "__matmul__"):
        return None
    # baddbmm(mask, q, k^T, beta, alpha): diffusers' classic AttnProcessor adds the mask there.
    q, k = (scores.args[1], scores.args[2]) if scores.op == "baddbmm" else (scores.args[0], scores.args[1])
    v = nxt.args[1]
    if not all(isinstance(a, OpNode) for a in (q, k, v)):
        return None
    extra = _scores_extra(softmax, scores)
    if q.shape is not None and len(q.shape) == 3:
        return _unfold_heads(q, k, v, nxt, [scores, nxt], extra)
    return AttentionCall(
        output=nxt, q=q, k=k, v=v, key_layout="bhdn", cost_nodes=[scores, nxt], scores_extra=extra
    )


def _scores_extra(softmax: OpNode, scores: OpNode) -> bool:
    """Whether a tensor other than q k^T (a mask, a position bias) joins the scores between the
    score product and the softmax (baddbmm's added input counts unless beta is 0)."""
    if scores.op == "baddbmm":
        beta = scores.arg(3, "beta", 1)
        if beta != 0 and isinstance(scores.args[0], OpNode) and scores.args[0].kind != "fresh":
            return True
    cur = softmax.args[0]
    while cur is not scores and isinstance(cur, OpNode):
        others = [i for i in cur.inputs if i.kind not in ("param", "const")]
        if len(others) > 1:
            return True
        cur = others[0] if others else None
    return False


def _unfold_heads(
    q: OpNode, k: OpNode, v: OpNode, out: OpNode, cost: list[OpNode], extra: bool
) -> AttentionCall | None:
    """Attention with the heads folded into the batch (diffusers' classic AttnProcessor:
    ``head_to_batch_dim`` makes (B * H, N, d), then baddbmm / bmm, ``batch_to_head_dim`` after):
    the same call on the (B, H, N, d) tensors before the fold and after the unfold, when only
    a fold of batch and heads lies in between (checked by replaying indices)."""
    q4, v4 = _folded_from(q), _folded_from(v)
    k4, layout = _folded_from(k), "bhdn"  # k^T folded as it is: (B, H, d, M)
    if k4 is None:  # k (B, H, M, d) folded, then transposed
        k4, layout = _folded_from(k, transposed=True), "bhnd"
    out4 = _unfolded_into(out)
    if q4 is None or k4 is None or v4 is None or out4 is None:
        return None
    return AttentionCall(
        output=out4, q=q4, k=k4, v=v4, key_layout=layout, cost_nodes=cost, scores_extra=extra, folded=True
    )


def _fold_chain(start: OpNode, end: OpNode, chain: list[OpNode], expected: torch.Tensor) -> bool:
    """Whether the shape ops ``chain`` (from ``start`` to ``end``) move the index tensor of
    ``start`` into ``expected``."""
    values = {id(start): torch.arange(math.prod(start.shape)).reshape(start.shape)}
    for n in chain:
        values[id(n)] = n.replay(*substitute(n.args, values), **{a: substitute(b, values) for a, b in n.kwargs.items()})
    got = values[id(end)]
    return isinstance(got, torch.Tensor) and got.shape == expected.shape and torch.equal(got, expected)


def _folded_from(x: OpNode, transposed: bool = False) -> OpNode | None:
    """The 4-D tensor (B, H, a, b) that shape ops folded into ``x``, (B * H, a, b) (or, with
    ``transposed``, (B * H, b, a)), or None. Batch-major folding is assumed (diffusers'
    ``head_to_batch_dim``); a heads-major fold fails the checks that follow, with a reason."""
    chain, cur = [], x
    for _ in range(6):
        if cur.kind != "shape" or cur.replay is None or len(cur.inputs) != 1:
            return None
        chain.insert(0, cur)
        cur = cur.inputs[0]
        if cur.shape is not None and len(cur.shape) == 4 and cur.shape[0] * cur.shape[1] == x.shape[0]:
            b, h, n, d = cur.shape
            expected = torch.arange(b * h * n * d).reshape(b * h, n, d)
            if _fold_chain(cur, x, chain, expected.transpose(1, 2) if transposed else expected):
                return cur
    return None


def _unfolded_into(out: OpNode) -> OpNode | None:
    """The (B, H, N, dv) tensor that shape ops make of ``out`` (B * H, N, dv), or None."""
    chain, cur = [], out
    for _ in range(3):
        users = cur.real_users
        if len(users) != 1 or users[0].kind != "shape" or users[0].replay is None:
            return None
        cur = users[0]
        chain.append(cur)
        if cur.shape is not None and len(cur.shape) == 4 and cur.shape[0] * cur.shape[1] == out.shape[0]:
            expected = torch.arange(math.prod(out.shape)).reshape(cur.shape)
            return cur if _fold_chain(out, cur, chain, expected) else None
    return None


def _value_product(softmax: OpNode, is_product: Any) -> OpNode | None:
    """Forward from the softmax, through dropout and casts only, to the product with v."""
    nxt = softmax
    while True:
        users = nxt.real_users
        if len(users) != 1:
            return None
        nxt = users[0]
        if is_product(nxt):
            return nxt
        if nxt.kind not in ("cast", "unary"):
            return None


def _einsum_operands(node: OpNode) -> tuple[str, list[str], list[Any]] | None:
    """(output subscripts, input subscripts, operands) of a two-operand 4-D einsum, else None."""
    eq = node.args[0] if node.args else None
    ops = list(node.args[1]) if len(node.args) > 1 and isinstance(node.args[1], (list, tuple)) else list(node.args[1:])
    if not isinstance(eq, str) or "->" not in eq or "..." in eq or len(ops) != 2:
        return None
    lhs, out = eq.replace(" ", "").split("->")
    ins = lhs.split(",")
    if len(ins) != 2 or any(len(x) != 4 for x in [*ins, out]):
        return None
    return out, ins, ops


def _einsum_call(scores: OpNode, softmax: OpNode) -> AttentionCall | None:
    """Attention written with einsum: softmax(einsum("bhnd,bhmd->bhnm", q, k)) then
    einsum("bhnm,bhmd->bhnd", p, v) (any letters; k may be given as (B, H, d, M))."""
    parsed = _einsum_operands(scores)
    if parsed is None:
        return None
    out, (qs, ks), (q, k) = parsed
    c = qs[3]  # the contracted channel letter: q's last axis
    extra = set(ks) - set(qs)  # the key-token letter
    if c in out or c not in ks or len(extra) != 1 or qs[:2] != ks[:2] or out != qs[:3] + extra.pop():
        return None
    layout = "bhnd" if ks[3] == c else ("bhdn" if ks[2] == c else "")
    nxt = _value_product(softmax, lambda n: n.op == "einsum")
    parsed = _einsum_operands(nxt) if nxt is not None else None
    if parsed is None or not layout:
        return None
    o, (ps, vs), (p, v) = parsed
    if ps[3] != vs[2] or o != ps[:3] + vs[3] or not all(isinstance(a, OpNode) for a in (q, k, v)):
        return None
    return AttentionCall(output=nxt, q=q, k=k, v=v, key_layout=layout, cost_nodes=[scores, nxt])


@dataclass
class FoundAttention:
    """An attention site, or the call refused with the reason, and the Linear nodes it takes."""

    site: AttentionSite | None
    skipped: SkippedSite | None
    linear_nodes: list[OpNode]
    tables: list[TableUse] = field(default_factory=list)  # per-head tensors to find (tables.py)
    kernel_macs: int = 0  # QK^T + AV of another library's kernel, which the graph cannot count


def build_site(
    call: AttentionCall,
    model: torch.nn.Module,
    reuse: dict[str, list[OpNode]],
    order: dict[int, int],
    from_linear: set[int],
) -> FoundAttention:
    """Derive one AttentionSite from an attention call, or the reason it cannot be converted.

    Args:
        call: The attention call.
        model: The model the graph was captured from (for the attention module and its class).
        reuse: Linear fqn -> the nodes that call it (a Linear called twice cannot be sliced).
        order: node id -> position in the graph.
        from_linear: ids of the nodes computed from some Linear (headlocal.linear_ancestry).
    """
    where = call.output.module or "<root>"
    try:
        return _build(call, model, reuse, order, from_linear)
    except ChainError as e:
        if call.alt is not None:  # a kernel read in its other layout
            found = build_site(call.alt, model, reuse, order, from_linear)
            if found.site is not None:
                return found
            why = f"`{call.cost_nodes[0].op}` as (B, H, N, d): {e.reason}; as (B, N, H, d): {found.skipped.reason}"
            return FoundAttention(None, SkippedSite(where, "attention", why), [])
        # A fold read the wrong way round (heads-major, H x B) shows up as a layout problem.
        why = f"heads folded into the batch, read as batch x heads: {e.reason}" if call.folded else e.reason
        return FoundAttention(None, SkippedSite(where, "attention", why), [])


def _unit_map(
    linear: str, axis: str, units: int, tables: list[torch.Tensor], keep: list[int] | None = None
) -> UnitMap:
    """A UnitMap from one (units, size) index table per part: regular parts where every table
    is ``base + u * stride + j``, else the explicit indices."""
    parts = [as_parts(t) for t in tables]
    keep = list(keep or [])
    if any(p is None for p in parts):
        explicit = [t.tolist() for t in tables]
        return UnitMap(linear=linear, axis=axis, units=units, explicit=explicit, keep=keep)
    return UnitMap(linear=linear, axis=axis, units=units, parts=parts, keep=keep)


def _build(
    call: AttentionCall,
    model: torch.nn.Module,
    reuse: dict[str, list[OpNode]],
    order: dict[int, int],
    from_linear: set[int],
) -> FoundAttention:
    q_shape = call.q.shape  # (B, H, N, d); (B, N, H, d) for a kernel taking that layout
    if q_shape is None or len(q_shape) != 4:
        raise ChainError("attention operands are not (batch, heads, tokens, dim) tensors")
    h_axis = 2 if call.q_layout == "bnhd" else 1
    heads, head_dim = q_shape[h_axis], q_shape[2] if call.q_layout == "bhdn" else q_shape[3]
    k_shape = call.k.shape
    k_heads = k_shape[h_axis] if k_shape is not None and len(k_shape) == 4 else -1
    if k_heads < 1 or heads % k_heads:
        raise ChainError(f"{k_heads} key heads for {heads} query heads")
    if heads < 2:
        raise ChainError("a single head: nothing to route")
    linear = call.q_layout == "bhdn"  # linear (kernel) attention: checked once at convert
    out_shape = call.output.shape or ()
    v_head_dim = out_shape[2] if call.out_layout == "bhdn" else out_shape[-1]  # channels a head returns

    # Input side: the ops from the projections to q, k and v replayed on row codes give the
    # rows of every (head, channel) per source Linear, and are checked for head-locality
    # (headlocal.py): rotary embeddings, per-head norms and joint streams pass, a norm over
    # all heads does not. Grouped-query attention (a key/value head serves g query heads,
    # given to the kernel with fewer heads or repeated to H): the units are the key/value
    # heads, each with its g query heads; the smallest g that passes is the grouping.
    layout, units = _grouped_layout(call, heads, k_heads, order, from_linear)
    for role, width in (("q", head_dim), ("k", head_dim), ("v", v_head_dim)):
        for src in layout.sources[role]:
            if src.table.shape[-1] > width:  # rows that never reach the attention, run with it
                raise ChainError(
                    f"each head takes {src.table.shape[-1]} rows of {src.node.linear} for its "
                    f"{width} channels (rows that only feed a norm): its cost would be miscounted"
                )
    if units < 2:
        raise ChainError(
            f"one key/value unit for all {heads} query heads (multi-query attention, or key/value "
            "heads repeated in another order than repeat_interleave): nothing to route"
        )
    # Output side: every out-projection reading the attention output (one per stream), with
    # the input column of every (head, channel) and the columns that are not heads.
    targets, gates = derive_outputs(call.output, heads, v_head_dim, order, call.out_layout)
    if len(gates) > 1:
        raise ChainError("several gates scale the attention output")
    for t in targets:
        if t.keep and not _ascending(t.table):
            raise ChainError(
                "the out-projection mixes head channels with other channels in an irregular order"
            )

    # Slicing rewrites each Linear for this site alone: a shared Linear would be cut for two.
    in_nodes = {id(s.node): s.node for role in "qkv" for s in layout.sources[role]}
    in_nodes.update({id(g.node): g.node for g in gates})
    out_nodes = [t.node for t in targets]
    for ln in [*in_nodes.values(), *out_nodes]:
        if ln.linear is None:
            raise ChainError(f"a projection of this attention ({describe(ln)}) is not an nn.Linear module")
        if len(reuse.get(ln.linear, [])) > 1:
            raise ChainError(f"{ln.linear} is called more than once per forward (shared module)")
    if {n.linear for n in out_nodes} & {n.linear for n in in_nodes.values()}:
        raise ChainError("the out-projection is also an input projection")

    # One UnitMap per distinct input Linear: a fused qkv gets three parts (q, k, v rows of a
    # head), separate projections one part each. Units are heads.
    per_linear: dict[str, list[torch.Tensor]] = {}
    for role in "qkv":
        for s in layout.sources[role]:
            per_linear.setdefault(s.node.linear, []).append(_per_unit(s.table, units))
    for g in gates:  # a gate's rows go with their head, as the value rows do
        if g.node.linear in per_linear:
            raise ChainError(f"the gate {g.node.linear} is also a q, k or v projection")
        per_linear[g.node.linear] = [_per_unit(g.table, units)]
    cut_of = {lin: mod for mod, cut in layout.cuts.items() for lin in cut.linears}  # partial site
    in_maps = [_unit_map(name, "rows", units, ts) for name, ts in per_linear.items() if name not in cut_of]
    # A projection that also computes other channels (one Linear for q, k, v and the MLP
    # hidden, split by sizes the model computes from its attributes) cannot return fewer rows:
    # the model's split would fail. Such a site is not converted (it could not run sliced).
    widths = {n.linear: n.shape[-1] for n in in_nodes.values()}
    mixed = [m.linear for m in in_maps if sum(len(m.indices(u)) for u in range(units)) < widths[m.linear]]
    # A mask given per head fits a sliced call only if the model builds it with the lowered
    # head count (inside the attention module); one built outside keeps every head. Convert
    # tells the two apart by running the fast path once (verify.py).
    mask = call.output.arg(3, "attn_mask") if call.output.kind == "attention" else None
    per_head_mask = isinstance(mask, OpNode) and bool(mask.shape) and len(mask.shape) == 4 and mask.shape[1] == heads
    cut_maps = [_unit_map(mod, "rows", units, [_per_unit(cut.table, units)]) for mod, cut in layout.cuts.items()]
    out_maps = [_unit_map(t.node.linear, "cols", units, [_per_unit(t.table, units)], t.keep) for t in targets]
    stride = _kv_stride(layout, q_shape[0])
    streams = sorted(_streams(layout, targets, stride), key=lambda s: not s.out)  # one with an out first
    first, more = streams[0], streams[1:]
    out_lin = next((t.node for t in targets if t.node.linear == first.out), targets[0].node)
    out_maps.sort(key=lambda m: m.linear != out_lin.linear)  # the first stream's map first
    q_lin = layout.sources["q"][0].node
    k_lin = layout.sources["k"][0].node
    # The site's module: the deepest module whose forward runs all five ops (its head-count
    # attributes are lowered on the fast path), else the deepest common module path.
    ops = [call.output, *in_nodes.values(), *out_nodes]
    name = call_lca(*ops) if all(n.stack for n in ops) else ""
    name = name or module_lca(call.output.module, *(n.linear for n in ops[1:]))
    module = model.get_submodule(name) if name else model
    where = call.output.module
    inner = where[len(name) + 1 :] if name and where.startswith(name + ".") else (where if not name else "")
    attrs, known = attention_attrs(module, heads, head_dim, inner, kv_heads=units)
    # Self-attention: one fused projection, or q and k computed from the same tensor.
    self_attn = q_lin is k_lin or q_lin.args[0] is k_lin.args[0] or len(streams) > 1
    site = AttentionSite(
        name=name,
        block=block_of(name),
        module_class=f"{type(module).__module__}.{type(module).__qualname__}",
        kind="self" if self_attn else "cross",
        heads=heads,
        kv_heads=units if units != heads else 0,
        head_dim=head_dim,
        v_head_dim=v_head_dim,
        q=first.q,
        k=first.k,
        v=first.v,
        out=first.out,
        q_in=first.q_in,
        kv_in=first.kv_in,
        v_in=first.v_in,
        out_features=first.out_features,
        tokens_q=first.tokens_q,
        tokens_kv=first.tokens_kv,
        in_maps=in_maps,
        out_map=out_maps[0],
        more_out_maps=out_maps[1:],
        streams=more,
        cut_maps=cut_maps,
        unsliced=sorted(cut_of),
        gate=gates[0].node.linear if gates else "",
        gate_in=gates[0].node.args[0].shape[-1] if gates else 0,
        gate_rows=gates[0].node.shape[-1] if gates else 0,
        linear_macs=sum(node_macs(c) for c in call.cost_nodes) // q_shape[0] if linear else 0,
        kv_stride=stride,
        between=sorted({n.op for n in layout.ops if n.kind not in ("shape", "cast")}),
        head_attrs=attrs,
        fast=not mixed,
        # Head-count attributes found by a scan, not the registry, ops beyond reshapes between
        # the projections and the attention, or a mask given per head (it fits the sliced call
        # only when the model repeats it with the lowered head count, as diffusers'
        # prepare_attention_mask does): convert checks the fast path against the masked path
        # once (verify.py) before trusting it.
        fast_reason=(
            f"{mixed[0]} also computes channels that are not heads (a fused input projection)"
            if mixed
            else (
                ""
                if known and layout.trivial and not per_head_mask and not linear and not call.scores_extra
                and not call.kernel
                else "unverified"
            )
        ),
    )
    kernel_macs = 0
    if call.kernel:  # (B, H, N, d) q, (B, H, M, d) k, (B, H, M, dv) v, whatever the layout
        to_bhnd = (lambda t: t) if call.q_layout == "bhnd" else (lambda t: (t[0], t[2], t[1], t[3]))
        b, h, n, d = to_bhnd(q_shape)
        m = to_bhnd(call.k.shape)[2]
        kernel_macs = b * h * n * m * (d + v_head_dim)
    return FoundAttention(site, None, [*in_nodes.values(), *out_nodes], layout.tables, kernel_macs)


def _grouped_layout(
    call: AttentionCall, heads: int, k_heads: int, order: dict[int, int], from_linear: set[int]
) -> tuple[InputLayout, int]:
    """The input layout and the number of routed units: one per head, or one per key/value
    head when key/value heads are shared (fewer key heads, or each repeated to g query heads)."""

    def derive(units: int | None) -> InputLayout:
        return derive_inputs(
            call.q, call.k, call.v, call.key_layout, order, from_linear, units, call.q_layout, call.v_layout
        )

    if k_heads != heads:  # the kernel takes fewer key/value heads (enable_gqa)
        return derive(k_heads), k_heads
    try:
        return derive(None), heads
    except ChainError as e:
        if "feeds several heads" not in e.reason:
            raise
        for g in range(2, heads + 1):  # repeated to H: try groups of 2, 3, ... query heads
            if heads % g:
                continue
            try:
                layout = derive(heads // g)
            except ChainError:
                continue
            return layout, heads // g
        raise


def _per_unit(table: torch.Tensor, units: int) -> torch.Tensor:
    """A source's (rows, d) index table as (units, size): a query or output table of H rows
    joins the g heads of each unit; a key/value table repeated to H rows keeps one copy (the
    replay checked that the copies hold the same rows)."""
    rows = table.shape[0]
    if rows == units:
        return table
    grouped = table.reshape(units, rows // units, -1)  # (units, g, d)
    if bool((grouped == grouped[:, :1]).all()):  # a repeated key/value head
        return grouped[:, 0]
    return grouped.reshape(units, -1)


def _ascending(table: torch.Tensor) -> bool:
    """Whether an (H, dv) column table lists its columns in increasing order, head-major."""
    flat = table.reshape(-1)
    return bool((flat[1:] > flat[:-1]).all())


def _kv_stride(layout: InputLayout, batch: int) -> int:
    """Projection tokens per attention key: 1, or the factor by which keys and values are
    downsampled between their projections and the attention (key/value compression), read as
    the rows a Linear computes per position it fills and per row of the attention's ``batch``
    (so an axis folded into the batch, or a sequence-first layout, counts as it should).

    Queries must reach the attention one projection row per query, and keys and values a
    whole number of rows per key: anything else (queries resampled, a context repeated to
    every frame) would be miscounted, and is refused."""

    def ratio(s: Source) -> Fraction:
        return Fraction(math.prod(s.node.shape[:-1]), len(s.tokens) * batch)

    q = {ratio(s) for s in layout.sources["q"]}
    if q != {1}:
        raise ChainError(
            f"the queries are resampled between their projection and the attention ({min(q)} "
            "projection rows per query): their cost could not be counted"
        )
    found = {ratio(s) for role in "kv" for s in layout.sources[role]}
    if len(found) != 1:
        raise ChainError("keys and values are resampled by different factors before the attention")
    stride = found.pop()
    if stride.denominator != 1:
        raise ChainError(
            f"keys and values are repeated or broadcast between their projections and the attention "
            f"({stride} projection rows per key): their cost could not be counted"
        )
    return int(stride)


def _streams(layout: InputLayout, targets: list[OutTarget], stride: int = 1) -> list[AttentionStream]:
    """Group the projections into streams: those filling the same sequence positions
    (``stride``: projection tokens per attention key, see :func:`_kv_stride`).

    Self-attention has one stream (q, k and v fill every position); cross-attention one stream
    whose k and v fill the context's positions; joint attention one stream per projection set,
    and a stream of keys and values only for a context that is attended to but has no queries.
    """
    qs, ks, vs = layout.sources["q"], layout.sources["k"], layout.sources["v"]
    if len(qs) == 1 and len(ks) == 1 and len(vs) == 1 and len(targets) == 1:
        pairs = [(qs[0], ks[0], vs[0], targets[0])]
    else:
        pairs = []
        used_k, used_v, used_o = set(), set(), set()

        def partner(q: Source, found: list[Source], used: set[int]) -> Source | None:
            # The projection reading the same input tensor (PRX's image queries attend over
            # text keys, then the image's own keys), else the one filling the same positions.
            free = [s for s in found if id(s) not in used]
            return next((s for s in free if s.node.args[0] is q.node.args[0]), None) or next(
                (s for s in free if s.tokens == q.tokens), None
            )

        for q in qs:
            k, v = partner(q, ks, used_k), partner(q, vs, used_v)
            o = next((t for t in targets if t.tokens == q.tokens and id(t) not in used_o), None)
            if k is None or v is None:
                raise ChainError("joint attention streams whose q, k and v fill different tokens")
            used_k.add(id(k))
            used_v.add(id(v))
            if o is not None:
                used_o.add(id(o))
            pairs.append((q, k, v, o))
        # Keys and values of a stream with no queries (a context attended to, not attending).
        for k in [s for s in ks if id(s) not in used_k]:
            v = next((s for s in vs if id(s) not in used_v and s.tokens == k.tokens), None)
            if v is None:
                raise ChainError("extra key tokens with no values of their own")
            used_k.add(id(k))
            used_v.add(id(v))
            pairs.append((None, k, v, None))
        if len(used_v) != len(vs):
            raise ChainError("extra value tokens with no keys of their own")
        if len(used_o) != len(targets):
            raise ChainError("an out-projection reads tokens of several streams")
    out = []
    for q, k, v, o in pairs:
        out.append(
            AttentionStream(
                q=q.node.linear if q is not None else "",
                k=k.node.linear,
                v=v.node.linear,
                out=o.node.linear if o is not None else "",
                q_in=q.node.args[0].shape[-1] if q is not None else 0,
                kv_in=k.node.args[0].shape[-1],
                out_features=o.node.shape[-1] if o is not None else 0,
                tokens_q=len(q.tokens) if q is not None else 0,
                tokens_kv=len(k.tokens) * stride,
                v_in=v.node.args[0].shape[-1] if v.node.args[0].shape[-1] != k.node.args[0].shape[-1] else 0,
            )
        )
    if not any(s.out for s in out):
        raise ChainError("no stream of the joint attention has an out-projection")
    return out
