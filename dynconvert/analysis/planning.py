"""From a captured graph to a Plan: find the sites, number the kept ones, and cost the model.

:func:`plan_from_graph` runs the finders in order: attention calls first (their q/k/v and
out-projection Linears are then not offered to the MLP finder), then Linear and convolutional
MLPs inside the blocks that hold attention, then the user's exclusions; every candidate left out
is listed in ``Plan.skipped`` with its reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dynconvert.analysis import attention as attn_finder
from dynconvert.analysis import convmlp as conv_finder
from dynconvert.analysis import mlp as mlp_finder
from dynconvert.analysis.calls import find_calls
from dynconvert.analysis.costs import eager_macs, node_macs
from dynconvert.analysis.graph import (
    EXPORT_CAPTURE,
    OpGraph,
    OpNode,
    block_of,
    untie_impure_linears,
)
from dynconvert.analysis.headlocal import linear_ancestry
from dynconvert.analysis.meta import meta_eager
from dynconvert.analysis.reduced import Deriver
from dynconvert.analysis.registry import timestep_convention
from dynconvert.config import ConvertConfig
from dynconvert.inputs import batch_of, eval_mode, shapes_of, timestep_slot
from dynconvert.plan import ATTENTION, MLP, AttentionSite, MlpSite, Plan, SkippedSite, site_kind
from dynconvert.sites import table_find

FilterFn = Callable[[torch.nn.Module, str], bool]
"""``filter_fn(module, name) -> bool``: False leaves the site at ``name`` unconverted."""


@dataclass
class _Found:
    """What the finders have found so far in one graph."""

    attention: list[tuple[int, AttentionSite]] = field(default_factory=list)  # (position, site)
    mlp: list[tuple[int, MlpSite]] = field(default_factory=list)
    skipped: list[SkippedSite] = field(default_factory=list)
    taken: set[str] = field(default_factory=set)  # Linears claimed: no second site routes them
    # Heads of every block's first attention call, converted or not: a block whose attention is
    # refused (qk-norm across all heads) is still a transformer block, and its MLP a site.
    block_heads: dict[str, int] = field(default_factory=dict)
    kernel_macs: dict[int, int] = field(default_factory=dict)  # site -> another library's kernel
    orphans: dict[str, None] = field(default_factory=dict)  # blocks with an MLP, no attention


def plan_from_graph(
    model: torch.nn.Module,
    graph: OpGraph,
    args: tuple,
    kwargs: dict,
    timestep_arg: str,
    config: ConvertConfig,
    filter_fn: FilterFn | None = None,
    derive: Deriver | None = None,
) -> Plan:
    """Turn a captured graph into a Plan (sites, skipped sites, costs).

    ``derive`` decides head-locality (reduced.py: on a probe at a few tokens, once per group
    of twin blocks); None: on every call's own ops.

    Example:
        >>> from dynconvert.analysis import capture
        >>> from dynconvert.testing import tiny_dit
        >>> model = tiny_dit()
        >>> x = model.example_inputs(2)
        >>> plan = plan_from_graph(model, capture(model, x, {}), x, {}, "t", ConvertConfig())
        >>> [s.index for s in plan.sites]
        [0, 1, 2, 3]
    """
    untie_impure_linears(graph, model)  # a module running F.linear on its weight, and only that
    reuse = graph.linear_nodes()  # Linear fqn -> its calls; a Linear called twice is not sliced
    order = {id(n): i for i, n in enumerate(graph.nodes)}  # node -> position in execution order
    batch = batch_of(args, kwargs)
    found = _Found()
    derive = derive or Deriver(None)
    _find_attention(found, model, graph, (args, kwargs), reuse, order, derive)
    _find_mlps(found, model, graph, config, reuse, order, batch)
    kept_attn, kept_mlp = _number_sites(found, model, config, filter_fn)
    skipped = found.skipped
    if not kept_attn and not kept_mlp and not skipped:
        skipped = _why_nothing(model, graph)  # never "nothing found and nothing skipped"
    # A block whose MLP was found but no attention call at all: say why for its attention too.
    skipped += [SkippedSite(b, ATTENTION, _why_no_attention(b, graph)) for b in found.orphans]

    # Costs: the graph's MACs are for the whole example batch, a site's macs() for one sample.
    # other_macs is what routing never changes (embeddings, final layer, skipped sites).
    static = sum(node_macs(n) for n in graph.nodes)
    static += sum(found.kernel_macs[id(a)] for _, a in found.attention)
    if graph.capture != EXPORT_CAPTURE:
        # A capture in pieces misses the ops of opaque leaves: count one eager forward instead.
        with torch.no_grad(), eval_mode(model), meta_eager(model):
            static = int(round(eager_macs(model, args, kwargs)))
    site_macs = sum(s.macs() for s in [*kept_attn, *kept_mlp])
    position, _ = timestep_slot(model, timestep_arg)
    example_t = kwargs.get(
        timestep_arg, args[position] if position is not None and position < len(args) else None
    )
    scale, reverse, convention = timestep_convention(
        model, example_t, config.timestep_scale, config.timestep_reverse
    )
    return Plan(
        model_class=f"{type(model).__module__}.{type(model).__qualname__}",
        timestep_arg=timestep_arg,
        capture=graph.capture,
        coverage="; ".join(c for c in (graph.coverage, derive.coverage()) if c),
        batch=batch,
        input_shapes=shapes_of(args, kwargs),
        attention=kept_attn,
        mlp=kept_mlp,
        skipped=skipped,
        static_macs=static,
        other_macs=static - site_macs * batch,
        timestep_scale=scale,
        timestep_reverse=reverse,
        timestep_convention=convention,
    )


def _find_attention(
    found: _Found,
    model: torch.nn.Module,
    graph: OpGraph,
    inputs: tuple[tuple, dict],
    reuse: dict[str, list[OpNode]],
    order: dict[int, int],
    derive: Deriver,
) -> None:
    """Every attention call of the graph: a site (its Linears then taken), or a refusal."""
    from_linear = linear_ancestry(graph.nodes)  # what a rotary table is not: computed from a Linear
    pending: list[
        tuple[Any, list]
    ] = []  # sites with per-head tables handed in (sites/table_find.py)
    claims: dict[int, set[str]] = {}  # site -> its Linears
    for call in find_calls(graph):
        if call.q.shape is not None and len(call.q.shape) == 4:
            found.block_heads.setdefault(block_of(call.output.module), call.q.shape[1])
        got = attn_finder.build_site(call, model, reuse, order, from_linear, derive)
        if got.site is None:
            found.skipped.append(got.skipped)
            continue
        got.site.fold = _fold(got.linear_nodes[0], batch_of(*inputs))
        if got.tables:
            pending.append((got.site, got.tables))
        found.attention.append((order[id(call.output)], got.site))
        claims[id(got.site)] = {n.linear for n in got.linear_nodes}
        found.kernel_macs[id(got.site)] = got.kernel_macs
    if pending:  # which argument each table is: one forward pass for all of them
        # The tables are in the terms of the graph head-locality was decided on (the probe's).
        on, (a, kw) = (derive.graph, derive.inputs_of_graph) if derive.to_real else (graph, inputs)
        failed = table_find.resolve(model, on, a, kw, pending)
        for _, site in [p for p in found.attention if id(p[1]) in failed]:
            found.skipped.append(SkippedSite(site.name, ATTENTION, failed[id(site)]))
        found.attention = [p for p in found.attention if id(p[1]) not in failed]
    for _, site in found.attention:
        found.taken.update(claims[id(site)])
    # The first attention site of each block: its head count is the MLP's default group count
    # (G = H, as the paper), and an MLP outside any such block (a timestep or caption embedding
    # MLP) is not a transformer MLP.
    for _, s in found.attention:
        found.block_heads.setdefault(s.block, s.heads)


def _find_mlps(
    found: _Found,
    model: torch.nn.Module,
    graph: OpGraph,
    config: ConvertConfig,
    reuse: dict[str, list[OpNode]],
    order: dict[int, int],
    batch: int,
) -> None:
    """Every Linear MLP, then every convolutional one, inside a block that holds attention."""
    # Out-projections of parallel blocks: the columns their attention leaves to the MLP.
    shared = {m.linear: m.keep for _, s in found.attention for m in s.out_maps if m.keep}
    shared_in = _rows_left(found, reuse)
    conv_fc2 = conv_finder.find_fc2_candidates(graph, model)
    conv_reuse: dict[str, list[Any]] = {}
    for n in graph.nodes:
        found_conv = conv_finder.conv_module(n, model) if n.kind == "conv" else None
        if found_conv is not None:
            conv_reuse.setdefault(found_conv[0], []).append(n)
    for fc2 in [*mlp_finder.find_fc2_candidates(graph), *conv_fc2]:
        if fc2.kind == "conv":
            got = conv_finder.build_site(fc2, model, conv_reuse, found.taken)
        else:
            got = mlp_finder.build_site(fc2, model, reuse, found.taken, order, shared, shared_in)
        if got is None:  # this Linear does not end an MLP
            continue
        if got.site is None:
            found.skipped.append(got.skipped)
            continue
        site = got.site
        if site.block not in found.block_heads:
            found.skipped.append(
                SkippedSite(site.name, MLP, "not inside a transformer block with attention")
            )
            if site.block and site.block.rsplit(".", 1)[-1].isdigit():  # an item of a block list
                found.orphans.setdefault(site.block, None)
            continue
        _configure_mlp(site, config, found.block_heads[site.block])
        if not site.width and not site.token:
            found.skipped.append(
                SkippedSite(site.name, MLP, f"{site.width_reason}; {site.token_reason}")
            )
            continue
        site.fold = _fold(got.linear_nodes[0], batch)
        found.mlp.append((order[id(fc2)], site))
        found.taken.update(m.linear for m in site.maps())


def _rows_left(found: _Found, reuse: dict[str, list[OpNode]]) -> dict[str, tuple[int, int]]:
    """Input projections of attention sites that compute rows of no head (a fused input
    projection, Flux 2), and [start, stop) of those rows: an MLP may claim them."""
    out = {}
    for _, site in found.attention:
        for m in site.in_maps:
            width = (reuse[m.linear][0].shape or (0,))[-1] if reuse.get(m.linear) else 0
            heads = {i for u in range(m.units) for i in m.indices(u)}
            rest = sorted(set(range(width)) - heads)
            if rest and rest == list(range(rest[0], rest[-1] + 1)):
                out[m.linear] = (rest[0], rest[-1] + 1)
    return out


def _configure_mlp(site: MlpSite, config: ConvertConfig, heads: int) -> None:
    """Apply the config's MLP settings to a found site: width routing, groups, token routing."""
    if not config.mlp_width and site.width:  # before the groups: off means one group
        site.width, site.width_reason = False, "MLP width routing turned off in the config"
    mlp_finder.set_groups(site, config.mlp_groups or heads)
    if site.conv:
        conv_finder.set_conv_groups(site)
    if not config.token_routing and site.token:
        site.token, site.token_reason = False, "token routing turned off in the config"


def _number_sites(
    found: _Found, model: torch.nn.Module, config: ConvertConfig, filter_fn: FilterFn | None
) -> tuple[list[AttentionSite], list[MlpSite]]:
    """The sites kept after the user's exclusions, numbered in execution order (``index``:
    the position of the site's masks and routers in the RouterBank); the others skipped."""
    kept_attn: list[AttentionSite] = []
    kept_mlp: list[MlpSite] = []
    for _, site in sorted([*found.attention, *found.mlp], key=lambda p: p[0]):
        reason = _excluded(model, site, config, filter_fn)
        if isinstance(site, AttentionSite) and not config.attention_width and not reason:
            reason = "attention width routing turned off in the config"
        if not site.fast and not reason:  # routing it would cost accuracy and save no compute
            reason = f"{site.fast_reason}; not converted: only a sliced site saves compute"
        if reason:
            found.skipped.append(SkippedSite(site.name, site_kind(site), reason))
            continue
        site.index = len(kept_attn) + len(kept_mlp)
        if isinstance(site, AttentionSite):
            kept_attn.append(site)
        else:
            kept_mlp.append(site)
    return kept_attn, kept_mlp


def _why_nothing(model: torch.nn.Module, graph: OpGraph) -> list[SkippedSite]:
    """Per transformer block (the items of the model's module lists), why it gave no site."""
    names = [n for n, _ in model.named_modules() if n and n.rsplit(".", 1)[-1].isdigit()]
    depth = min((n.count(".") for n in names), default=0)
    blocks = [n for n in names if n.count(".") == depth] or [""]
    return [SkippedSite(b or "<root>", ATTENTION, _why_no_attention(b, graph)) for b in blocks]


def _why_no_attention(block: str, graph: OpGraph) -> str:
    """Why no attention call was found in ``block`` ("" for the whole model): where torch.export
    stopped inside it, else what was captured there, and the ops analysis could not see into
    (a flex attention, an opaque leaf)."""
    for module, why in graph.export_stops:
        if block == "" or module == block or module.startswith(block + "."):
            # Mochi: its attention loops over the samples, each with the prompt tokens
            # `nonzero` picks out of the mask; the torch.fx fallback cannot trace it either.
            return (
                f"no attention call captured: {why}, and the torch.fx fallback sees no attention "
                "call there; not converted"
            )
    ops = [
        n
        for n in graph.nodes
        if block == "" or n.module == block or n.module.startswith(block + ".")
    ]
    if not ops:
        return f"none of its ops were captured ({graph.coverage})"
    linears = sum(n.kind == "linear" for n in ops)
    # Attention-like names first (flex_attention, a kernel of another library), then the rest.
    opaque = sorted(
        {n.op for n in ops if n.kind == "other"}, key=lambda op: ("attention" not in op.lower(), op)
    )[:3]
    return (
        f"no attention call (scaled_dot_product_attention, or softmax(q k^T) v written out) "
        f"among its {len(ops)} captured ops ({linears} Linears"
        + (f"; opaque: {', '.join(opaque)}" if opaque else "")
        + f"); capture: {graph.capture}, {graph.coverage}"
    )


def _fold(linear: Any, batch: int) -> int:
    """Rows per sample a site's Linear sees: more than 1 where a video block folds frames (or
    tokens) into the batch, (B x F, N, C)."""
    x = linear.args[0] if linear.args else None
    rows = x.shape[0] if x is not None and x.shape and len(x.shape) >= 3 else batch
    return rows // batch if batch and rows > batch and rows % batch == 0 else 1


def _excluded(
    model: torch.nn.Module, site: Any, config: ConvertConfig, filter_fn: FilterFn | None
) -> str:
    """Why the user left ``site`` out ("" when kept).

    A ``config.exclude`` pattern matches the whole site name or a module above it ("blocks.0"
    leaves out "blocks.0.attn").
    """
    for pattern in config.exclude:
        if re.fullmatch(pattern, site.name) or site.name.startswith(pattern + "."):
            return f"excluded by config.exclude pattern {pattern!r}"
    if filter_fn is not None:
        module = model.get_submodule(site.name) if site.name else model
        if not filter_fn(module, site.name):
            return "excluded by filter_fn"
    return ""
