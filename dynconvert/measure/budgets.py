"""What each budget of a budget-conditioned model really costs: the budget grid.

For a grid of budgets in the model's range (default: its ends and every tenth in between), one
row each: the analytic mean FLOPs ratio over timesteps spread across the schedule (the one
accountant, flops.py), the MACs ratio the calls really execute (torch's FLOP counter), and the
speed-up over the original at one timestep (bench.py). ``dynconvert.count_flops`` gives one
call's cost; this is that cost over the dial, so users see how closely it tracks its setting.
In the run report it is ``budget_grid``.

Example:
    >>> budget_points((0.3, 1.0))
    [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dynconvert.errors import BudgetError
from dynconvert.flops import count_flops, measure_macs
from dynconvert.inputs import default_inputs, split_inputs, with_timestep
from dynconvert.measure.bench import benchmark
from dynconvert.plan import ROUTER_TIMESTEPS
from dynconvert.runtime.routing import budget, routing
from dynconvert.runtime.state import get_state


def budget_points(budget_range: tuple[float, float]) -> list[float]:
    """The default grid of a range: its two ends and every multiple of 0.1 between them.

    Example:
        >>> budget_points((0.35, 0.6))
        [0.35, 0.4, 0.5, 0.6]
    """
    lo, hi = budget_range
    tenths = [k / 10 for k in range(1, 11) if lo < k / 10 < hi]
    return [lo, *tenths, hi]


def budget_grid(
    model: nn.Module,
    example_inputs: Any = None,
    budgets: list[float] | None = None,
    *,
    timesteps: int = 8,
    speed: bool = True,
    batch: int = 8,
    timestep: float = 500.0,
    repeats: int = 5,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """One row per budget: ``{budget, flops_ratio, executed_flops_ratio, speedup}``.

    Args:
        model: A budget-conditioned model (converted with a range), in evaluation.
        example_inputs: One call's inputs (default: the model's own); called once at each of
            ``timesteps`` values spread over the schedule, every sample at that value (so the
            ratios are means over t, as the budget is, and each call is a sampler's).
        budgets: The grid (default: :func:`budget_points` of the model's range).
        speed: Also time the original and the model at each budget (``benchmark`` at
            ``timestep``, ``batch``, ``repeats``, ``device``); else ``speedup`` is None.

    Raises:
        BudgetError: A single-budget model, or a budget outside the range.

    Example:
        >>> import dynconvert
        >>> from dynconvert.testing import tiny_dit
        >>> model = dynconvert.convert(tiny_dit(), (0.3, 1.0)).eval()
        >>> budget_grid(model, budgets=[1.0], speed=False)[0]["flops_ratio"]
        1.0
    """
    bank = get_state(model)
    if bank.budget_range is None:
        raise BudgetError(
            "budget_grid needs a budget-conditioned model (converted with a range, e.g. "
            "convert(model, (0.3, 1.0))); this one has the single budget "
            f"{bank.budget:g}: use dynconvert.count_flops"
        )
    inputs = split_inputs(example_inputs) if example_inputs is not None else None
    args, kwargs = inputs or default_inputs(model)
    # One call per timestep, every sample at it (as a sampler calls): a batch mixing timesteps
    # runs the fast path at the union of its samples' units, while the accountant counts each
    # sample's own, so executed MACs of such a batch read 0.03-0.13 over the analytic ratio.
    spread = torch.linspace(0, ROUTER_TIMESTEPS - 1, timesteps) / bank.plan.timestep_scale
    calls = [with_timestep(model, (args, kwargs), float(v)) for v in spread]
    with torch.no_grad(), routing(model, "full"):
        full = measure_macs(model, calls[0])  # the original's executed MACs (any t)
    rows = []
    for b in budgets or budget_points(bank.budget_range):
        with budget(model, b), torch.no_grad():
            ratio = sum(count_flops(model, c).ratio for c in calls) / len(calls)
            executed = sum(measure_macs(model, c) for c in calls) / len(calls) / full
            speedup = None
            if speed:
                speedup = benchmark(model, batch=batch, timestep=timestep, repeats=repeats,
                                    device=device, count=False, memory=False).speedup  # fmt: skip
        rows.append({"budget": b, "flops_ratio": ratio, "executed_flops_ratio": executed,
                     "speedup": speedup})  # fmt: skip
    return rows
