"""Attention calls in an OpGraph: where q, k and v meet, in every form the finder reads.

- ``scaled_dot_product_attention`` (B, H, N, d);
- softmax(q k^T) v written out with matmul / bmm / baddbmm or einsum, in any dtype, with the
  heads folded into the batch (diffusers' classic AttnProcessor) seen through;
- linear (kernel) attention, (pad(v) @ k) @ q channels first (Sana);
- another library's attention kernel (flash-attn, xformers, flex attention, a custom op), read
  as (B, H, N, d) or (B, N, H, d).

attention.py turns each call into a site (or a refusal with its reason).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from dynconvert.analysis.graph import OpGraph, OpNode
from dynconvert.analysis.replay import replay_chain


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
    out = (
        n
        if n.shape is not None
        else next(
            (u for u in n.real_users if u.op == "getitem" and len(u.args) > 1 and u.args[1] == 0),
            None,
        )
    )
    if (
        out is None
        or out.shape is None
        or tuple(out.shape[:3]) != tuple(q.shape[:3])
        or out.shape[3] != v.shape[3]
    ):
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
    if (
        out.op not in ("matmul", "__matmul__")
        or not isinstance(first, OpNode)
        or first.kind != "matmul"
    ):
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
        if (
            n.shape
            and len(n.shape) == 4
            and n.shape[:2] == out.shape[:2]
            and all(id(i) in inside or i.kind in ("param", "const") for i in n.inputs)
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
    if (
        cur is None
        or cur.kind != "matmul"
        or cur.op not in ("matmul", "bmm", "__matmul__", "baddbmm")
    ):
        return None
    scores = cur  # q @ k^T: (B, H, N, M), or (B * H, N, M) with the heads folded into the batch
    nxt = _value_product(softmax, lambda n: n.kind == "matmul" and n.args[0] is not None)
    if nxt is None or nxt.op not in ("matmul", "bmm", "__matmul__"):
        return None
    # baddbmm(mask, q, k^T, beta, alpha): diffusers' classic AttnProcessor adds the mask there.
    q, k = (
        (scores.args[1], scores.args[2])
        if scores.op == "baddbmm"
        else (scores.args[0], scores.args[1])
    )
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
        output=out4,
        q=q4,
        k=k4,
        v=v4,
        key_layout=layout,
        cost_nodes=cost,
        scores_extra=extra,
        folded=True,
    )


def _fold_chain(start: OpNode, end: OpNode, chain: list[OpNode], expected: torch.Tensor) -> bool:
    """Whether the shape ops ``chain`` (from ``start`` to ``end``) move the index tensor of
    ``start`` into ``expected``."""
    got = replay_chain(start, torch.arange(math.prod(start.shape)).reshape(start.shape), chain)
    return (
        isinstance(got, torch.Tensor) and got.shape == expected.shape and torch.equal(got, expected)
    )


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
        if (
            cur.shape is not None
            and len(cur.shape) == 4
            and cur.shape[0] * cur.shape[1] == x.shape[0]
        ):
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
        if (
            cur.shape is not None
            and len(cur.shape) == 4
            and cur.shape[0] * cur.shape[1] == out.shape[0]
        ):
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
    ops = (
        list(node.args[1])
        if len(node.args) > 1 and isinstance(node.args[1], (list, tuple))
        else list(node.args[1:])
    )
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
    if (
        c in out
        or c not in ks
        or len(extra) != 1
        or qs[:2] != ks[:2]
        or out != qs[:3] + extra.pop()
    ):
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
