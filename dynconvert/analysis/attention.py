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

import torch

from dynconvert.analysis.calls import AttentionCall
from dynconvert.analysis.costs import node_macs
from dynconvert.analysis.graph import OpNode, block_of, call_lca, module_lca
from dynconvert.analysis.headlocal import InputLayout, Source, derive_inputs
from dynconvert.analysis.headout import OutTarget, derive_outputs
from dynconvert.analysis.layout import ChainError, as_parts, describe
from dynconvert.analysis.registry import attention_attrs
from dynconvert.analysis.replay import TableUse
from dynconvert.plan import AttentionSite, AttentionStream, SkippedSite, UnitMap


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
        why = (
            f"heads folded into the batch, read as batch x heads: {e.reason}"
            if call.folded
            else e.reason
        )
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
    v_head_dim = (
        out_shape[2] if call.out_layout == "bhdn" else out_shape[-1]
    )  # channels a head returns

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
            raise ChainError(
                f"a projection of this attention ({describe(ln)}) is not an nn.Linear module"
            )
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
    in_maps = [
        _unit_map(name, "rows", units, ts) for name, ts in per_linear.items() if name not in cut_of
    ]
    # A projection that also computes other channels (one Linear for q, k, v and the MLP
    # hidden, split by sizes the model computes from its attributes) cannot return fewer rows:
    # the model's split would fail. Such a site is not converted (it could not run sliced).
    widths = {n.linear: n.shape[-1] for n in in_nodes.values()}
    mixed = [
        m.linear for m in in_maps if sum(len(m.indices(u)) for u in range(units)) < widths[m.linear]
    ]
    # A mask given per head fits a sliced call only if the model builds it with the lowered
    # head count (inside the attention module); one built outside keeps every head. Convert
    # tells the two apart by running the fast path once (verify.py).
    mask = call.output.arg(3, "attn_mask") if call.output.kind == "attention" else None
    per_head_mask = (
        isinstance(mask, OpNode)
        and bool(mask.shape)
        and len(mask.shape) == 4
        and mask.shape[1] == heads
    )
    cut_maps = [
        _unit_map(mod, "rows", units, [_per_unit(cut.table, units)])
        for mod, cut in layout.cuts.items()
    ]
    out_maps = [
        _unit_map(t.node.linear, "cols", units, [_per_unit(t.table, units)], t.keep)
        for t in targets
    ]
    stride = _kv_stride(layout, q_shape[0])
    streams = sorted(
        _streams(layout, targets, stride), key=lambda s: not s.out
    )  # one with an out first
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
    inner = (
        where[len(name) + 1 :]
        if name and where.startswith(name + ".")
        else (where if not name else "")
    )
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
                if known
                and layout.trivial
                and not per_head_mask
                and not linear
                and not call.scores_extra
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
            call.q,
            call.k,
            call.v,
            call.key_layout,
            order,
            from_linear,
            units,
            call.q_layout,
            call.v_layout,
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


def _streams(
    layout: InputLayout, targets: list[OutTarget], stride: int = 1
) -> list[AttentionStream]:
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
                v_in=v.node.args[0].shape[-1]
                if v.node.args[0].shape[-1] != k.node.args[0].shape[-1]
                else 0,
            )
        )
    if not any(s.out for s in out):
        raise ChainError("no stream of the joint attention has an out-projection")
    return out
