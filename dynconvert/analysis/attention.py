"""Find attention sites in an OpGraph: the call, its q/k/v projections and out-projection.

Row layouts are read, not guessed: the ops between each projection and the attention call are
replayed on a tensor of row numbers (layout.py), so a fused qkv, separate q/k/v Linears or any
reshaping code give the exact rows of every (head, channel). A site is refused, with the reason,
wherever removing a head would not be the same as zeroing it (docs/architecture.md, "Traps").

This module is the core every attention takes; the forms a call may take beyond it (a gate, key
and value compression, linear attention, a partial cut, per-head tables) are found by their own
rules in ``dynconvert/sites/`` (``<form>_find.py``), which read the ``Evidence`` gathered here
and return a ``Finding`` (evidence.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dynconvert.analysis.calls import AttentionCall
from dynconvert.analysis.evidence import Evidence, Finding, per_unit, unit_map
from dynconvert.analysis.graph import OpNode, block_of, call_lca, module_lca
from dynconvert.analysis.headlocal import InputLayout
from dynconvert.analysis.layout import ChainError, describe
from dynconvert.analysis.reduced import Deriver
from dynconvert.analysis.registry import attention_attrs
from dynconvert.analysis.replay import TableUse
from dynconvert.analysis.streams import group_streams, kv_stride
from dynconvert.plan import AttentionSite, SkippedSite, UnitMap
from dynconvert.sites import FINDERS, load


@dataclass
class FoundAttention:
    """An attention site, or the call refused with the reason, and the Linear nodes it takes."""

    site: AttentionSite | None
    skipped: SkippedSite | None
    linear_nodes: list[OpNode]
    tables: list[TableUse] = field(default_factory=list)  # per-head tensors (sites/table_find.py)
    kernel_macs: int = 0  # QK^T + AV of another library's kernel, which the graph cannot count


def build_site(
    call: AttentionCall,
    model: torch.nn.Module,
    reuse: dict[str, list[OpNode]],
    order: dict[int, int],
    from_linear: set[int],
    derive: Deriver | None = None,
) -> FoundAttention:
    """Derive one AttentionSite from an attention call, or the reason it cannot be converted.

    Args:
        call: The attention call.
        model: The model the graph was captured from (for the attention module and its class).
        reuse: Linear fqn -> the nodes that call it (a Linear called twice cannot be sliced).
        order: node id -> position in the graph.
        from_linear: ids of the nodes computed from some Linear (headlocal.linear_ancestry).
        derive: where head-locality is decided (reduced.py: on a probe, once per twin
            blocks); None: on this call's own ops.
    """
    where = call.output.module or "<root>"
    derive = derive or Deriver(None)
    try:
        return _build(call, model, reuse, order, from_linear, derive)
    except ChainError as e:
        if call.alt is not None:  # a kernel read in its other layout
            found = build_site(call.alt, model, reuse, order, from_linear, derive)
            if found.site is not None:
                return found
            op = call.cost_nodes[0].op
            why = f"`{op}` as (B, H, N, d): {e.reason}; as (B, N, H, d): {found.skipped.reason}"
            return FoundAttention(None, SkippedSite(where, "attention", why), [])
        # A fold read the wrong way round (heads-major, H x B) shows up as a layout problem.
        why = (
            f"heads folded into the batch, read as batch x heads: {e.reason}"
            if call.folded
            else e.reason
        )
        return FoundAttention(None, SkippedSite(where, "attention", why), [])


def _build(
    call: AttentionCall,
    model: torch.nn.Module,
    reuse: dict[str, list[OpNode]],
    order: dict[int, int],
    from_linear: set[int],
    derive: Deriver,
) -> FoundAttention:
    """The site of one call: its input and output sides, the checks every site passes, the
    forms' rules on what they found (dynconvert/sites), then the maps, streams and module."""
    heads, head_dim, v_head_dim, k_heads = _operand_sizes(call)
    layout, units = _input_layout(
        call, heads, head_dim, v_head_dim, k_heads, order, from_linear, derive
    )
    # Output side: every out-projection reading the attention output (one per stream), with
    # the input column of every (head, channel) and the columns that are not heads.
    targets, gates = derive.outputs(call, heads, v_head_dim, order)
    for t in targets:
        if t.keep and not _ascending(t.table):
            raise ChainError(
                "the out-projection mixes head channels with other channels in an irregular order"
            )
    # Slicing rewrites each Linear for this site alone: a shared Linear would be cut for two.
    in_nodes = {id(s.node): s.node for role in "qkv" for s in layout.sources[role]}
    out_nodes = [t.node for t in targets]
    _check_linears(list(in_nodes.values()), out_nodes, reuse)
    stride = kv_stride(layout, call.q.shape[0])
    projections = {s.node.linear for role in "qkv" for s in layout.sources[role]}
    findings = _find_forms(Evidence(call, layout, gates, units, stride, projections))
    extra = {id(n): n for f in findings for n, _ in f.inputs}
    _check_linears(list(extra.values()), out_nodes, reuse)
    in_nodes.update(extra)
    in_maps, mixed = _in_maps(layout, units, findings, in_nodes)
    out_maps = [
        unit_map(t.node.linear, "cols", units, [per_unit(t.table, units)], t.keep) for t in targets
    ]
    streams = sorted(group_streams(layout, targets, stride), key=lambda s: not s.out)
    first = streams[0]  # one with an out-projection first, and its map first
    out_lin = next((t.node for t in targets if t.node.linear == first.out), targets[0].node)
    out_maps.sort(key=lambda m: m.linear != out_lin.linear)
    name, module, inner = _site_module(call, model, [*in_nodes.values(), *out_nodes])
    attrs, known = attention_attrs(module, heads, head_dim, inner, kv_heads=units)
    q_lin, k_lin = layout.sources["q"][0].node, layout.sources["k"][0].node
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
        streams=streams[1:],
        between=sorted({n.op for n in layout.ops if n.kind not in ("shape", "cast")}),
        head_attrs=attrs,
        fast=not mixed,
        fast_reason=_fast_reason(
            call, layout, heads, mixed, known, any(f.unverified for f in findings)
        ),
        parts={f.part.kind: f.part for f in findings},
    )
    nodes = [*in_nodes.values(), *out_nodes]
    return FoundAttention(site, None, nodes, layout.tables, _kernel_macs(call, v_head_dim))


def _operand_sizes(call: AttentionCall) -> tuple[int, int, int, int]:
    """(query heads, query/key head width, value head width, key heads) of the call."""
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
    out_shape = call.output.shape or ()
    v_head_dim = out_shape[2] if call.out_layout == "bhdn" else out_shape[-1]  # per head
    return heads, head_dim, v_head_dim, k_heads


def _input_layout(
    call: AttentionCall,
    heads: int,
    head_dim: int,
    v_head_dim: int,
    k_heads: int,
    order: dict[int, int],
    from_linear: set[int],
    derive: Deriver,
) -> tuple[InputLayout, int]:
    """The input side and the routed units: the ops from the projections to q, k and v replayed
    on row codes give the rows of every (head, channel) per source Linear, and are checked for
    head-locality (headlocal.py): rotary embeddings, per-head norms and joint streams pass, a
    norm over all heads does not. Grouped-query attention (a key/value head serves g query
    heads, given to the kernel with fewer heads or repeated to H): the units are the key/value
    heads, each with its g query heads; the smallest g that passes is the grouping."""
    layout, units = _grouped_layout(call, heads, k_heads, order, from_linear, derive)
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
    return layout, units


def _check_linears(
    inputs: list[OpNode], outputs: list[OpNode], reuse: dict[str, list[OpNode]]
) -> None:
    """Slicing rewrites each Linear for this site alone: every projection must be an nn.Linear
    module called once per forward, and no out-projection an input projection too."""
    for ln in [*inputs, *outputs]:
        if ln.linear is None:
            raise ChainError(
                f"a projection of this attention ({describe(ln)}) is not an nn.Linear module"
            )
        if len(reuse.get(ln.linear, [])) > 1:
            raise ChainError(f"{ln.linear} is called more than once per forward (shared module)")
    if {n.linear for n in outputs} & {n.linear for n in inputs}:
        raise ChainError("the out-projection is also an input projection")


def _find_forms(ev: Evidence) -> list[Finding]:
    """Every registered form's rule on this call (dynconvert/sites), in name order."""
    load("find")
    found = [find(ev) for _, find in sorted(FINDERS.items())]
    return [f for f in found if f is not None]


def _in_maps(
    layout: InputLayout,
    units: int,
    findings: list[Finding],
    in_nodes: dict[int, OpNode],
) -> tuple[list[UnitMap], list[str]]:
    """One UnitMap per distinct input Linear (a fused qkv gets three parts: the q, k and v rows
    of a unit; separate projections one part each), and the projections that also compute
    channels that are not heads (``mixed``: the site cannot run sliced)."""
    per_linear: dict[str, list[torch.Tensor]] = {}
    for role in "qkv":
        for s in layout.sources[role]:
            per_linear.setdefault(s.node.linear, []).append(per_unit(s.table, units))
    for f in findings:  # more projections whose rows go with their head (a gate's)
        for node, table in f.inputs:
            per_linear[node.linear] = [table]
    full = {name for f in findings for name in f.full_width}  # a partial site's
    maps = [unit_map(n, "rows", units, ts) for n, ts in per_linear.items() if n not in full]
    # A projection that also computes other channels cannot return only the heads' rows: the
    # model's split would fail. Unless a form computes those rows beside the heads' (a fused
    # input projection, sites/fused_in_find.py), such a site is not converted.
    widths = {n.linear: n.shape[-1] for n in in_nodes.values()}
    shared = {name for f in findings for name in f.shared}
    mixed = [
        m.linear
        for m in maps
        if sum(len(m.indices(u)) for u in range(units)) < widths[m.linear]
        and m.linear not in shared
    ]
    return maps, mixed


def _site_module(
    call: AttentionCall, model: torch.nn.Module, linears: list[OpNode]
) -> tuple[str, torch.nn.Module, str]:
    """The site's module (the deepest module whose forward runs the attention and all its
    projections: its head-count attributes are lowered on the fast path; else the deepest
    common module path), the module, and the path below it of the one running the attention."""
    ops = [call.output, *linears]
    name = call_lca(*ops) if all(n.stack for n in ops) else ""
    name = name or module_lca(call.output.module, *(n.linear for n in linears))
    module = model.get_submodule(name) if name else model
    where = call.output.module
    if not name:
        return name, module, where
    return name, module, where[len(name) + 1 :] if where.startswith(name + ".") else ""


def _fast_reason(
    call: AttentionCall,
    layout: InputLayout,
    heads: int,
    mixed: list[str],
    known: bool,
    unverified: bool,
) -> str:
    """Why the fast path may not run here, or "unverified" until convert has checked it.

    Head-count attributes found by a scan, not the registry, ops beyond reshapes between the
    projections and the attention, a mask given per head (it fits the sliced call only when the
    model repeats it with the lowered head count, as diffusers' prepare_attention_mask does;
    one built outside keeps every head), scores joined by another tensor, another library's
    kernel, or a form that asks for it: convert checks the fast path against the masked path
    once (verify.py) before trusting it.
    """
    if mixed:
        return f"{mixed[0]} also computes channels that are not heads (a fused input projection)"
    mask = call.output.arg(3, "attn_mask") if call.output.kind == "attention" else None
    per_head_mask = (
        isinstance(mask, OpNode)
        and bool(mask.shape)
        and len(mask.shape) == 4
        and mask.shape[1] == heads
    )
    trusted = known and layout.trivial and not per_head_mask and not call.scores_extra
    return "" if trusted and not unverified and not call.kernel else "unverified"


def _kernel_macs(call: AttentionCall, v_head_dim: int) -> int:
    """QK^T + AV of another library's kernel (the graph cannot count it), else 0."""
    if not call.kernel:
        return 0
    # (B, H, N, d) q, (B, H, M, d) k, (B, H, M, dv) v, whatever the layout
    to_bhnd = (lambda t: t) if call.q_layout == "bhnd" else (lambda t: (t[0], t[2], t[1], t[3]))
    b, h, n, d = to_bhnd(call.q.shape)
    m = to_bhnd(call.k.shape)[2]
    return b * h * n * m * (d + v_head_dim)


def _grouped_layout(
    call: AttentionCall,
    heads: int,
    k_heads: int,
    order: dict[int, int],
    from_linear: set[int],
    deriver: Deriver,
) -> tuple[InputLayout, int]:
    """The input layout and the number of routed units: one per head, or one per key/value
    head when key/value heads are shared (fewer key heads, or each repeated to g query heads)."""

    def derive(units: int | None) -> InputLayout:
        return deriver.inputs(call, units, order, from_linear)

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


def _ascending(table: torch.Tensor) -> bool:
    """Whether an (H, dv) column table lists its columns in increasing order, head-major."""
    flat = table.reshape(-1)
    return bool((flat[1:] > flat[:-1]).all())
