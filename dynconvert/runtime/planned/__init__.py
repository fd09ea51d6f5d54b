"""The planned path: static-shape execution per timestep pattern, and its CUDA graphs.

- ``planner.py``: the runtime (:class:`Planner`): patterns per t, pre-sliced weights, fixed
  token capacities.
- ``controls.py``: the user-facing functions (capacities, options, overflow count, stats).
- ``graphs.py``: one CUDA graph per pattern and input shape.

The user-facing names are re-exported here lazily (``dynconvert.runtime.planned.token_overflow``):
the runtime's bank imports the planner while this package initialises, so nothing is imported
eagerly.

Example:
    >>> import dynconvert
    >>> from dynconvert.runtime.planned import token_overflow
    >>> from dynconvert.testing import tiny_dit
    >>> token_overflow(dynconvert.convert(tiny_dit(), 0.5)).dropped
    0
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "capacity_from_keep": "controls",
    "capacity_record": "controls",
    "configure_planned": "controls",
    "load_capacity_record": "controls",
    "planned_stats": "controls",
    "planner_of": "controls",
    "set_token_capacity": "controls",
    "token_overflow": "controls",
    "Planner": "planner",
    "PlannedOptions": "planner",
    "TokenOverflow": "planner",
    "disable_cuda_graphs": "graphs",
    "enable_cuda_graphs": "graphs",
    "graph_stats": "graphs",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
