"""analyze(model, example_inputs) -> Plan: find the attention and MLP sites of any DiT-like model.

The graph comes from ``torch.export`` (non-strict); when export fails, from a robust torch.fx
tracer run block by block. Sites are read from the dataflow, not from class names: an attention
call with the Linears that feed and consume it, a Linear-elementwise-Linear MLP whose output
reaches the residual stream.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import torch

from dynconvert.analysis import attention as attn_finder
from dynconvert.analysis import convmlp as conv_finder
from dynconvert.analysis import mlp as mlp_finder
from dynconvert.analysis import tables
from dynconvert.analysis.calls import find_calls
from dynconvert.analysis.costs import eager_macs, node_macs
from dynconvert.analysis.graph import (
    OpGraph,
    block_of,
    from_export,
    quiet_torch,
    untie_impure_linears,
)
from dynconvert.analysis.headlocal import linear_ancestry
from dynconvert.analysis.registry import timestep_convention
from dynconvert.config import ConvertConfig
from dynconvert.errors import AlreadyConvertedError, ExampleInputsError
from dynconvert.inputs import (
    batch_of,
    check_inputs_run,
    default_inputs,
    eval_mode,
    find_timestep_arg,
    shapes_of,
    split_inputs,
    timestep_slot,
)
from dynconvert.plan import AttentionSite, MlpSite, Plan, SkippedSite
from dynconvert.sites import table_find

FilterFn = Callable[[torch.nn.Module, str], bool]
"""``filter_fn(module, name) -> bool``: False leaves the site at ``name`` unconverted."""

__all__ = ["analyze", "capture"]


def analyze(
    model: torch.nn.Module,
    example_inputs: Any = None,
    config: ConvertConfig | None = None,
    filter_fn: FilterFn | None = None,
) -> Plan:
    """Find every attention and MLP site of ``model`` and what each costs.

    Args:
        model: any nn.Module (a DiT, U-ViT, a diffusers transformer...).
        example_inputs: a tuple of positional args or a dict of keyword args that run the
            model; optional for models that can make their own (built-in presets, diffusers
            DiT/PixArt).
        config: convert settings (which capture to use, MLP groups, timestep argument).
        filter_fn: ``filter_fn(module, name) -> bool``; sites for which it returns False are
            listed as skipped.

    Returns:
        The Plan (sites in execution order, skipped sites with reasons, MACs).

    Example:
        >>> from dynconvert.testing import tiny_dit
        >>> plan = analyze(tiny_dit())
        >>> len(plan.attention), len(plan.mlp)
        (2, 2)
    """
    config = config or ConvertConfig()
    # A converted model's DynamicLinears would be found as sites again and routed twice.
    if getattr(model, "_dynconvert_converted", False):
        raise AlreadyConvertedError(
            "this model is already converted; call dynconvert.revert(model) first, or use "
            "dynconvert.get_state(model).plan for its plan"
        )
    # Inputs as (args, kwargs); presets and diffusers DiT/PixArt can make their own.
    args, kwargs = (
        split_inputs(example_inputs) if example_inputs is not None else default_inputs(model)
    )
    timestep_arg = find_timestep_arg(model, config.timestep_arg)  # fails early, naming the fix
    graph = capture(model, args, kwargs, config.capture)
    return plan_from_graph(model, graph, args, kwargs, timestep_arg, config, filter_fn)


def capture(
    model: torch.nn.Module, args: tuple, kwargs: dict, how: str = "auto", any_linear: bool = False
) -> OpGraph:
    """Capture the model's graph: torch.export (non-strict), else the robust per-block tracer.

    Example inputs that do not run the model raise ExampleInputsError (checked by an eager run
    only when export fails: the fx tracer's own eager run, which records each module's inputs).

    Args:
        model: The model to capture (left in the training mode it came in).
        args: Positional inputs of its forward.
        kwargs: Keyword inputs of its forward.
        how: "auto" (export, else fx), "export" (export only, errors raised) or "fx".
        any_linear: Tie linear ops to any nn.Linear subclass too (to count the costs of a
            converted model, whose Linears are DynamicLinears).

    Example:
        >>> from dynconvert.testing import tiny_dit
        >>> model = tiny_dit()
        >>> capture(model, model.example_inputs(2), {}).capture
        'torch.export'
    """
    error: Exception | None = None
    if how in ("auto", "export"):
        try:
            with torch.no_grad(), eval_mode(model), quiet_torch():
                ep = torch.export.export(model, tuple(args), dict(kwargs), strict=False)
            graph = from_export(ep, model, any_linear)
            graph.evaluate = functools.partial(tables.node_values, ep, tuple(args), dict(kwargs))
            return graph
        except Exception as e:  # noqa: BLE001 - fall back to the tracer below
            if how == "export":
                # Bad inputs get their own clear error before blaming export.
                check_inputs_run(model, args, kwargs)
                raise ExampleInputsError(
                    f"torch.export failed on {type(model).__name__}: {e}"
                ) from e
            error = e  # reported in the coverage note of the fx graph
    from dynconvert.analysis.fx_capture import capture_fx  # its eager run checks the inputs

    with eval_mode(model), quiet_torch():
        graph = capture_fx(model, args, kwargs)
    if error is not None:
        graph.coverage = f"{graph.coverage}; torch.export failed: {type(error).__name__}"
    return graph


def plan_from_graph(
    model: torch.nn.Module,
    graph: OpGraph,
    args: tuple,
    kwargs: dict,
    timestep_arg: str,
    config: ConvertConfig,
    filter_fn: FilterFn | None = None,
) -> Plan:
    """Turn a captured graph into a Plan (sites, skipped sites, costs)."""
    untie_impure_linears(graph, model)  # a module running F.linear on its weight, and only that
    reuse = graph.linear_nodes()  # Linear fqn -> its calls; a Linear called twice is not sliced
    order = {id(n): i for i, n in enumerate(graph.nodes)}  # node -> position in execution order
    attention: list[tuple[int, AttentionSite]] = []  # (position of the call, site)
    skipped: list[SkippedSite] = []
    taken: set[str] = set()  # Linears claimed by a site: no second site may route them

    # Attention first: its q/k/v/out Linears are then not offered to the MLP finder.
    from_linear = linear_ancestry(graph.nodes)  # what a rotary table is not: computed from a Linear
    # Heads of every block's first attention call, converted or not: a block whose attention is
    # refused (qk-norm across all heads) is still a transformer block, and its MLP a site.
    block_heads: dict[str, int] = {}
    pending: list[tuple[Any, list]] = []  # sites with per-head tables handed in (table_find.py)
    claims: dict[int, set[str]] = {}  # site -> its Linears
    kernel_macs: dict[int, int] = {}  # site -> MACs of another library's kernel (not in the graph)
    for call in find_calls(graph):
        if call.q.shape is not None and len(call.q.shape) == 4:
            block_heads.setdefault(block_of(call.output.module), call.q.shape[1])
        found = attn_finder.build_site(call, model, reuse, order, from_linear)
        if found.site is None:
            skipped.append(found.skipped)
            continue
        found.site.fold = _fold(found.linear_nodes[0], batch_of(args, kwargs))
        if found.tables:
            pending.append((found.site, found.tables))
        attention.append((order[id(call.output)], found.site))
        claims[id(found.site)] = {n.linear for n in found.linear_nodes}
        kernel_macs[id(found.site)] = found.kernel_macs
    if pending:  # which argument each table is: one forward pass for all of them
        failed = table_find.resolve(model, graph, args, kwargs, pending)
        for _, site in [p for p in attention if id(p[1]) in failed]:
            skipped.append(SkippedSite(site.name, "attention", failed[id(site)]))
        attention = [p for p in attention if id(p[1]) not in failed]
    for _, site in attention:
        taken.update(claims[id(site)])

    # The first attention site of each block: its head count is the MLP's default group count
    # (G = H, as the paper), and an MLP outside any such block (a timestep or caption embedding
    # MLP) is not a transformer MLP.
    for _, s in attention:
        block_heads.setdefault(s.block, s.heads)
    # Out-projections of parallel blocks: the columns their attention leaves to the MLP.
    shared = {m.linear: m.keep for _, s in attention for m in s.out_maps if m.keep}
    mlps: list[tuple[int, MlpSite]] = []
    orphans: dict[str, None] = {}  # transformer blocks with an MLP but no attention call found
    # Linear MLPs, then convolutional ones (pointwise convolutions around per-channel ops).
    conv_fc2 = conv_finder.find_fc2_candidates(graph, model)
    conv_reuse: dict[str, list[Any]] = {}
    for n in graph.nodes:
        found_conv = conv_finder.conv_module(n, model) if n.kind == "conv" else None
        if found_conv is not None:
            conv_reuse.setdefault(found_conv[0], []).append(n)
    for fc2 in [*mlp_finder.find_fc2_candidates(graph), *conv_fc2]:
        if fc2.kind == "conv":
            found = conv_finder.build_site(fc2, model, conv_reuse, taken)
        else:
            found = mlp_finder.build_site(fc2, model, reuse, taken, order, shared)
        if found is None:  # this Linear does not end an MLP
            continue
        if found.site is None:
            skipped.append(found.skipped)
            continue
        site = found.site
        if site.block not in block_heads:
            skipped.append(
                SkippedSite(site.name, "mlp", "not inside a transformer block with attention")
            )
            if site.block and site.block.rsplit(".", 1)[-1].isdigit():  # an item of a block list
                orphans.setdefault(site.block, None)
            continue
        if not config.mlp_width and site.width:  # before the groups: off means one group
            site.width, site.width_reason = False, "MLP width routing turned off in the config"
        groups = config.mlp_groups or block_heads[site.block]
        mlp_finder.set_groups(site, groups)
        if site.conv:
            conv_finder.set_conv_groups(site)
        if not config.token_routing and site.token:
            site.token, site.token_reason = False, "token routing turned off in the config"
        if not site.width and not site.token:
            skipped.append(
                SkippedSite(site.name, "mlp", f"{site.width_reason}; {site.token_reason}")
            )
            continue
        site.fold = _fold(found.linear_nodes[0], batch_of(args, kwargs))
        mlps.append((order[id(fc2)], site))
        taken.update(m.linear for m in site.maps())

    # User exclusions last, then number the kept sites in execution order: site.index is the
    # position of the site's masks and routers in the RouterBank.
    kept_attn, kept_mlp = [], []
    for _, site in sorted([*attention, *mlps], key=lambda p: p[0]):
        reason = _excluded(model, site, config, filter_fn)
        if isinstance(site, AttentionSite) and not config.attention_width and not reason:
            reason = "attention width routing turned off in the config"
        if not site.fast and not reason:  # routing it would cost accuracy and save no compute
            reason = f"{site.fast_reason}; not converted: only a sliced site saves compute"
        if reason:
            skipped.append(
                SkippedSite(
                    site.name, "attention" if isinstance(site, AttentionSite) else "mlp", reason
                )
            )
            continue
        site.index = len(kept_attn) + len(kept_mlp)
        (kept_attn if isinstance(site, AttentionSite) else kept_mlp).append(site)

    if not kept_attn and not kept_mlp and not skipped:
        skipped = _why_nothing(model, graph)  # never "nothing found and nothing skipped"
    # A block whose MLP was found but no attention call at all: say why for its attention too.
    skipped += [SkippedSite(b, "attention", _why_no_attention(b, graph)) for b in orphans]

    # Costs: the graph's MACs are for the whole example batch, a site's macs() for one sample.
    # other_macs is what routing never changes (embeddings, final layer, skipped sites).
    static = sum(node_macs(n) for n in graph.nodes) + sum(kernel_macs[id(a)] for _, a in attention)
    if graph.capture != "torch.export":
        # A capture in pieces misses the ops of opaque leaves: count one eager forward instead.
        with torch.no_grad(), eval_mode(model):
            static = int(round(eager_macs(model, args, kwargs)))
    site_macs = sum(s.macs() for s in [*kept_attn, *kept_mlp])
    batch = batch_of(args, kwargs)
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
        coverage=graph.coverage,
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


def _why_nothing(model: torch.nn.Module, graph: OpGraph) -> list[SkippedSite]:
    """Per transformer block (the items of the model's module lists), why it gave no site."""
    names = [n for n, _ in model.named_modules() if n and n.rsplit(".", 1)[-1].isdigit()]
    depth = min((n.count(".") for n in names), default=0)
    blocks = [n for n in names if n.count(".") == depth] or [""]
    return [SkippedSite(b or "<root>", "attention", _why_no_attention(b, graph)) for b in blocks]


def _why_no_attention(block: str, graph: OpGraph) -> str:
    """Why no attention call was found in ``block`` ("" for the whole model): what was captured
    there, and the ops analysis could not see into (a flex attention, an opaque leaf)."""
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
