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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from dynconvert.errors import ConfigError
from dynconvert.runtime.bank import MODES
from dynconvert.runtime.modes import ExecutionMode, execution_mode
from dynconvert.runtime.state import get_state


def set_routing(
    model: nn.Module, mode: str | None, execution: str | ExecutionMode | None = None
) -> None:
    """Set the routing mode (and optionally the evaluation execution path) of a converted model.

    Example:
        >>> set_routing(model, "full")          # doctest: +SKIP
        >>> set_routing(model, "eval", execution="planned")  # doctest: +SKIP
    """
    bank = get_state(model)
    if mode is not None and mode not in MODES:
        raise ConfigError(f"routing mode must be one of {', '.join(MODES)} or None; got {mode!r}")
    exec_mode = execution_mode(execution) if execution is not None else None  # checked first
    bank.mode = mode
    if exec_mode is not None:
        bank.execution = exec_mode


@contextlib.contextmanager
def routing(
    model: nn.Module, mode: str | None, execution: str | ExecutionMode | None = None
) -> Iterator[nn.Module]:
    """Context manager form of :func:`set_routing`; restores the previous settings on exit.

    Example:
        >>> with routing(model, "full"):        # doctest: +SKIP
        ...     reference = model(x, t, y)
    """
    bank = get_state(model)
    old = (bank.mode, bank.execution)
    set_routing(model, mode, execution)
    try:
        yield model
    finally:
        bank.mode, bank.execution = old
