"""analyze(model, example_inputs) -> Plan: find the attention and MLP sites of any DiT-like model.

The graph comes from ``torch.export`` (non-strict); when export fails, from a robust torch.fx
tracer run block by block. Sites are read from the dataflow, not from class names: an attention
call with the Linears that feed and consume it, a Linear-elementwise-Linear MLP whose output
reaches the residual stream.

Capture: export_graph.py (torch.export) and fx_capture.py (the tracer) give an OpGraph
(graph.py); planning.py finds the sites in it (attention.py, mlp.py, convmlp.py) and costs them.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from dynconvert.analysis import tables
from dynconvert.analysis.export_graph import DataDependentSize, from_export
from dynconvert.analysis.graph import OpGraph, quiet_torch
from dynconvert.analysis.meta import buffers_on_meta, is_meta, meta_eager, to_meta
from dynconvert.analysis.planning import FilterFn, plan_from_graph
from dynconvert.analysis.reduced import Deriver
from dynconvert.config import ConvertConfig
from dynconvert.errors import AlreadyConvertedError, ExampleInputsError
from dynconvert.inputs import (
    check_inputs_run,
    default_inputs,
    eval_mode,
    find_timestep_arg,
    split_inputs,
)
from dynconvert.plan import Plan

__all__ = ["analyze", "capture"]


def analyze(
    model: torch.nn.Module,
    example_inputs: Any = None,
    config: ConvertConfig | None = None,
    filter_fn: FilterFn | None = None,
    probe_inputs: Any = None,
) -> Plan:
    """Find every attention and MLP site of ``model`` and what each costs.

    Head-locality (what may stand between a projection and its attention) is decided once per
    group of structurally identical blocks, and, with ``probe_inputs``, on the model captured
    at those few tokens: the plan is the same, in seconds instead of hours at real sizes.

    Args:
        model: any nn.Module (a DiT, U-ViT, a diffusers transformer...).
        example_inputs: a tuple of positional args or a dict of keyword args that run the
            model; optional for models that can make their own (built-in presets, diffusers
            DiT/PixArt).
        config: convert settings (which capture to use, MLP groups, timestep argument).
        filter_fn: ``filter_fn(module, name) -> bool``; sites for which it returns False are
            listed as skipped.
        probe_inputs: the same call at a small size (a few tokens: a smaller latent, fewer
            text tokens, fewer frames), in the form of ``example_inputs``. Token counts and
            MACs always come from ``example_inputs``.

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
    probe, small = None, None
    if probe_inputs is not None:
        small = split_inputs(probe_inputs)
        probe = capture(model, *small, config.capture)
    derive = Deriver(graph, probe, small)
    return plan_from_graph(model, graph, args, kwargs, timestep_arg, config, filter_fn, derive)


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
        # Weights on the meta device: export traces shapes only, with the inputs there too.
        exported = to_meta((tuple(args), dict(kwargs))) if is_meta(model) else (args, kwargs)
        try:
            with (
                torch.no_grad(),
                eval_mode(model),
                quiet_torch(),
                buffers_on_meta(model),
                meta_eager(model),
            ):
                ep = torch.export.export(model, *exported, strict=False)
            graph = from_export(ep, model, any_linear)
            # A meta model's tables made from the inputs alone get their values on the CPU.
            graph.evaluate = (
                functools.partial(tables.node_values, ep, tuple(args), dict(kwargs), meta=True)
                if is_meta(model)
                else functools.partial(tables.node_values, ep, *exported)
            )
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

    with eval_mode(model), quiet_torch(), meta_eager(model):
        try:
            graph = capture_fx(model, args, kwargs)
        except ExampleInputsError as e:
            _refuse_meta_autocast(model, e)
            raise
    if error is not None:
        graph.coverage = f"{graph.coverage}; torch.export failed: {type(error).__name__}"
    if isinstance(error, DataDependentSize):
        graph.export_stops = error.stops
    return graph


def _refuse_meta_autocast(model: torch.nn.Module, error: ExampleInputsError) -> None:
    """The reason, when a meta model's forward opens ``torch.autocast`` on its weights' device
    (Mochi's rotary frequencies): autocast has no meta device, so it cannot run without them."""
    if is_meta(model) and "autocast device_type 'meta'" in str(error):
        raise ExampleInputsError(
            f"{type(model).__name__} opens torch.autocast on the device of its weights, which "
            "has no autocast on the meta device: it cannot be analysed without its weights; "
            "load them (on the CPU or a GPU) and convert it then"
        ) from error
