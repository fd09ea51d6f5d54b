"""Calibration: fine-tune a converted model toward its FLOPs budget (docs/method.md, "Training
objective").

The entry point is ``calibrate(model, data, config, on_step=None)``, which the package exposes
as ``dynconvert.calibrate``; this package holds its parts (config, data, objectives, schedule,
EMA, checkpoints, the loop with its setup and steps, and the progress it shows by itself).

Example:
    >>> from dynconvert.calibration import CalibrationConfig, lambda_at
    >>> cfg = CalibrationConfig(target=0.5, steps=2000, batch_size=64)
    >>> lambda_at(1100, cfg.target, cfg.lambda_hold_steps, cfg.warmup_steps)
    0.5
"""

from __future__ import annotations

from dynconvert.calibration.adapters import ModelAdapter, generic_adapter, select_adapter
from dynconvert.calibration.checkpoint import latest_checkpoint, load_checkpoint
from dynconvert.calibration.config import CalibrationConfig
from dynconvert.calibration.data import (
    ImageFolderSource,
    IterableSource,
    LatentShards,
    Source,
    TensorSource,
    as_source,
    register_source,
)
from dynconvert.calibration.diffusion import FlowMatching, GaussianDiffusion, make_betas
from dynconvert.calibration.ema import EMA
from dynconvert.calibration.latents import read_index, write_latent_shards, write_latents
from dynconvert.calibration.loop import calibrate, make_accelerator
from dynconvert.calibration.objectives import build_objective, distill_loss, flops_loss
from dynconvert.calibration.progress import MicroBatchInfo
from dynconvert.calibration.result import CalibrationResult, StepInfo
from dynconvert.calibration.schedule import (
    LambdaSchedule,
    lambda_at,
    sample_ddpm_timesteps,
    sample_flow_times,
)

__all__ = [
    "EMA",
    "CalibrationConfig",
    "CalibrationResult",
    "FlowMatching",
    "GaussianDiffusion",
    "ImageFolderSource",
    "IterableSource",
    "LambdaSchedule",
    "LatentShards",
    "MicroBatchInfo",
    "ModelAdapter",
    "Source",
    "StepInfo",
    "TensorSource",
    "as_source",
    "build_objective",
    "calibrate",
    "distill_loss",
    "flops_loss",
    "generic_adapter",
    "lambda_at",
    "latest_checkpoint",
    "load_checkpoint",
    "make_accelerator",
    "make_betas",
    "read_index",
    "sample_ddpm_timesteps",
    "sample_flow_times",
    "register_source",
    "select_adapter",
    "write_latent_shards",
    "write_latents",
]
