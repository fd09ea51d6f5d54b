"""Quality evaluations a run can perform, by name (a recipe's ``evaluate.kind``).

The core knows no data set: an evaluation is registered by whoever owns one (the digits demo
registers ``digits``: classifier accuracy and Frechet distance of generated digits). A run calls
``check`` before any work, so a recipe that asks for an evaluation its model cannot take is
refused at once, and ``run`` after calibration, merging what it returns into ``report.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from dynconvert.plugins import Registry

NONE = "none"
"""The ``evaluate.kind`` that evaluates nothing."""


@dataclass(frozen=True)
class Evaluation:
    """A named evaluation of a calibrated model against its original.

    Attributes:
        name: The ``evaluate.kind`` that selects it.
        run: ``run(original, dynamic, recipe, out_dir) -> dict`` of JSON-ready report fields
            (it may write files, e.g. a sample grid, into ``out_dir`` and name them).
        check: ``check(model) -> str``: why this model cannot be evaluated ("" when it can).
        description: One line for progress events and error messages.
        summary: ``summary(fields) -> str``: one line on the result, for progress events.
    """

    name: str
    run: Callable[[nn.Module, nn.Module, Any, Path], dict[str, Any]]
    check: Callable[[nn.Module], str] = lambda model: ""
    description: str = ""
    summary: Callable[[dict[str, Any]], str] = lambda fields: "done"


EVALUATIONS: dict[str, Evaluation] = Registry()
"""Registered evaluations by name (``NONE`` is always valid and is not listed here)."""


def register_evaluation(evaluation: Evaluation) -> None:
    """Make ``evaluate.kind: <evaluation.name>`` available to recipes and runs.

    Example:
        >>> register_evaluation(Evaluation("params", lambda orig, dyn, recipe, out: {
        ...     "parameters": sum(p.numel() for p in dyn.parameters())}))
        >>> "params" in evaluation_names()
        True
    """
    EVALUATIONS[evaluation.name] = evaluation


def evaluation_names() -> list[str]:
    """Every valid ``evaluate.kind``: ``none`` and the registered ones."""
    return [NONE, *sorted(EVALUATIONS)]
