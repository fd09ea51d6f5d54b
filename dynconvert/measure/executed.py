"""The FLOPs ratio a converted model executes, counted on its own example inputs.

A record's FLOPs ratio is computed from the routers' tables (and, for a calibrated run, from
token keep rates measured then); :func:`executed_ratio` instead runs the model as loaded, in
eval routing, at timesteps spread over 0..999, and counts the MACs it executes
(``torch.utils.flop_counter``, math attention: width and token routing included) against the
same call with every unit on. NaN routers, a table that disagrees with the routers, or token
routing left out of a table all show here.

Example:
    >>> model = dynconvert.load("runs/digits-0.5")  # doctest: +SKIP
    >>> executed_ratio(model)                       # doctest: +SKIP
    0.51
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from dynconvert.analysis.costs import call_macs
from dynconvert.errors import DynconvertError
from dynconvert.inputs import default_inputs, with_timestep
from dynconvert.plan import ROUTER_TIMESTEPS
from dynconvert.runtime.routing import routing
from dynconvert.runtime.state import get_state


def _model_value(model: nn.Module, t: float) -> float:
    """The value of the model's timestep argument at which its routers read ``t`` (0..999)."""
    bank = get_state(model)
    scale = bank.config.timestep_scale
    scale = bank.plan.timestep_scale if scale is None else scale
    reverse = bank.config.timestep_reverse
    reverse = bank.plan.timestep_reverse if reverse is None else reverse
    return (ROUTER_TIMESTEPS - t if reverse else t) / (scale or 1.0)


@torch.no_grad()
def executed_ratio(model: nn.Module, points: int = 5, batch_size: int = 2) -> float | None:
    """Mean executed MACs ratio of ``model`` (converted) over ``points`` timesteps on its
    example inputs, or None when the model makes no example inputs (pass them to
    :func:`dynconvert.count_flops` or measure with ``dynconvert bench``).

    Example:
        >>> from dynconvert.testing import tiny_dit
        >>> 0.0 < executed_ratio(dynconvert.convert(tiny_dit(), 0.5)) <= 1.05  # doctest: +SKIP
        True
    """
    try:
        inputs = default_inputs(model, batch_size)
    except DynconvertError:
        return None
    was = model.training
    model.eval()
    ratios = []
    try:
        for k in range(points):
            t = round(k * (ROUTER_TIMESTEPS - 1) / max(points - 1, 1))
            args, kwargs = with_timestep(model, inputs, _model_value(model, t))
            step = functools.partial(model, *args, **kwargs)
            with routing(model, "full"):
                full = call_macs(step, model.parameters())
            with routing(model, "eval"):
                ratios.append(call_macs(step, model.parameters()) / full)
    finally:
        model.train(was)
    return float(sum(ratios) / len(ratios))
