"""CalibrationConfig: every setting of the calibration run, defaults from the paper (method.md)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from dynconvert.errors import ConfigError

CALIBRATION_CONFIG_VERSION = 1

OBJECTIVES = ("auto", "eps", "v", "flow")
BETA_SCHEDULES = ("auto", "linear", "scaled_linear")
ADAPTERS = ("auto", "dit", "uvit", "diffusers_dit", "pixart", "generic")
MIXED_PRECISION = ("no", "bf16", "fp16")
TRAINABLE = ("all", "routers")
FLOW_T_DISTS = ("logit_normal", "uniform")

RESUME_FREE_FIELDS = frozenset(
    {"steps", "checkpoint_every", "keep_checkpoints", "output_dir", "resume", "num_workers", "cpu"}
)
"""Fields a resumed run may change; every other field must equal the checkpoint's."""


def _one_of(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{name} must be one of {', '.join(valid)}; got {value!r}")


def _at_least(name: str, value: Any, low: float, kind: type = int) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok or not math.isfinite(value) or value < low:
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"{name} must be {what} >= {low}; got {value!r}")


@dataclass
class CalibrationConfig:
    """Settings of ``calibrate``. Defaults are the DyDiT paper's (method.md, "training objective").

    Attributes:
        target: The final FLOPs ratio lambda (F_dyn / F_static), in (0, 1]. Required.
        steps: Optimiser steps (DiT-S 50k, DiT-B 100k, DiT-XL 150k-200k in the paper).
        batch_size: Global batch size over all processes (256 in the paper).
        lr: AdamW learning rate (2.5e-5 in the paper's lambda 0.7 run).
        weight_decay: AdamW weight decay.
        adam_betas: AdamW betas.
        flops_weight: w in ``w * (mean F_dyn/F_static - lambda)^2``.
        lambda_hold_steps: Steps lambda is held at 1.0 before the warm-up.
        warmup_steps: Steps of the linear descent of lambda from 1.0 to ``target``.
        complete_model_steps: First steps that add the complete-model (full width) loss.
        diffusion_weight: Weight of the diffusion loss (0 with ``distill_weight`` > 0 is pure
            distillation, which needs no labels).
        distill_weight: Weight of the MSE to a frozen copy of the original model's output.
        ema_decay: EMA decay; EMA weights are what ``calibrate`` returns and saves for sampling.
        ema_warmup: Use decay ``min(ema_decay, (1 + step) / (10 + step))`` (off in the paper;
            useful for short runs, where 0.9999 leaves the EMA near the starting weights).
        grad_clip: Max total gradient norm (None: no clipping).
        skip_grad_norm: Skip the optimiser step when the total norm exceeds this (None: only
            non-finite norms skip).
        trainable: "all" (routers and model, the paper) or "routers" (base weights frozen).
        mixed_precision: "no", "bf16" or "fp16" (passed to accelerate).
        seed: Seed of all randomness (data order, timesteps, noise, router Gumbel noise).
        checkpoint_every: Write a checkpoint every N steps (0: only at the end).
        keep_checkpoints: How many recent checkpoints to keep.
        output_dir: Folder of checkpoints (None: no checkpoints, no resume).
        resume: Continue from the latest checkpoint in ``output_dir``.
        objective: "auto" (from the model family), "eps", "v" or "flow".
        beta_schedule: "auto", "linear" (DDPM/DiT, 1e-4..0.02) or "scaled_linear" (SD/U-ViT).
        num_train_timesteps: Timesteps of the DDPM schedule.
        learn_sigma: Whether the model predicts a variance (None: 2*C output channels).
        timestep_strata: Strata of the timestep sampler (4 quarters in the paper).
        flow_t_dist: Flow-matching t distribution, "logit_normal" or "uniform".
        flow_logit_mean: Mean of the logit-normal.
        flow_logit_std: Standard deviation of the logit-normal.
        flow_timestep_scale: Flow t in [0, 1] is passed to the model times this.
        label_dropout: Probability of replacing a label by the null label (classifier-free
            guidance training); None: the model family's own value.
        null_label: The null (unconditional) label; None: found from the model.
        num_classes: Number of real classes (None: found from the model).
        adapter: How to call the model: "auto" (from its class) or a family name.
        adapter_args: For "generic": batch key -> forward keyword, e.g. ``{"x": "sample",
            "t": "timestep", "y": "class_labels", "output": "sample"}``.
        max_nonfinite_in_a_row: Non-finite losses in a row that stop the run.
        num_workers: DataLoader worker processes.
        cpu: Force CPU even when an accelerator is present.
        version: Config format version.

    Example:
        >>> cfg = CalibrationConfig(target=0.5, steps=1000, batch_size=32)
        >>> cfg.flops_weight, cfg.lambda_hold_steps
        (2.0, 100)
    """

    target: float
    steps: int = 50_000
    batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    flops_weight: float = 2.0
    lambda_hold_steps: int = 100
    warmup_steps: int = 1000
    complete_model_steps: int = 0
    diffusion_weight: float = 1.0
    distill_weight: float = 0.0
    ema_decay: float = 0.9999
    ema_warmup: bool = False
    grad_clip: float | None = 1.0
    skip_grad_norm: float | None = 100.0
    trainable: str = "all"
    mixed_precision: str = "no"
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    output_dir: str | None = None
    resume: bool = False
    objective: str = "auto"
    beta_schedule: str = "auto"
    num_train_timesteps: int = 1000
    learn_sigma: bool | None = None
    timestep_strata: int = 4
    flow_t_dist: str = "logit_normal"
    flow_logit_mean: float = 0.0
    flow_logit_std: float = 1.0
    flow_timestep_scale: float = 1000.0
    label_dropout: float | None = None
    null_label: int | None = None
    num_classes: int | None = None
    adapter: str = "auto"
    adapter_args: dict[str, str] = field(default_factory=dict)
    max_nonfinite_in_a_row: int = 5
    num_workers: int = 0
    cpu: bool = False
    version: int = CALIBRATION_CONFIG_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.target, bool) or not isinstance(self.target, (int, float)):
            raise ConfigError(f"target must be a number in (0, 1]; got {self.target!r}")
        if not (0.0 < self.target <= 1.0):
            raise ConfigError(f"target must be in (0, 1] (a FLOPs ratio); got {self.target}")
        _at_least("steps", self.steps, 1)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("lr", self.lr, 0.0, float)
        _at_least("weight_decay", self.weight_decay, 0.0, float)
        betas = tuple(self.adam_betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"adam_betas must be two numbers in [0, 1); got {self.adam_betas!r}")
        self.adam_betas = (float(betas[0]), float(betas[1]))
        _at_least("flops_weight", self.flops_weight, 0.0, float)
        _at_least("lambda_hold_steps", self.lambda_hold_steps, 0)
        _at_least("warmup_steps", self.warmup_steps, 0)
        _at_least("complete_model_steps", self.complete_model_steps, 0)
        _at_least("diffusion_weight", self.diffusion_weight, 0.0, float)
        _at_least("distill_weight", self.distill_weight, 0.0, float)
        if self.diffusion_weight == 0 and self.distill_weight == 0:
            raise ConfigError(
                "diffusion_weight and distill_weight are both 0: set at least one > 0 "
                "(distill_weight=1, diffusion_weight=0 trains by distillation alone)"
            )
        if not (0.0 <= self.ema_decay < 1.0):
            raise ConfigError(f"ema_decay must be in [0, 1); got {self.ema_decay}")
        if self.grad_clip is not None:
            _at_least("grad_clip", self.grad_clip, 1e-12, float)
        if self.skip_grad_norm is not None:
            _at_least("skip_grad_norm", self.skip_grad_norm, 1e-12, float)
        _one_of("trainable", self.trainable, TRAINABLE)
        _one_of("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _at_least("seed", self.seed, 0)
        _at_least("checkpoint_every", self.checkpoint_every, 0)
        _at_least("keep_checkpoints", self.keep_checkpoints, 1)
        if self.resume and not self.output_dir:
            raise ConfigError("resume=True needs output_dir (the folder holding the checkpoints)")
        _one_of("objective", self.objective, OBJECTIVES)
        _one_of("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _at_least("num_train_timesteps", self.num_train_timesteps, 2)
        _at_least("timestep_strata", self.timestep_strata, 1)
        _one_of("flow_t_dist", self.flow_t_dist, FLOW_T_DISTS)
        _at_least("flow_logit_std", self.flow_logit_std, 1e-6, float)
        _at_least("flow_timestep_scale", self.flow_timestep_scale, 1e-12, float)
        if self.label_dropout is not None and not (0.0 <= self.label_dropout < 1.0):
            raise ConfigError(f"label_dropout must be in [0, 1) or None; got {self.label_dropout}")
        if self.null_label is not None:
            _at_least("null_label", self.null_label, 0)
        if self.num_classes is not None:
            _at_least("num_classes", self.num_classes, 1)
        _one_of("adapter", self.adapter, ADAPTERS)
        if not isinstance(self.adapter_args, dict):
            raise ConfigError(
                f"adapter_args must be a dict; got {type(self.adapter_args).__name__}"
            )
        _at_least("max_nonfinite_in_a_row", self.max_nonfinite_in_a_row, 1)
        _at_least("num_workers", self.num_workers, 0)
        if self.version > CALIBRATION_CONFIG_VERSION:
            raise ConfigError(
                f"calibration config version {self.version} is newer than this dynconvert "
                f"({CALIBRATION_CONFIG_VERSION}); upgrade dynconvert"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationConfig:
        """Build from a dict (a recipe or a checkpoint's config), rejecting unknown keys.

        Args:
            data: Field name -> value. ``target`` is required.

        Returns:
            The validated config.

        Raises:
            ConfigError: An unknown key (the message lists the valid ones), a missing target, or
                a bad value.

        Example:
            >>> CalibrationConfig.from_dict({"target": 0.5, "lr": 2.5e-5}).lr
            2.5e-05
        """
        if not isinstance(data, dict):
            raise ConfigError(f"a calibration config must be a dict; got {type(data).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ConfigError(
                f"unknown calibration config key(s) {', '.join(unknown)}; "
                f"valid keys: {', '.join(sorted(valid))}"
            )
        if "target" not in data:
            raise ConfigError("calibration config needs 'target' (the final FLOPs ratio, e.g. 0.5)")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that ``from_dict`` turns back into an equal config.

        Example:
            >>> cfg = CalibrationConfig(target=0.5)
            >>> CalibrationConfig.from_dict(cfg.to_dict()) == cfg
            True
        """
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    def resume_mismatch(self, saved: dict[str, Any]) -> list[str]:
        """Fields that differ from a checkpoint's config and must not change on resume.

        Args:
            saved: The ``to_dict()`` of the run that wrote the checkpoint.

        Returns:
            Names of the differing fields, sorted (empty when the run may resume).

        Example:
            >>> a = CalibrationConfig(target=0.5, steps=10)
            >>> CalibrationConfig(target=0.5, steps=20).resume_mismatch(a.to_dict())
            []
        """
        mine = self.to_dict()
        return sorted(
            k for k in mine if k not in RESUME_FREE_FIELDS and saved.get(k, mine[k]) != mine[k]
        )


def as_config(config: CalibrationConfig | dict[str, Any]) -> CalibrationConfig:
    """Accept a ``CalibrationConfig`` or a dict of its fields.

    Example:
        >>> as_config({"target": 0.7}).target
        0.7
    """
    if isinstance(config, CalibrationConfig):
        return config
    if isinstance(config, dict):
        return CalibrationConfig.from_dict(config)
    raise ConfigError(f"config must be a CalibrationConfig or a dict; got {type(config).__name__}")
