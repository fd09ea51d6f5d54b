"""What a run is asked to do (:class:`RunRequest`) and what it has once checked and converted
(:class:`PreparedRun`): plain data shared by the run's modules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from dynconvert.recipes import Recipe
from dynconvert.runs.sources import ModelSource

EventFn = Callable[[str, str], None]
"""``on_event(stage, message)``: progress of the stages around calibration, for a CLI to show."""


@dataclass
class RunRequest:
    """What the user asked for (the options of ``dynconvert convert``).

    Attributes:
        model: Preset name or alias, or a diffusers model name (``pixart-alpha``); default: the
            recipe's model.
        target_flops: FLOPs budget in (0, 1]; default: the recipe's.
        recipe: Shipped recipe name or YAML file; default: the recipe for ``model``.
        checkpoint: Weights file or diffusers folder.
        data: Latents folder, ``digits`` or ``synthetic``; default: the recipe's.
        steps: Calibration steps (overrides ``calibration.steps``).
        out: Run folder; default ``runs/<model>-<target>``.
        device: "auto", "cpu" or "cuda".
        resume: Continue the run in ``out``.
        random_init: Start from random weights (to try the pipeline).
        overrides: ``key=value`` recipe overrides (``calibration.lr=2e-5``).
        force: Start even when the memory plan says calibration will not fit the device.
    """

    model: str | None = None
    target_flops: float | str | None = None
    recipe: str | None = None
    checkpoint: str | None = None
    data: str | None = None
    steps: int | None = None
    out: str | None = None
    device: str = "auto"
    resume: bool = False
    random_init: bool = False
    overrides: list[str] = field(default_factory=list)
    force: bool = False


@dataclass
class PreparedRun:
    """A checked run with its converted model, ready to execute: nothing written yet."""

    request: RunRequest
    recipe: Recipe
    source: ModelSource
    target: float
    out: Path
    device: str
    calibration: Any
    model: nn.Module
    data: Any
    identity: dict[str, Any]
    previous: dict[str, Any] | None = None
    main_process: bool = True
