"""CalibrationConfig: every setting of the calibration run.

Defaults from the paper (docs/method.md, "Hyperparameters").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dynconvert.errors import ConfigError
from dynconvert.fields import SEED_MAX, Range, check_fields

CALIBRATION_CONFIG_VERSION = 1

OBJECTIVES = ("auto", "eps", "v", "flow")
BETA_SCHEDULES = ("auto", "linear", "scaled_linear")
ADAPTERS = ("auto", "dit", "uvit", "diffusers_dit", "pixart", "generic")
MIXED_PRECISION = ("no", "bf16", "fp16")
TRAINABLE = ("all", "routers", "lora")
LORA_SAVE = ("merge", "adapter")
FLOW_T_DISTS = ("logit_normal", "uniform")
PROGRESS = ("auto", "bar", "log", "off")

RESUME_FREE_FIELDS = frozenset(
    {
        "steps",
        "checkpoint_every",
        "keep_checkpoints",
        "output_dir",
        "resume",
        "check_memory",
        "gradient_checkpointing",
        "num_workers",
        "cpu",
        "capacity_points",
        "progress",
        "log_every",
    }
)
"""Fields a resumed run may change; every other field must equal the checkpoint's."""


def _one_of(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{name} must be one of {', '.join(valid)}; got {value!r}")


_POSITIVE = Range(0, low_open=True)
_NON_NEGATIVE = Range(0)
_RANGES = {
    "target": Range(0, 1, low_open=True),
    "steps": Range(1),
    "batch_size": Range(1, 65536),
    "lr": Range(0, 10),
    "weight_decay": Range(0, 1e3),
    "adam_betas": Range(0, 1, high_open=True),
    "flops_weight": Range(0, 1e6),
    "lambda_hold_steps": _NON_NEGATIVE,
    "warmup_steps": _NON_NEGATIVE,
    "complete_model_steps": _NON_NEGATIVE,
    "diffusion_weight": Range(0, 1e6),
    "distill_weight": Range(0, 1e6),
    "ema_decay": Range(0, 1, high_open=True),
    "grad_clip": _POSITIVE,
    "skip_grad_norm": _POSITIVE,
    "grad_accum_steps": Range(1, 65536),
    "seed": Range(0, SEED_MAX),
    "checkpoint_every": _NON_NEGATIVE,
    "keep_checkpoints": Range(1),
    "num_train_timesteps": Range(2, 100_000),
    "timestep_strata": Range(1, 100_000),
    "flow_logit_mean": Range(-100, 100),
    "flow_logit_std": Range(0, 100, low_open=True),
    "flow_timestep_scale": _POSITIVE,
    "label_dropout": Range(0, 1, high_open=True),
    "null_label": _NON_NEGATIVE,
    "num_classes": Range(1),
    "max_nonfinite_in_a_row": Range(1),
    "num_workers": Range(0, 1024),
    "capacity_points": Range(0, 1000),
    "log_every": Range(1),
    "lora_rank": Range(1, 65536),
    "lora_alpha": Range(0, 1e6, low_open=True),
    "version": Range(1),
}
"""Valid ranges of the number fields (the types come from the annotations)."""


@dataclass
class CalibrationConfig:
    """Settings of ``calibrate``; defaults are the paper's (docs/method.md, "Hyperparameters").

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
        grad_accum_steps: Micro-batches per optimiser step: each process runs its share of
            ``batch_size`` in this many forward/backward passes (same global batch, less
            activation memory).
        gradient_checkpointing: Recompute each transformer block in backward instead of keeping
            its activations (routing replays the same masks and noise; the result is the same).
        check_memory: Refuse to start when the memory plan (``calibration.memory``) exceeds the
            device's free memory; False skips the check (``--force``).
        trainable: "all" (routers and model, the paper), "routers" (base weights frozen) or
            "lora" (base weights frozen; a LoRA adapter on the routed Linears and the routers
            trained: ``calibration/trainable.py``).
        lora_rank: Rank of the adapter ``trainable="lora"`` trains.
        lora_alpha: Its peft ``lora_alpha`` (scale ``alpha / rank``; None: the rank, scale 1).
        lora_targets: Module names (or name suffixes, as peft's ``target_modules``) it wraps;
            None: every routed Linear and pointwise convolution.
        td_lora: Scale the adapter's rank components by a gate read from the timestep
            embedding the width routers read (TD-LoRA; needs ``lora_save="adapter"``: a
            timestep-dependent update has no merged weight).
        lora_save: "merge" (the adapter merged into the base weights at the end: the result
            runs and loads without peft) or "adapter" (kept; saved as a peft/diffusers LoRA
            file beside the model).
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
        capacity_points: Timesteps at which the calibrated model's token keep rates are
            measured, at the end, to set the planned path's token capacities (saved with the
            model; ``calibration.capacity``). 0: leave capacities unset (the planned path then
            runs token-routed MLPs on every token).
        progress: What ``calibrate`` shows by itself (beside ``on_step``), on the main
            process: "auto" (a bar on stderr when it is a terminal, else log lines through the
            "dynconvert" logger), "bar", "log" or "off" (``calibration.progress``).
        log_every: Steps between two log lines (None: about 20 lines per run, at least one
            every 100 steps).
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
    grad_accum_steps: int = 1
    gradient_checkpointing: bool = False
    check_memory: bool = True
    trainable: str = "all"
    lora_rank: int = 16
    lora_alpha: float | None = None
    lora_targets: list[str] | None = None
    td_lora: bool = False
    lora_save: str = "merge"
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
    capacity_points: int = 11
    progress: str = "auto"
    log_every: int | None = None
    version: int = CALIBRATION_CONFIG_VERSION

    def __post_init__(self) -> None:
        # Types and ranges of every field first (an integer field refuses 5.0), then the rest.
        check_fields(self, _RANGES)
        self.adam_betas = (float(self.adam_betas[0]), float(self.adam_betas[1]))
        if self.diffusion_weight == 0 and self.distill_weight == 0:
            raise ConfigError(
                "diffusion_weight and distill_weight are both 0: set at least one > 0 "
                "(distill_weight=1, diffusion_weight=0 trains by distillation alone)"
            )
        _one_of("trainable", self.trainable, TRAINABLE)
        self._check_lora()
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(
                f"batch_size {self.batch_size} must be divisible by grad_accum_steps "
                f"{self.grad_accum_steps} (each step runs that many equal micro-batches)"
            )
        _one_of("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        if self.resume and not self.output_dir:
            raise ConfigError("resume=True needs output_dir (the folder holding the checkpoints)")
        _one_of("objective", self.objective, OBJECTIVES)
        _one_of("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _one_of("flow_t_dist", self.flow_t_dist, FLOW_T_DISTS)
        _one_of("adapter", self.adapter, ADAPTERS)
        _one_of("progress", self.progress, PROGRESS)
        if self.version > CALIBRATION_CONFIG_VERSION:
            raise ConfigError(
                f"calibration config version {self.version} is newer than this dynconvert "
                f"({CALIBRATION_CONFIG_VERSION}); upgrade dynconvert"
            )

    def _check_lora(self) -> None:
        """The LoRA settings fit together (rank, alpha and targets are read only for "lora")."""
        _one_of("lora_save", self.lora_save, LORA_SAVE)
        if self.trainable != "lora" and (self.td_lora or self.lora_save != "merge"):
            raise ConfigError(
                f"td_lora and lora_save apply to trainable='lora'; got trainable="
                f"{self.trainable!r}: set trainable='lora' or leave them at their defaults"
            )
        if self.td_lora and self.lora_save == "merge":
            raise ConfigError(
                "td_lora=True scales the adapter per timestep, which no merged weight can hold; "
                "set lora_save='adapter' (the adapter and its gates are saved beside the model)"
            )
        if self.lora_targets is not None and not self.lora_targets:
            raise ConfigError("lora_targets is empty; name modules, or None for every routed one")

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
