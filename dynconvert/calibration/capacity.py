"""Token capacities of the planned path, measured on real inputs after calibration.

The planned (GPU) path runs each token-routed MLP on a fixed number of tokens per timestep, its
capacity (planner.py). A capacity that is too small drops tokens the router kept (counted as
overflow); one that is too large wastes the gather. So the capacity is measured where it is
decided: the calibrated model is run in eval routing on a batch of training data noised at a
grid of timesteps, and each site's capacity at t is the 90th percentile of the per-sample keep
rate there (plus ``PlannedOptions.capacity_margin``, see ``planned.capacity_from_keep``).
``calibrate`` does this at its end; the run pipeline's FLOPs profile does it on more timesteps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from dynconvert.plan import ROUTER_TIMESTEPS, AttentionSite
from dynconvert.runtime.planned.controls import capacity_from_keep
from dynconvert.runtime.routing import routing
from dynconvert.runtime.state import get_state

BUSY_QUANTILE = 0.9
"""Capacities cover this quantile of the per-sample keep rates (a busy sample, not the mean)."""


def spread_timesteps(points: int) -> np.ndarray:
    """About ``points`` (at least 2) distinct whole timesteps spread evenly over the routers'
    grid 0..999, ascending: where token keep rates and FLOPs profiles are measured.

    Example:
        >>> spread_timesteps(3).tolist()
        [0, 500, 999]
    """
    last = ROUTER_TIMESTEPS - 1
    return np.unique(np.linspace(0, last, max(2, points)).round().astype(int))


def noised_at(
    objective: Any, x0: torch.Tensor, t: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t at DDPM timestep t (or flow time t/1000) and the timestep the model is given.

    Args:
        objective: The calibration objective (``calibration.objectives.build_objective``).
        x0: Clean inputs (B, ...).
        t: Timestep on the 0..999 grid.
        seed: Seed of the noise (so repeated measurements see the same x_t).

    Returns:
        ``(x_t, t_in)``: the noised batch and the (B,) timesteps in the model's convention.

    Example:
        >>> from dynconvert.calibration import CalibrationConfig
        >>> from dynconvert.calibration.objectives import build_objective
        >>> from dynconvert.calibration.adapters import select_adapter
        >>> from dynconvert.models import build_model
        >>> adapter = select_adapter(build_model("dit-tiny"))
        >>> obj = build_objective(CalibrationConfig(target=0.5), adapter)
        >>> x_t, t_in = noised_at(obj, torch.zeros(2, 4, 8, 8), 500, seed=0)
        >>> tuple(x_t.shape), t_in.tolist()
        ((2, 4, 8, 8), [500, 500])
    """
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0)
    index = torch.full((x0.shape[0],), int(t), dtype=torch.long, device=x0.device)
    if hasattr(objective, "diffusion"):
        return objective.diffusion.q_sample(x0, index, noise), index + objective.timestep_offset
    s = (index.float() + 0.5) / ROUTER_TIMESTEPS
    return objective.flow.interpolate(x0, noise, s), s * objective.timestep_scale


def busy_keep(tokens: torch.Tensor | None) -> float:
    """The ``BUSY_QUANTILE`` of the per-sample keep rate of one token mask (1.0 without one).

    Args:
        tokens: A site's token mask of the last forward, (B, N) or (B, ...) of 0/1, or None.

    Example:
        >>> busy_keep(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        0.95
    """
    if tokens is None:
        return 1.0
    per_sample = tokens.detach().float().flatten(1).mean(1)
    return round(float(torch.quantile(per_sample.cpu(), BUSY_QUANTILE)), 6)


def token_sites(model: nn.Module) -> list[int]:
    """Indices of the converted model's MLP sites that route tokens (empty: no capacity needed).

    Example:
        >>> from dynconvert.models import build_model
        >>> from dynconvert.runtime.synthetic import randomize_routing
        >>> import dynconvert
        >>> m = dynconvert.convert(build_model("dit-tiny"), budget=0.5)  # doctest: +SKIP
        >>> token_sites(m)  # doctest: +SKIP
        [1, 3]
    """
    return [
        s.index for s in get_state(model).plan.sites if not isinstance(s, AttentionSite) and s.token
    ]


@torch.no_grad()
def measure_token_capacity(
    model: nn.Module,
    adapter: Any,
    objective: Any,
    batch: dict[str, torch.Tensor],
    points: int = 11,
) -> dict[int, torch.Tensor]:
    """Measure the planned path's token capacities on ``batch`` and set them on ``model``.

    Runs ``points`` eval-routing forwards (fast path) at timesteps spread over 0..999 and keeps,
    per token-routed site and timestep, the busy per-sample keep rate (``busy_keep``).

    Args:
        model: A converted (calibrated) model.
        adapter: How to call it (``calibration.adapters.select_adapter``).
        objective: The calibration objective (noises ``batch["x"]``).
        batch: A prepared batch on the model's device; ``"x"`` holds clean inputs.
        points: Timesteps measured (at least 2).

    Returns:
        ``{site index: (1000,) capacity fractions}``, empty when no site routes tokens.

    Example:
        >>> import dynconvert
        >>> from dynconvert.models import build_model
        >>> model = dynconvert.convert(build_model("dit-tiny"), budget=0.5)  # doctest: +SKIP
        >>> # ... calibrate(model, ...) calls this at its end with its last batch
    """
    sites = token_sites(model)
    if not sites:
        return {}
    bank = get_state(model)
    ts = spread_timesteps(points).tolist()
    busy: dict[int, list[float]] = {i: [] for i in sites}
    x0 = batch["x"].float()
    was = model.training
    model.eval()
    try:
        with routing(model, "eval", execution="fast"):  # the routers' own decisions
            for k, t in enumerate(ts):
                x_t, t_in = noised_at(objective, x0, t, seed=k)
                adapter(model, x_t, t_in, batch)
                for i in sites:
                    busy[i].append(busy_keep(bank.records.get(i, {}).get("tokens")))
    finally:
        model.train(was)
    return capacity_from_keep(model, ts, busy)
