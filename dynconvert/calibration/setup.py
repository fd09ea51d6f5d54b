"""The setup of a calibration run: the model checked, the teacher frozen, the trainable
parameters, optimiser and EMA built, a resumed run's state loaded, and the model's training
flags put back however the run ends. ``loop.calibrate`` calls these before its first step.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dynconvert.calibration.adapters import label_embedders
from dynconvert.calibration.checkpoint import load_training_state, restore_rng
from dynconvert.calibration.config import CalibrationConfig
from dynconvert.calibration.distributed import MISSING, restore_forward, sharding_of
from dynconvert.calibration.ema import EMA
from dynconvert.calibration.sharded import prepare_sharding
from dynconvert.calibration.sharded_checkpoint import resume_after_sharding
from dynconvert.calibration.trainable import attach_lora, select_trainable
from dynconvert.errors import BudgetError, ConfigError, NotConvertedError
from dynconvert.flops import min_ratio
from dynconvert.runtime.routing import set_routing
from dynconvert.runtime.state import get_state, is_converted


@dataclass
class TrainingRun:
    """One run's training objects, and what its loop carries from step to step (DiT's
    ``train.py`` locals, named). The fields after ``ema`` are what a checkpoint saves."""

    cfg: CalibrationConfig
    accelerator: Any  # accelerate.Accelerator
    model: nn.Module  # the model, unwrapped
    ddp_model: nn.Module  # the model as accelerate prepared it (DDP-wrapped on several processes)
    state: Any  # the converted model's RouterBank
    params: list[nn.Parameter]  # the trainable parameters, in the optimiser's order
    optimizer: Any  # torch.optim.AdamW, as accelerate prepared it
    ema: EMA
    start: int = 0  # the first step of this call (a resumed run's checkpoint step)
    history: dict[str, list[float]] = field(default_factory=lambda: {"loss": [], "flops_ratio": []})
    counters: dict[str, int] = field(
        default_factory=lambda: {"skipped_nonfinite": 0, "skipped_grad_norm": 0}
    )
    last_ckpt: Path | None = None  # the newest checkpoint written or resumed from
    resumed_from: Path | None = None
    in_a_row: int = 0  # non-finite losses in a row
    last: dict[str, float] = field(default_factory=dict)  # the last step's logged values
    last_batch: dict[str, torch.Tensor] | None = None  # for the token capacities at the end
    counts: dict[str, int] = field(default_factory=dict)  # trainable_params, total_params
    names: list[str] = field(default_factory=list)  # the trainable parameters' names, in order
    skeleton: nn.Module | None = None  # FSDP: the unsharded copy the result is gathered into


def converted_state(model: nn.Module, target: float) -> Any:
    """The RouterBank of a converted model that can reach ``target``.

    Raises:
        NotConvertedError: ``model`` was not converted.
        BudgetError: ``target`` is below the lowest FLOPs ratio the model can reach.

    Example:
        >>> import dynconvert
        >>> from dynconvert.testing import tiny_dit
        >>> bank = converted_state(dynconvert.convert(tiny_dit(), budget=0.5), 0.5)
    """
    if not is_converted(model):
        raise NotConvertedError(
            "calibrate needs a converted model; call dynconvert.convert(model, budget) first"
        )
    state = get_state(model)
    minimum = min_ratio(state.plan, state.config.token_reduction)
    if target < minimum - 1e-9:
        raise BudgetError(
            f"target {target} is below the minimum FLOPs ratio this converted model can reach "
            f"({minimum:.4f}: only the always-on units and unroutable parts running); choose "
            f"target >= {minimum:.4f}, or convert with more routable sites"
        )
    return state


def frozen_teacher(
    model: nn.Module, teacher: nn.Module | None, cfg: CalibrationConfig, device: Any
) -> nn.Module | None:
    """The model to distil from, frozen and full width, on ``device``.

    The given ``teacher``, or with ``distill_weight`` > 0 and none given a copy of ``model`` as
    it is now; None when there is nothing to distil from.

    Example:
        >>> teacher = frozen_teacher(model, None, cfg, "cpu")  # doctest: +SKIP
    """
    if cfg.distill_weight > 0 and teacher is None:
        teacher = copy.deepcopy(model)
    if teacher is not None:
        teacher.requires_grad_(False).eval().to(device)
        if is_converted(teacher):
            set_routing(teacher, "full")
    return teacher


@contextmanager
def training_mode(model: nn.Module, state: Any) -> Iterator[None]:
    """Put back, however the run ends, what calibration changes on the model.

    That is: the requires_grad flags, the routing mode, the forward that accelerate's mixed
    precision wraps, and the label dropout of the model's label embedders (zeroed inside: the
    loop drops labels itself, so that a teacher sees the same labels).

    Example:
        >>> with training_mode(model, get_state(model)):  # doctest: +SKIP
        ...     run = setup_run(model, get_state(model), cfg, accelerator)
    """
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    saved_forward = model.__dict__.get("forward", MISSING)  # mixed precision wraps it
    saved_mode = getattr(state, "mode", None)
    dropouts = [(m, m.dropout_prob) for m in label_embedders(model)]
    try:
        for m, _ in dropouts:
            m.dropout_prob = 0.0
        yield
    finally:
        for m, p in dropouts:
            m.dropout_prob = p
        for n, p in model.named_parameters():
            p.requires_grad_(grad_flags.get(n, p.requires_grad))  # a kept adapter: as peft has it
        set_routing(model, saved_mode)
        restore_forward(model, saved_forward)


def setup_run(
    model: nn.Module, state: Any, cfg: CalibrationConfig, accelerator: Any
) -> TrainingRun:
    """Build a run's training objects: trainable parameters, AdamW, the EMA.

    A resumed run's checkpoint is loaded into them (``checkpoint.load_training_state``; this
    process's RNG states too) before accelerate prepares the model and the optimiser.

    Args:
        model: The converted model (unwrapped), its label dropout already off.
        state: Its RouterBank.
        cfg: The run's config.
        accelerator: The run's ``accelerate.Accelerator``.

    Returns:
        The run, at step 0 or at its checkpoint's step.

    Raises:
        ConfigError: No parameter is trainable.
        CheckpointError, OutputExistsError: See ``checkpoint.load_training_state``.

    Example:
        >>> run = setup_run(model, get_state(model), cfg, make_accelerator(cfg))  # doctest: +SKIP
    """
    attach_lora(model, cfg)  # trainable="lora": the adapter it trains (B zero: same outputs)
    params = select_trainable(model, cfg)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ConfigError("no parameter is trainable; check trainable= and requires_grad flags")
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay
    )
    # Under FSDP (sharded.py) the EMA is made from the shards and a resumed state loaded into them.
    sharded = sharding_of(accelerator) == "fsdp"
    ema = None if sharded else EMA(model, cfg.ema_decay, names=names, warmup=cfg.ema_warmup)
    resumed = load_training_state(cfg, model, ema)
    accelerator.wait_for_everyone()  # all processes looked for checkpoints before any write
    skeleton = prepare_sharding(accelerator, model, resumed, sharded)
    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    if sharded:
        params = [p for p in model.parameters() if p.requires_grad]  # fully_shard's DTensors
        ema = EMA(model, cfg.ema_decay, names=names, warmup=cfg.ema_warmup)
        resume_after_sharding(resumed, model, ema, optimizer, names)
    else:
        ema.to(accelerator.device)
    run = TrainingRun(cfg, accelerator, model, ddp_model, state, params, optimizer, ema)
    run.counts = {  # a DTensor's numel is its full tensor's: the same counts under FSDP
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in model.parameters()),
    }
    run.names, run.skeleton = names, skeleton
    if resumed is not None:
        if not sharded:
            optimizer.load_state_dict(resumed["optimizer"])
        if accelerator.scaler is not None and resumed.get("scaler") is not None:
            accelerator.scaler.load_state_dict(resumed["scaler"])
        rng = resumed.get("rng") or []
        if len(rng) == accelerator.num_processes:
            restore_rng(rng[accelerator.process_index])
        run.start, run.history = resumed["step"], resumed["history"]
        run.counters = resumed["counters"]
        run.last_ckpt = run.resumed_from = resumed["path"]
    return run
