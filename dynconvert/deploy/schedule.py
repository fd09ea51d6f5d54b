"""What an export covers: the sampling schedule's timesteps, the inputs per batch, the patterns.

The timesteps are the values the sampler passes to the model (its own convention: DDPM steps
for DiT, ``t + 1`` for U-ViT, sigma for flow models). They are grouped by the planner itself:
each timestep is run through the model's routing pre-hook, and the planner's pattern key
(width masks and token capacities, see runtime/planned/planner.py) says which timesteps share a
program. Nothing here re-derives a pattern.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from dynconvert.deploy.program import pin_pattern
from dynconvert.deploy.signature import bind
from dynconvert.errors import ConfigError, ExportError
from dynconvert.inputs import default_inputs, split_inputs
from dynconvert.runtime.state import get_state


def schedule_timesteps(model: nn.Module, steps: int = 50, scheduler: str = "ddim") -> list[float]:
    """The timesteps ``dynconvert.sampling.sample`` calls ``model`` with for this sampler.

    Raises:
        ExportError: the model is a flow model (``sample`` does not drive it): pass the
            timesteps its sampler uses instead.

    Example:
        >>> from dynconvert.testing import tiny_dit
        >>> schedule_timesteps(tiny_dit(), steps=4)
        [750.0, 500.0, 250.0, 0.0]
    """
    from dynconvert.sampling import model_spec
    from dynconvert.sampling.schedulers import fresh_scheduler

    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise ConfigError(f"`steps` must be an integer in 1..1000; got {steps!r}")
    try:
        spec = model_spec(model)
    except ConfigError as e:
        raise ExportError(
            f"cannot derive the sampling schedule of {type(model).__name__} ({e}); pass "
            "`timesteps` (the values its sampler passes to the model)"
        ) from e
    sched = fresh_scheduler(scheduler, spec, clip_sample=False)
    sched.set_timesteps(steps)
    return [float(t) + spec.timestep_offset for t in sched.timesteps.tolist()]


def inputs_at(
    model: nn.Module,
    batch: int,
    example_inputs: Any = None,
    height: int | None = None,
    width: int | None = None,
) -> dict[str, Any]:
    """The model's call at ``batch`` samples, by parameter name.

    ``example_inputs``: None (the model makes its own), the inputs of one call (their batch
    must be ``batch``), or a function ``batch -> inputs``. ``height`` / ``width`` resize the
    sample input (the first 4-D tensor, (B, C, H, W)) to a new random one.

    Raises:
        ExportError: the inputs have another batch, or there is no (B, C, H, W) input to resize.
    """
    if callable(example_inputs):
        example_inputs = example_inputs(batch)
    with torch.random.fork_rng(devices=[]):  # example inputs: leave the global RNG as it was
        torch.manual_seed(batch)
        args, kwargs = (
            default_inputs(model, batch) if example_inputs is None else split_inputs(example_inputs)
        )
        named = bind(model, args, kwargs)
        first = next((v for v in named.values() if isinstance(v, torch.Tensor) and v.dim()), None)
        if first is not None and first.shape[0] != batch:
            raise ExportError(
                f"the example inputs have batch {first.shape[0]}, not {batch}; pass "
                "`example_inputs` as a function of the batch (batch -> inputs) to export "
                "several batches, or the inputs of this batch"
            )
        if height is not None or width is not None:
            key = next(
                (k for k, v in named.items() if isinstance(v, torch.Tensor) and v.dim() == 4), None
            )
            if key is None:
                raise ExportError(
                    "`height` / `width` resize a (B, C, H, W) sample input and this model takes "
                    "none; pass `example_inputs` at the resolution to export"
                )
            b, c, h, w = named[key].shape
            named[key] = torch.randn(b, c, height or h, width or w, dtype=named[key].dtype)
    return named


def with_t(named: dict[str, Any], name: str, value: float) -> dict[str, Any]:
    """The call with every sample at timestep ``value`` (in the timestep input's dtype)."""
    old = named[name]
    if not old.is_floating_point() and value != round(value):
        old = old.float()  # a fractional schedule for a model called with integer steps
    return {**named, name: torch.full_like(old, value)}


def group_patterns(
    model: nn.Module, named: dict[str, Any], name: str, timesteps: Sequence[float],
    on_step: Callable[[], None] | None = None,
) -> list[list[float]]:  # fmt: skip
    """The schedule's timesteps grouped by the planner's pattern, in order of first use.

    Example:
        >>> import dynconvert
        >>> from dynconvert.testing import tiny_dit
        >>> from dynconvert.deploy.signature import bind
        >>> model = dynconvert.convert(tiny_dit(), 0.5).eval()
        >>> dynconvert.set_routing(model, "eval", execution="planned")
        >>> named = bind(model, model.example_inputs(2), {})
        >>> group_patterns(model, named, "t", [999.0, 998.0])
        [[999.0, 998.0]]
    """
    planner = get_state(model).planner
    groups: dict[tuple[int, ...], list[float]] = {}
    for value in timesteps:
        pin_pattern(model, with_t(named, name, value))
        if planner.current is None:
            raise ExportError("the model is not on the planned path; export needs it")
        groups.setdefault(planner.current.key, []).append(float(value))
        if on_step is not None:
            on_step()
    return list(groups.values())


__all__ = ["group_patterns", "inputs_at", "schedule_timesteps", "with_t"]
