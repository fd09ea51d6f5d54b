"""Find attention sites in an OpGraph: the call, its q/k/v projections and out-projection."""

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

    output: OpNode
    q: OpNode
    k: OpNode
    v: OpNode
    key_layout: str  # "bhnd" for sdpa, "bhdn" for q @ k^T
    cost_nodes: list[OpNode] = field(default_factory=list)


def find_calls(graph: OpGraph) -> list[AttentionCall]:
    """Every attention call of the graph, in execution order."""
    calls: list[AttentionCall] = []
    for n in graph.nodes:
        if n.kind == "attention":
            q, k, v = n.args[0], n.args[1], n.args[2]
            calls.append(AttentionCall(output=n, q=q, k=k, v=v, key_layout="bhnd", cost_nodes=[n]))
        elif n.kind == "softmax":
            call = _manual_call(n)
            if call is not None:
                calls.append(call)
    return calls


def _manual_call(softmax: OpNode) -> AttentionCall | None:
    # Back from the softmax to the score matmul (through scaling, masking, casts).
    cur = softmax.args[0] if softmax.args and isinstance(softmax.args[0], OpNode) else None
    while cur is not None and cur.kind in ("binary", "cast", "unary"):
        cur = next((i for i in cur.inputs if i.kind not in ("param",)), None)
    if cur is None or cur.kind != "matmul" or cur.op not in ("matmul", "bmm", "__matmul__"):
        return None
    scores = cur
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
    site: AttentionSite | None
    skipped: SkippedSite | None
    call: AttentionCall
    linear_nodes: list[OpNode]


def build_site(call: AttentionCall, model: torch.nn.Module, reuse: dict[str, list[OpNode]]) -> FoundAttention:
    """Derive one AttentionSite from an attention call, or the reason it cannot be converted."""
    where = call.output.module or "<root>"
    try:
        return _build(call, model, reuse)
    except ChainError as e:
        return FoundAttention(None, SkippedSite(where, "attention", e.reason), call, [])


def _build(call: AttentionCall, model: torch.nn.Module, reuse: dict[str, list[OpNode]]) -> FoundAttention:
    q_shape = call.q.shape
    if q_shape is None or len(q_shape) != 4:
        raise ChainError("attention operands are not (batch, heads, tokens, dim) tensors")
    heads, head_dim = q_shape[1], q_shape[3]
    k_shape = call.k.shape
    k_heads = k_shape[1] if k_shape is not None and len(k_shape) == 4 else -1
    if k_heads != heads:
        raise ChainError(f"grouped kv heads ({k_heads} key heads for {heads} query heads)")
    if heads < 2:
        raise ChainError("a single head: nothing to route")
    v_head_dim = call.v.shape[-1]

    tables: dict[str, tuple[OpNode, torch.Tensor]] = {}
    for role, operand in (("q", call.q), ("k", call.k), ("v", call.v)):
        lin, chain, _ = trace_back(operand, head_dim if role != "v" else v_head_dim)
        if lin.linear is None:
            raise ChainError(f"the {role} projection is not an nn.Linear module")
        value = replay(chain, lin, index_tensor(lin.shape))
        layout = call.key_layout if role == "k" else "bhnd"
        tables[role] = (lin, head_table(value, layout))

    out_lin, out_chain = trace_forward(call.output)
    if out_lin.linear is None:
        raise ChainError("the out-projection is not an nn.Linear module")
    out_shape = call.output.shape
    code = torch.arange(heads * v_head_dim).view(1, heads, 1, v_head_dim).expand(*out_shape).contiguous()
    cols = replay(out_chain, call.output, code)
    flat = cols.reshape(-1, cols.shape[-1])
    if not torch.equal(flat, flat[:1].expand_as(flat)):
        raise ChainError("the out-projection columns differ across tokens")
    col_code = flat[0]
    if col_code.numel() != heads * v_head_dim or not torch.equal(col_code.sort().values, torch.arange(heads * v_head_dim)):
        raise ChainError("the out-projection input holds channels that are not attention heads")
    out_table = torch.empty(heads * v_head_dim, dtype=torch.long)
    out_table[col_code] = torch.arange(col_code.numel())
    out_table = out_table.view(heads, v_head_dim)

    linears = [tables["q"][0], tables["k"][0], tables["v"][0], out_lin]
    for ln in {id(n): n for n in linears}.values():
        if len(reuse.get(ln.linear, [])) > 1:
            raise ChainError(f"{ln.linear} is called more than once per forward (shared module)")
    if out_lin.linear in {tables[r][0].linear for r in "qkv"}:
        raise ChainError("the out-projection is also an input projection")

    in_maps: dict[str, UnitMap] = {}
    explicit: dict[str, list[torch.Tensor]] = {}
    for role in "qkv":
        lin, table = tables[role]
        name = lin.linear
        in_maps.setdefault(name, UnitMap(linear=name, axis="rows", units=heads))
        explicit.setdefault(name, []).append(table)
        part = as_parts(table)
        if part is None:
            in_maps[name].explicit = []  # mark; filled below
        else:
            in_maps[name].parts.append(part)
    for name, m in in_maps.items():
        if m.explicit is not None:
            m.parts = []
            m.explicit = [t.tolist() for t in explicit[name]]
    out_part = as_parts(out_table)
    out_map = UnitMap(linear=out_lin.linear, axis="cols", units=heads)
    if out_part is None:
        out_map.explicit = [out_table.tolist()]
    else:
        out_map.parts.append(out_part)

    q_lin, k_lin, v_lin = tables["q"][0], tables["k"][0], tables["v"][0]
    ops = [call.output, q_lin, k_lin, v_lin, out_lin]
    name = call_lca(*ops) if all(n.stack for n in ops) else ""
    name = name or module_lca(call.output.module, q_lin.linear, k_lin.linear, v_lin.linear, out_lin.linear)
    module = model.get_submodule(name) if name else model
    attrs, _known = attention_attrs(module, heads, head_dim)
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
        in_maps=list(in_maps.values()),
        out_map=out_map,
        head_attrs=attrs,
        fast=True,
        fast_reason="" if _known else "unverified",
    )
    return FoundAttention(site, None, call, [q_lin, k_lin, v_lin, out_lin])
