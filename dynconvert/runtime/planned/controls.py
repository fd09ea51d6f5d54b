"""Planned execution: the user-facing functions (capacities, options, overflow, stats).

The runtime itself is :class:`dynconvert.runtime.planned.planner.Planner`; its module docstring
says what the
planned path computes. Select it with ``dynconvert.set_routing(model, "eval", execution="planned")``
(a loaded model on CUDA runs it by default).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dynconvert.errors import ConfigError
from dynconvert.plan import ROUTER_TIMESTEPS, MlpSite
from dynconvert.runtime.planned.planner import (
    CAPACITY_STEPS,
    PlannedOptions,
    Planner,
    TokenOverflow,
)
from dynconvert.runtime.state import get_state


def planner_of(model: nn.Module) -> Planner:
    """The :class:`Planner` of a converted model.

    Example:
        >>> import dynconvert
        >>> from dynconvert.testing import tiny_dit
        >>> planner_of(dynconvert.convert(tiny_dit(), 0.5)).options.min_gather_rows
        256
    """
    return get_state(model).planner


def configure_planned(model: nn.Module, **options: Any) -> PlannedOptions:
    """Change the planned path's settings (:class:`PlannedOptions` fields) and drop its plans.

    Example:
        >>> import dynconvert
        >>> from dynconvert.testing import tiny_dit
        >>> model = dynconvert.convert(tiny_dit(), 0.5)
        >>> configure_planned(model, min_gather_rows=0).min_gather_rows
        0
    """
    planner = planner_of(model)
    for name, value in options.items():
        if not hasattr(planner.options, name):
            valid = ", ".join(PlannedOptions.__dataclass_fields__)
            raise ConfigError(f"unknown planned option {name!r}; valid: {valid}")
        setattr(planner.options, name, value)
    planner.capacity_version += 1  # rebuild plans and slices with the new settings
    return planner.options


def set_token_capacity(model: nn.Module, capacity: float | dict[int, Any] | None) -> None:
    """Set the token capacity of every token-routed site: a fraction of the call's tokens.

    ``capacity`` is one fraction for every site and t, or ``{site index: fraction or (1000,)
    fractions per t}``; None removes them (sites then run every token, masked). Fractions are
    rounded up to multiples of 1/32.

    Example:
        >>> import dynconvert
        >>> from dynconvert.testing import tiny_dit
        >>> model = dynconvert.convert(tiny_dit(), 0.5)
        >>> set_token_capacity(model, 0.7)
        >>> sorted(planner_of(model).capacity)
        [1, 3]
    """
    bank = get_state(model)
    planner = bank.planner
    planner.capacity = {}
    # A budget-conditioned model's capacities hold at its budget now (calibration measures them
    # there); calls at other budgets run their token sites on every token (planner.py).
    planner.capacity_budget = round(bank.budget, 4) if bank.budget_range else None
    if capacity is not None:
        for s in bank.plan.sites:
            if not (isinstance(s, MlpSite) and s.token):
                continue
            value = capacity.get(s.index) if isinstance(capacity, dict) else capacity
            if value is None:
                continue
            table = (
                torch.as_tensor(value, dtype=torch.float64)
                .reshape(-1)
                .expand(ROUTER_TIMESTEPS)
                .clone()
            )
            table = torch.ceil(table.clamp(0, 1) * CAPACITY_STEPS - 1e-9) / CAPACITY_STEPS
            planner.capacity[s.index] = table.float()
    planner.capacity_version += 1


def capacity_from_keep(
    model: nn.Module, timesteps: list[int], keep: dict[int, list[float]]
) -> dict[int, torch.Tensor]:
    """Capacities per t from keep rates measured at some timesteps, and set them on the model.

    Args:
        model: a converted model.
        timesteps: the DDPM timesteps (ascending) the keep rates were measured at.
        keep: ``{site index: [the largest per-call keep fraction measured at each timestep]}``.

    Each t gets the largest keep rate of the two measured timesteps around it, plus the
    margin (``PlannedOptions.capacity_margin``), capped at 1.

    Returns:
        ``{site index: (1000,) fractions}`` (also set on the model).
    """
    planner = planner_of(model)
    ts = torch.as_tensor(timesteps, dtype=torch.float64)
    grid = torch.arange(ROUTER_TIMESTEPS, dtype=torch.float64)
    right = torch.searchsorted(ts, grid).clamp(max=len(ts) - 1)
    left = (right - 1).clamp(min=0)
    out = {}
    for i, values in keep.items():
        v = torch.as_tensor(values, dtype=torch.float64)
        out[i] = (torch.maximum(v[left], v[right]) + planner.options.capacity_margin).clamp(max=1.0)
    set_token_capacity(model, out)
    return out


def capacity_record(model: nn.Module) -> dict[str, list[list[Any]]] | None:
    """Token capacities as JSON for the saved record: ``{site: [[t_first, t_last, fraction]]}``."""
    capacity = planner_of(model).capacity
    if not capacity:
        return None
    out = {}
    for i, table in capacity.items():
        segs: list[list[Any]] = []
        for t, v in enumerate(table.tolist()):
            v = round(v, 6)
            if segs and segs[-1][2] == v:
                segs[-1][1] = t
            else:
                segs.append([t, t, v])
        out[str(i)] = segs
    return out


def load_capacity_record(model: nn.Module, data: dict[str, list[list[Any]]] | None) -> None:
    """Inverse of :func:`capacity_record` (None or empty: no capacities)."""
    if not data:
        set_token_capacity(model, None)
        return
    tables = {}
    for i, segs in data.items():
        table = torch.ones(ROUTER_TIMESTEPS, dtype=torch.float64)
        for first, last, v in segs:
            table[int(first) : int(last) + 1] = float(v)
        tables[int(i)] = table
    set_token_capacity(model, tables)


def token_overflow(model: nn.Module, reset: bool = True) -> TokenOverflow:
    """Tokens dropped by fixed capacities since the last read (one host read).

    Read it once after a sampling call; ``rate`` is dropped / wanted over every planned call
    and site since the previous read.

    Example:
        >>> import dynconvert
        >>> from dynconvert.testing import tiny_dit
        >>> token_overflow(dynconvert.convert(tiny_dit(), 0.5)).dropped
        0
    """
    return planner_of(model).read_overflow(reset)


def planned_stats(model: nn.Module) -> dict[str, Any]:
    """What the planned path holds: patterns, pre-sliced bytes, slices gathered per call.

    Example:
        >>> import dynconvert
        >>> from dynconvert.testing import tiny_dit
        >>> planned_stats(dynconvert.convert(tiny_dit(), 0.5))["patterns"]
        0
    """
    p = planner_of(model)
    return {
        "patterns": len(p.patterns),
        "distinct_t_patterns": p.distinct_t_patterns,
        "sliced_bytes": p.store_bytes,
        "uncached_slices": p.uncached_slices,
        "epoch": p.epoch,
    }


__all__ = [
    "PlannedOptions", "Planner", "TokenOverflow", "capacity_from_keep", "capacity_record",
    "configure_planned", "load_capacity_record", "planned_stats", "planner_of",
    "set_token_capacity", "token_overflow",
]  # fmt: skip
