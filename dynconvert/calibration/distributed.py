"""accelerate set-up for calibration: the Accelerator, and undoing its wrapping of forward."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn

from dynconvert.calibration.config import CalibrationConfig
from dynconvert.errors import ConfigError

MISSING = object()
"""Marks a model that had no instance-level ``forward`` before ``accelerator.prepare``."""


def make_accelerator(config: CalibrationConfig):
    """An ``accelerate.Accelerator`` for the config (mixed precision, DDP unused-parameter search).

    On a machine without CUDA launched as several processes (torchrun), it asks for CPU, so
    DDP runs over gloo. In a single process, an earlier Accelerator with another mixed
    precision is reset rather than refused.

    Example:
        >>> from dynconvert.calibration.config import CalibrationConfig
        >>> make_accelerator(CalibrationConfig(target=0.5)).num_processes
        1

    Raises:
        ConfigError: accelerate refuses the settings (e.g. fp16 without a GPU, or a different
            mixed precision than an Accelerator already created in this process).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedDataParallelKwargs

    if AcceleratorState._shared_state and not PartialState().use_distributed:
        # One process (a notebook, a test): an earlier run's settings would make accelerate
        # refuse a different mixed precision; start its state afresh instead.
        old = AcceleratorState()
        if old.mixed_precision != config.mixed_precision or (
            config.cpu and old.device.type != "cpu"
        ):
            AcceleratorState._reset_state()
    # Launched as several processes (torchrun) on a machine without CUDA: DDP over gloo on CPU.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = config.cpu or (launched and not torch.cuda.is_available())
    try:
        return Accelerator(
            mixed_precision=config.mixed_precision,
            cpu=cpu,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
    except (ValueError, RuntimeError) as err:
        raise ConfigError(
            f"mixed_precision={config.mixed_precision!r}: accelerate says: {err}"
        ) from err


def restore_forward(model: nn.Module, saved: Any) -> None:
    """Undo accelerate's mixed-precision wrapping of ``forward`` (its own unwrap would bind a
    callable-object forward, such as a converted model's, as a method).

    Args:
        model: The model ``accelerator.prepare`` was given.
        saved: ``model.__dict__.get("forward", MISSING)`` taken before ``prepare``.

    Example:
        >>> import torch.nn as nn
        >>> m = nn.Linear(1, 1); m.forward = print
        >>> restore_forward(m, MISSING); "forward" in m.__dict__
        False
    """
    model.__dict__.pop("_original_forward", None)
    if saved is MISSING:
        model.__dict__.pop("forward", None)
    else:
        model.forward = saved
