"""The timesteps the routers read: a call's t on the DDPM 0..1000 scale, and the check that the
assumed timestep convention fits what the model is called with.

Example:
    >>> from types import SimpleNamespace
    >>> from dynconvert.config import ConvertConfig
    >>> plan = SimpleNamespace(timestep_scale=1000.0, timestep_reverse=True)  # sigma, reversed
    >>> router_timesteps(torch.tensor([0.25]), 1, plan, ConvertConfig())
    tensor([750.])
"""

from __future__ import annotations

from typing import Any

import torch

from dynconvert.config import ConvertConfig
from dynconvert.plan import ROUTER_TIMESTEPS, Plan


def router_timesteps(
    t: Any, batch: int, plan: Plan, config: ConvertConfig, device: torch.device | None = None
) -> torch.Tensor:
    """A call's timestep argument -> (Bt,) float timesteps on the 0..1000 DDPM scale.

    ``batch`` is the model's batch (0 if unknown): per-frame or per-token timesteps (diffusion
    forcing) are reduced to one per sample, since heads are chosen per sample.
    """
    t = torch.as_tensor(t, device=device).detach().float().reshape(-1)  # (Bt,): 1 or B values
    if batch and t.numel() > batch and t.numel() % batch == 0:
        t = t.reshape(batch, -1).mean(1)  # each sample's mean t
    # The config's setting, else what analysis assumed for this model (Plan.timestep_convention;
    # records before it: DDPM).
    scale, reverse = config.timestep_scale, config.timestep_reverse
    t = t * (plan.timestep_scale if scale is None else scale)
    if plan.timestep_reverse if reverse is None else reverse:
        t = ROUTER_TIMESTEPS - t
    return t


def convention_warning(values: list[float], plan: Plan) -> str | None:
    """The warning to give when the timesteps contradict the assumed convention (a wrong guess
    must be visible): outside 0..1000 after scaling, or fractions in [0, 1] read on DDPM's scale.

    Example:
        >>> from types import SimpleNamespace
        >>> convention_warning([0.25], SimpleNamespace(timestep_convention="")) is not None
        True
    """
    if not values:
        return None
    lo, hi = min(values), max(values)
    odd = lo < -1.0 or hi > ROUTER_TIMESTEPS + 1.0
    odd = odd or (hi <= 1.0 and any(v != round(v) for v in values))  # sigma read as DDPM t
    if not odd:
        return None
    return (
        f"dynconvert routers read timesteps {lo:g}..{hi:g} after the assumed convention "
        f"({plan.timestep_convention or 'DDPM scale'}), outside what they expect (0..1000); set "
        "ConvertConfig(timestep_scale=..., timestep_reverse=...) for this model and convert again"
    )
