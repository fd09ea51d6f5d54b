"""Routing modes: how the routers of a converted model decide, and how the model executes.

- ``"train"``: Gumbel-sigmoid straight-through masks (tau from the config), applied at full width
  by multiplication so gradients reach the routers.
- ``"eval"``: deterministic masks (a unit is on iff its logit > 0; width masks from a table
  keyed by t), computed as the model's execution mode says (modes.py): ``"fast"`` (sliced
  weights, tokens gathered by ``nonzero``; the default), ``"masked"`` (the full-width
  reference), ``"planned"`` (static shapes: per-timestep patterns, fixed token capacities, one
  host read per call; see planner.py) and ``"auto"`` (planned on CUDA, fast elsewhere: what
  ``dynconvert.load`` selects), or a mode registered since.
- ``"full"``: every unit and token on: the original model.
- ``None``: follow ``model.training`` (train -> "train", eval -> "eval").

Threads: :func:`set_routing` sets the model's defaults, which every thread's calls use;
``with routing(...)`` overrides them for the calls made in the thread (or asyncio task) that
entered it, until it exits, and never for another thread's calls (settings.py). A call reads
its settings once, when it begins, so threads calling one model at once, each in its own
``with routing(...)``, get exactly what each would get alone.

The FLOPs budget of a budget-conditioned model (budgets.py) is chosen the same three ways:
:func:`set_budget` (the model's default), ``with budget(model, b)`` (this thread's calls) and
``model(..., dynconvert_budget=b)`` (one call; it wins over both). A batch has one budget.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from dynconvert.errors import ConfigError
from dynconvert.runtime.bank import MODES
from dynconvert.runtime.budgets import check_call_budget
from dynconvert.runtime.modes import ExecutionMode, execution_mode
from dynconvert.runtime.settings import RoutingSettings, pop_override, push_override
from dynconvert.runtime.state import get_state


def set_routing(
    model: nn.Module, mode: str | None, execution: str | ExecutionMode | None = None
) -> None:
    """Set the routing mode (and optionally the evaluation execution path) of a converted model:
    its defaults, for the calls of every thread (a thread's ``with routing(...)`` still wins
    inside its block).

    Example:
        >>> set_routing(model, "full")          # doctest: +SKIP
        >>> set_routing(model, "eval", execution="planned")  # doctest: +SKIP
    """
    bank = get_state(model)
    settings = _checked(mode, execution)  # checked before anything changes
    bank.mode = settings.mode
    if settings.execution is not None:
        bank.execution = settings.execution


@contextlib.contextmanager
def routing(
    model: nn.Module, mode: str | None, execution: str | ExecutionMode | None = None
) -> Iterator[nn.Module]:
    """Run the calls of this thread inside the block with these settings (the model's defaults,
    and other threads' calls, are left alone); ``execution`` None keeps the enclosing one's.

    Example:
        >>> with routing(model, "full"):        # doctest: +SKIP
        ...     reference = model(x, t, y)
    """
    bank = get_state(model)
    settings = _checked(mode, execution)
    token = push_override(bank, settings)
    try:
        yield model
    finally:
        pop_override(token)


def _checked(mode: str | None, execution: str | ExecutionMode | None) -> RoutingSettings:
    """The settings named by a routing mode and an execution (ConfigError naming the valid)."""
    if mode is not None and mode not in MODES:
        raise ConfigError(f"routing mode must be one of {', '.join(MODES)} or None; got {mode!r}")
    return RoutingSettings(mode, execution_mode(execution) if execution is not None else None)


def set_budget(model: nn.Module, budget: float) -> None:
    """Set the FLOPs budget a budget-conditioned model's calls run at (every thread's, unless a
    ``with budget(...)`` or a call's ``dynconvert_budget=`` chooses another).

    Raises BudgetError for a budget outside the range the model was calibrated for (the message
    names the range), and for a single-budget model asked for another budget than its own.

    Example:
        >>> import dynconvert
        >>> from dynconvert.testing import tiny_dit
        >>> model = dynconvert.convert(tiny_dit(), (0.3, 1.0))
        >>> set_budget(model, 0.6)
        >>> dynconvert.get_state(model).budget
        0.6
    """
    bank = get_state(model)
    bank.budget = check_call_budget(budget, bank.budget_range, bank.budget)


@contextlib.contextmanager
def budget(model: nn.Module, value: float) -> Iterator[nn.Module]:
    """Run this thread's calls of a budget-conditioned model inside the block at FLOPs budget
    ``value`` (the model's default and other threads' calls are left alone; the routing mode
    and execution stay as they are). Checked as :func:`set_budget` checks.

    Example:
        >>> import dynconvert, torch
        >>> from dynconvert.testing import tiny_dit
        >>> model = dynconvert.convert(tiny_dit(), (0.3, 1.0)).eval()
        >>> x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.tensor([1])
        >>> with budget(model, 1.0):
        ...     out = model(x, t, y)
        >>> dynconvert.last_flops_ratio(model).tolist()
        [1.0]
    """
    bank = get_state(model)
    b = check_call_budget(value, bank.budget_range, bank.budget)
    token = push_override(bank, RoutingSettings(budget=b, inherit=True))
    try:
        yield model
    finally:
        pop_override(token)
