"""What calibration reports: ``StepInfo`` after each step, ``CalibrationResult`` at the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn


@dataclass(frozen=True)
class StepInfo:
    """Progress of one calibration step, given to the ``on_step`` callback (main process only).

    Loss values are means over the batch and over processes.

    Attributes:
        step: Steps completed so far (1 after the first step).
        total_steps: ``config.steps``.
        loss: The total loss of the step.
        terms: The parts: "diffusion" (the model's own objective), "flops" (the FLOPs term),
            "mse", "vb" (learned sigma only, else 0), "distill", "complete" (0 when off).
        flops_ratio: Mean F_dyn / F_static of the batch (what the FLOPs term pulls to lambda).
        lambda_target: lambda at this step.
        lr: The learning rate.
        grad_norm: Total gradient norm before clipping (None when the loss was non-finite).
        steps_per_sec: Average speed of this run so far.
        eta_seconds: Estimated time to finish.
        skipped: None, "nonfinite_loss" or "grad_norm" when the optimiser step was skipped.
        skipped_nonfinite: Steps skipped so far for a non-finite loss.
        skipped_grad_norm: Steps skipped so far for a non-finite or too large gradient norm.
        checkpoint: Path of the checkpoint written after this step, if any.

    Example:
        >>> def on_step(info: StepInfo) -> None:
        ...     if info.step % 100 == 0:
        ...         print(f"{info.step}/{info.total_steps} loss {info.loss:.4f} "
        ...               f"flops {info.flops_ratio:.3f} -> {info.lambda_target:.3f}")
    """

    step: int
    total_steps: int
    loss: float
    terms: dict[str, float]
    flops_ratio: float
    lambda_target: float
    lr: float
    grad_norm: float | None
    steps_per_sec: float
    eta_seconds: float
    skipped: str | None = None
    skipped_nonfinite: int = 0
    skipped_grad_norm: int = 0
    checkpoint: str | None = None


@dataclass
class CalibrationResult:
    """The outcome of ``calibrate``.

    Attributes:
        model: The converted model with the EMA weights, in eval mode (what to sample with).
        config: The config used.
        steps: Steps completed (``config.steps``).
        losses: Total loss of every step from step 1 (including the steps before a resume).
        flops_ratios: Batch-mean FLOPs ratio of every step.
        last_terms: The loss terms of the last step.
        skipped_nonfinite: Steps skipped for a non-finite loss.
        skipped_grad_norm: Steps skipped for a non-finite or too large gradient norm.
        last_checkpoint: The newest checkpoint written (None without ``output_dir``).
        resumed_from: The checkpoint this run resumed from, if any.
        train_state_dict: The raw (non-EMA) weights at the end, on CPU (frozen ones share the
            model's storage on a CPU model: the EMA leaves them as they are).
        trainable_params: Values trained (and tracked by the EMA and AdamW).
        total_params: Values of the model as it was trained (a LoRA adapter included).

    Example:
        >>> r = CalibrationResult(model=nn.Identity(), config=None, steps=0)
        >>> r.skipped_nonfinite
        0
    """

    model: nn.Module
    config: Any
    steps: int
    losses: list[float] = field(default_factory=list)
    flops_ratios: list[float] = field(default_factory=list)
    last_terms: dict[str, float] = field(default_factory=dict)
    skipped_nonfinite: int = 0
    skipped_grad_norm: int = 0
    last_checkpoint: Path | None = None
    resumed_from: Path | None = None
    train_state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    trainable_params: int = 0
    total_params: int = 0
