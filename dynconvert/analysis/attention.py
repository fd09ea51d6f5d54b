"""Find attention sites in an OpGraph: the call, its q/k/v projections and out-projection.

Row layouts are read, not guessed: the ops between each projection and the attention call are
replayed on a tensor of row numbers (layout.py), so a fused qkv, separate q/k/v Linears or any
reshaping code give the exact rows of every (head, channel). A site is refused, with the reason,
wherever removing a head would not be the same as zeroing it (design.md, "Traps").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dynconvert.analysis.graph import OpGraph, OpNode, block_of, call_lca, module_lca
from dynconvert.analysis.layout import (
    ChainError,
    as_parts,
    head_table,
    index_tensor,
    replay,
    trace_back,
    trace_forward,
)
from dynconvert.analysis.registry import attention_attrs
from dynconvert.plan import AttentionSite, SkippedSite, UnitMap


@dataclass
class AttentionCall:
    """One attention computation: fused (sdpa) or written out (matmul, softmax, matmul)."""

    output: OpNode  # (B, H, N, dv): the sdpa call, or the probabilities @ v matmul
    q: OpNode  # (B, H, N, d)
    k: OpNode  # (B, H, M, d), or (B, H, d, M) when the key is transposed for q @ k^T
    v: OpNode  # (B, H, M, dv)
    key_layout: str  # "bhnd" for sdpa, "bhdn" for q @ k^T
    cost_nodes: list[OpNode] = field(default_factory=list)  # the ops holding QK^T and AV


def find_calls(graph: OpGraph) -> list[AttentionCall]:
    """Every attention call of the graph, in execution order."""
    calls: list[AttentionCall] = []
    for n in graph.nodes:
        if n.kind == "attention":  # scaled_dot_product_attention(q, k, v, ...)
            q, k, v = n.args[0], n.args[1], n.args[2]
            calls.append(AttentionCall(output=n, q=q, k=k, v=v, key_layout="bhnd", cost_nodes=[n]))
        elif n.kind == "softmax":  # written out: softmax(q @ k^T * scale) @ v
            call = _manual_call(n)
            if call is not None:
                calls.append(call)
    return calls


def _manual_call(softmax: OpNode) -> AttentionCall | None:
    """The written-out attention around ``softmax``, or None when it is some other softmax."""
    # Back from the softmax to the score matmul (through scaling, masking, casts).
    cur = softmax.args[0] if softmax.args and isinstance(softmax.args[0], OpNode) else None
    while cur is not None and cur.kind in ("binary", "cast", "unary"):
        cur = next((i for i in cur.inputs if i.kind not in ("param",)), None)
    if cur is None or cur.kind != "matmul" or cur.op not in ("matmul", "bmm", "__matmul__"):
        return None
    scores = cur  # q @ k^T: (B, H, N, M)
    # Forward from the softmax to the value matmul (through dropout and casts).
    nxt = softmax
    while True:
        users = nxt.real_users
        if len(users) != 1:
            return None
        nxt = users[0]
        if nxt.kind == "matmul" and nxt.args[0] is not None:
            break
        if nxt.kind not in ("cast", "unary"):
            return None
    if nxt.op not in ("matmul", "bmm", "__matmul__"):
        return None
    q, k = scores.args[0], scores.args[1]
    v = nxt.args[1]
    if not all(isinstance(a, OpNode) for a in (q, k, v)):
        return None
    return AttentionCall(output=nxt, q=q, k=k, v=v, key_layout="bhdn", cost_nodes=[scores, nxt])


@dataclass
class FoundAttention:
    """An attention site, or the call refused with the reason, and the Linear nodes it takes."""

    site: AttentionSite | None
    skipped: SkippedSite | None
    linear_nodes: list[OpNode]


def build_site(
    call: AttentionCall, model: torch.nn.Module, reuse: dict[str, list[OpNode]]
) -> FoundAttention:
    """Derive one AttentionSite from an attention call, or the reason it cannot be converted.

    Args:
        call: The attention call.
        model: The model the graph was captured from (for the attention module and its class).
        reuse: Linear fqn -> the nodes that call it (a Linear called twice cannot be sliced).
    """
    where = call.output.module or "<root>"
    try:
        return _build(call, model, reuse)
    except ChainError as e:
        return FoundAttention(None, SkippedSite(where, "attention", e.reason), [])


def _unit_map(linear: str, axis: str, units: int, tables: list[torch.Tensor]) -> UnitMap:
    """A UnitMap from one (units, size) index table per part: regular parts where every table
    is ``base + u * stride + j``, else the explicit indices."""
    parts = [as_parts(t) for t in tables]
    if any(p is None for p in parts):
        return UnitMap(linear=linear, axis=axis, units=units, explicit=[t.tolist() for t in tables])
    return UnitMap(linear=linear, axis=axis, units=units, parts=parts)


def _build(
    call: AttentionCall, model: torch.nn.Module, reuse: dict[str, list[OpNode]]
) -> FoundAttention:
    q_shape = call.q.shape  # (B, H, N, d)
    if q_shape is None or len(q_shape) != 4:
        raise ChainError("attention operands are not (batch, heads, tokens, dim) tensors")
    heads, head_dim = q_shape[1], q_shape[3]
    k_shape = call.k.shape
    k_heads = k_shape[1] if k_shape is not None and len(k_shape) == 4 else -1
    if k_heads != heads:  # a key head serves several query heads: heads cannot go one by one
        raise ChainError(f"grouped kv heads ({k_heads} key heads for {heads} query heads)")
    if heads < 2:
        raise ChainError("a single head: nothing to route")
    v_head_dim = call.v.shape[-1]

    # Input side: replay the ops from each projection to the attention on a tensor of row
    # numbers, shaped like the projection's output (..., rows). What arrives at the attention
    # is (B, H, N, d); head_table reduces it to (H, d), the row feeding channel j of head h.
    tables: dict[str, tuple[OpNode, torch.Tensor]] = {}
    for role, operand in (("q", call.q), ("k", call.k), ("v", call.v)):
        lin, chain, _ = trace_back(operand, head_dim if role != "v" else v_head_dim)
        if lin.linear is None:
            raise ChainError(f"the {role} projection is not an nn.Linear module")
        value = replay(chain, lin, index_tensor(lin.shape))
        layout = call.key_layout if role == "k" else "bhnd"
        tables[role] = (lin, head_table(value, layout))

    # Output side: give channel j of head h in the attention output (B, H, N, dv) the code
    # h * dv + j and replay the ops to the out-projection: each of its input columns then
    # holds the code of the (head, channel) it reads.
    out_lin, out_chain = trace_forward(call.output)
    if out_lin.linear is None:
        raise ChainError("the out-projection is not an nn.Linear module")
    out_shape = call.output.shape
    code = torch.arange(heads * v_head_dim).view(1, heads, 1, v_head_dim).expand(*out_shape)
    cols = replay(out_chain, call.output, code.contiguous())  # (B, N, H * dv) usually
    flat = cols.reshape(-1, cols.shape[-1])  # (B * N, columns)
    if not torch.equal(flat, flat[:1].expand_as(flat)):
        raise ChainError("the out-projection columns differ across tokens")
    col_code = flat[0]  # column -> code
    every_code = torch.arange(heads * v_head_dim)
    if col_code.numel() != heads * v_head_dim or not torch.equal(
        col_code.sort().values, every_code
    ):
        raise ChainError("the out-projection input holds channels that are not attention heads")
    out_table = torch.empty(heads * v_head_dim, dtype=torch.long)  # code -> column
    out_table[col_code] = torch.arange(col_code.numel())
    out_table = out_table.view(heads, v_head_dim)  # (H, dv): column of channel j of head h

    # Slicing rewrites each Linear for this site alone: a shared Linear would be cut for two.
    linears = [tables["q"][0], tables["k"][0], tables["v"][0], out_lin]
    for ln in {id(n): n for n in linears}.values():
        if len(reuse.get(ln.linear, [])) > 1:
            raise ChainError(f"{ln.linear} is called more than once per forward (shared module)")
    if out_lin.linear in {tables[r][0].linear for r in "qkv"}:
        raise ChainError("the out-projection is also an input projection")

    # One UnitMap per distinct input Linear: a fused qkv gets three parts (q, k, v rows of a
    # head), separate projections one part each. Units are heads.
    per_linear: dict[str, list[torch.Tensor]] = {}
    for role in "qkv":
        lin, table = tables[role]
        per_linear.setdefault(lin.linear, []).append(table)
    in_maps = [_unit_map(name, "rows", heads, ts) for name, ts in per_linear.items()]
    out_map = _unit_map(out_lin.linear, "cols", heads, [out_table])

    q_lin, k_lin, v_lin = tables["q"][0], tables["k"][0], tables["v"][0]
    # The site's module: the deepest module whose forward runs all five ops (its head-count
    # attributes are lowered on the fast path), else the deepest common module path.
    ops = [call.output, q_lin, k_lin, v_lin, out_lin]
    name = call_lca(*ops) if all(n.stack for n in ops) else ""
    name = name or module_lca(
        call.output.module, q_lin.linear, k_lin.linear, v_lin.linear, out_lin.linear
    )
    module = model.get_submodule(name) if name else model
    attrs, known = attention_attrs(module, heads, head_dim)
    # Self-attention: one fused projection, or q and k computed from the same tensor.
    self_attn = q_lin is k_lin or q_lin.args[0] is k_lin.args[0]
    site = AttentionSite(
        name=name,
        block=block_of(name),
        module_class=f"{type(module).__module__}.{type(module).__qualname__}",
        kind="self" if self_attn else "cross",
        heads=heads,
        head_dim=head_dim,
        v_head_dim=v_head_dim,
        q=q_lin.linear,
        k=k_lin.linear,
        v=v_lin.linear,
        out=out_lin.linear,
        q_in=q_lin.args[0].shape[-1],
        kv_in=k_lin.args[0].shape[-1],
        out_features=out_lin.shape[-1],
        tokens_q=q_shape[2],
        tokens_kv=k_shape[2] if call.key_layout == "bhnd" else k_shape[3],
        in_maps=in_maps,
        out_map=out_map,
        head_attrs=attrs,
        fast=True,
        # Head-count attributes found by a scan, not the registry: convert checks the fast
        # path against the masked path once (verify.py) before trusting it.
        fast_reason="" if known else "unverified",
    )
    return FoundAttention(site, None, [q_lin, k_lin, v_lin, out_lin])
