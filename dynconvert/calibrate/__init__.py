"""Calibration: fine-tune a converted model toward its FLOPs budget (method.md, "training objective").

The entry point is ``calibrate(model, data, config, on_step=None)``. This package is itself
callable, so ``dynconvert.calibrate(...)`` works whether ``dynconvert`` exposes the package or the
function under that name.

Example:
    >>> from dynconvert.calibrate import CalibrationConfig, lambda_at
    >>> cfg = CalibrationConfig(target=0.5, steps=2000, batch_size=64)
    >>> lambda_at(1100, cfg.target, cfg.lambda_hold_steps, cfg.warmup_steps)
    0.5
"""

from __future__ import annotations

import sys
import types

from dynconvert.calibrate.adapters import ModelAdapter, generic_adapter, select_adapter
from dynconvert.calibrate.checkpoint import latest_checkpoint, load_checkpoint
from dynconvert.calibrate.config import CalibrationConfig
from dynconvert.calibrate.data import (
    ImageFolderSource,
    IterableSource,
    LatentShards,
    Source,
    TensorSource,
    as_source,
    register_source,
)
from dynconvert.calibrate.diffusion import FlowMatching, GaussianDiffusion, make_betas
from dynconvert.calibrate.ema import EMA
from dynconvert.calibrate.latents import read_index, write_latent_shards, write_latents
from dynconvert.calibrate.loop import calibrate, make_accelerator
from dynconvert.calibrate.objectives import build_objective, distill_loss, flops_loss
from dynconvert.calibrate.result import CalibrationResult, StepInfo
from dynconvert.calibrate.schedule import (
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


class _CallablePackage(types.ModuleType):
    """Lets ``dynconvert.calibrate(model, data, config)`` call the function of the same name."""

    def __call__(self, *args, **kwargs):
        return calibrate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
