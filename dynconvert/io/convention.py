"""A record's timestep convention, checked at load against what its writer does not control.

The routers read a call's timestep argument, scaled onto DDPM's 0..1000 and maybe reversed
(``Plan.timestep_arg``, ``timestep_scale``, ``timestep_reverse``, or the record's convert
settings). A record that names another argument or another scale would change every routing
decision without a word, so :func:`check_timestep_convention` derives what it can from the
model itself and refuses a record that says otherwise:

- the argument: the one ``find_timestep_arg`` finds in the base model's forward signature (the
  record may name another only when the signature has none of the usual names);
- the scale and direction: the class's entry in ``TIMESTEP_CONVENTIONS`` (diffusers' sigma
  models); for a model with ``example_inputs`` (the built-in presets), what analysis derives
  from those inputs; for any other class one of the two conventions analysis infers by itself
  (DDPM 0..1000, or t in [0, 1] times 1000, not reversed): the routers warn at the first call
  whose timesteps contradict it (``runtime/timesteps.py``).

A convention set on purpose at convert (``ConvertConfig(timestep_scale=..., timestep_reverse=...)``)
that differs from these is stated again by the caller: ``load(..., timestep_scale=...,
timestep_reverse=...)``.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynconvert.analysis.registry import TIMESTEP_CONVENTIONS, timestep_convention
from dynconvert.config import ConvertConfig
from dynconvert.errors import RecordError, TimestepError
from dynconvert.inputs import find_timestep_arg, split_inputs, timestep_slot
from dynconvert.plan import ROUTER_TIMESTEPS, Plan

INFERRED = {(1.0, False), (float(ROUTER_TIMESTEPS), False)}
"""The conventions analysis infers by itself for a class it has no entry for."""


def check_timestep_convention(
    plan: Plan,
    config: ConvertConfig,
    model: nn.Module,
    directory: Path,
    stated: tuple[float | None, bool | None] = (None, None),
) -> None:
    """Refuse a record whose timestep argument, scale or direction is not the model's.

    Args:
        plan: The record's plan.
        config: The record's convert settings (their timestep fields win over the plan's).
        model: The base model, built from the allow-list or passed by the caller.
        directory: The record's folder, for the message.
        stated: ``(timestep_scale, timestep_reverse)`` the caller passed to ``load``: a
            convention set on purpose at convert (None: not stated).

    Raises:
        RecordError: The message names the value the record gives, the one the model has,
            and the fix.

    Example:
        >>> from dynconvert.testing import tiny_dit
        >>> plan = Plan(model_class="m.DiT", timestep_arg="y", capture="", coverage="",
        ...             batch=1, input_shapes={}, attention=[], mlp=[], skipped=[],
        ...             static_macs=0, other_macs=0)
        >>> check_timestep_convention(plan, ConvertConfig(), tiny_dit(), Path("run"))
        Traceback (most recent call last):
        ...
        dynconvert.errors.RecordError: the record in run reads the timestep from argument 'y', ...
    """
    name = plan.timestep_arg
    where = f"the record in {directory}"
    fix = "it was written for another model or altered; convert and save again"
    params = list(inspect.signature(model.forward).parameters)
    try:
        derived = find_timestep_arg(model)
    except TimestepError:
        derived = None  # no usual name: the record's choice, if the signature has it
    if config.timestep_arg not in (None, name):
        raise RecordError(
            f"{where} names timestep argument {str(config.timestep_arg)[:60]!r} in its settings "
            f"and {str(name)[:60]!r} in its plan; {fix}"
        )
    if name not in params or (derived is not None and name != derived):
        raise RecordError(
            f"{where} reads the timestep from argument {str(name)[:60]!r}, but "
            f"{type(model).__name__}.forward takes it as {derived!r}; {fix}"
        )
    scale = plan.timestep_scale if config.timestep_scale is None else config.timestep_scale
    reverse = plan.timestep_reverse if config.timestep_reverse is None else config.timestep_reverse
    got = (float(scale), bool(reverse))
    if stated != (None, None):
        want = (float(stated[0] if stated[0] is not None else got[0]), bool(stated[1]))
        if got != want:
            raise RecordError(
                f"{where} reads timesteps as t x {got[0]:g}{_rev(got)}, not the t x "
                f"{want[0]:g}{_rev(want)} passed to load; {fix}"
            )
        return
    known = known_convention(model, name)
    if (known is not None and got != known) or (known is None and got not in INFERRED):
        what = f"t x {known[0]:g}{_rev(known)}" if known else "DDPM's 0..1000 or t in [0, 1]"
        raise RecordError(
            f"{where} reads timesteps as t x {got[0]:g}{_rev(got)}, but "
            f"{type(model).__name__} takes {what}; {fix} (a convention set on purpose at "
            "convert: pass the same timestep_scale= and timestep_reverse= to load)"
        )


def known_convention(model: nn.Module, name: str) -> tuple[float, bool] | None:
    """``(scale, reversed)`` the model's class is known to take, or None when it is not known.

    Example:
        >>> from dynconvert.testing import tiny_dit
        >>> known_convention(tiny_dit(), "t")
        (1.0, False)
    """
    for cls in type(model).__mro__:
        if cls.__name__ in TIMESTEP_CONVENTIONS:
            scale, reverse, _ = TIMESTEP_CONVENTIONS[cls.__name__]
            return float(scale), bool(reverse)
    make = getattr(model, "example_inputs", None)
    if not callable(make):
        return None
    try:
        with torch.random.fork_rng(devices=[]):  # the example's noise: leave the RNG as it was
            args, kwargs = split_inputs(make(batch_size=1))
    except Exception:  # an example_inputs of another signature: not a built-in preset
        return None
    position, _ = timestep_slot(model, name)
    t: Any = kwargs.get(
        name, args[position] if position is not None and position < len(args) else None
    )
    scale, reverse, _ = timestep_convention(model, t, None, None)
    return float(scale), bool(reverse)


def _rev(convention: tuple[float, bool]) -> str:
    return ", reversed" if convention[1] else ""
