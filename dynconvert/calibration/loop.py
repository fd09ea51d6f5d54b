"""The calibration loop: fine-tune a converted model toward its FLOPs budget (method.md).

One readable function in the spirit of DiT's ``train.py``, run through Hugging Face accelerate so
the same code serves one CPU, one GPU, or many processes (``accelerate launch`` / ``torchrun``,
DDP with ``find_unused_parameters=True`` because routed-off units leave parameters unused).
Every step: seed from (seed, rank, step), read this process's rows, noise them at stratified
timesteps, run the dynamic model, add the FLOPs term (and the complete-model and distillation
terms when enabled), skip the step on a non-finite loss or an absurd gradient norm, else clip,
take one AdamW step and update the EMA. Progress goes to ``on_step``; nothing is printed.

``calibrate`` reads top to bottom as setup, the loop (one step, a checkpoint when due, the
progress report) and the result; the pieces it calls are below it, in that order, and the loss
terms of a step are ``step.py``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dynconvert.calibration.adapters import (
    ModelAdapter,
    label_embedders,
    resolve_labels,
    select_adapter,
)
from dynconvert.calibration.capacity import measure_token_capacity
from dynconvert.calibration.checkpoint import (
    load_training_state,
    restore_rng,
    save_training_state,
    seed_step,
)
from dynconvert.calibration.config import CalibrationConfig, as_config
from dynconvert.calibration.data import as_source, check_batch
from dynconvert.calibration.distributed import MISSING, make_accelerator, restore_forward
from dynconvert.calibration.ema import EMA
from dynconvert.calibration.objectives import build_objective
from dynconvert.calibration.result import CalibrationResult, StepInfo
from dynconvert.calibration.schedule import LambdaSchedule
from dynconvert.calibration.step import (
    TERMS,
    StepTerms,
    labels_for_step,
    lower_token_bias,
    nonfinite_message,
)
from dynconvert.calibration.stream import batch_stream
from dynconvert.errors import BudgetError, CalibrationError, ConfigError, NotConvertedError
from dynconvert.flops import min_ratio
from dynconvert.runtime.routing import set_routing
from dynconvert.runtime.state import get_state, is_converted

__all__ = ["calibrate", "make_accelerator"]


def calibrate(
    model: nn.Module,
    data: Any,
    config: CalibrationConfig | dict[str, Any],
    on_step: Callable[[StepInfo], None] | None = None,
    *,
    teacher: nn.Module | None = None,
    adapter: ModelAdapter | None = None,
    accelerator: Any = None,
) -> CalibrationResult:
    """Fine-tune a converted model toward ``config.target`` (method.md, "training objective").

    Args:
        model: A model returned by ``dynconvert.convert`` (trained in place).
        data: Latents folder, "digits", dict of tensors, ``Source``, dataset or iterable of
            batch dicts (see ``data.as_source``).
        config: A ``CalibrationConfig`` or a dict of its fields.
        on_step: Called on the main process after every step with a ``StepInfo``.
        teacher: Frozen model to distil from (default: a copy of ``model`` at the start, run
            full width); only used with ``distill_weight`` > 0.
        adapter: How to call the model (default: chosen from its class and ``config.adapter``).
        accelerator: An ``accelerate.Accelerator`` to use instead of a new one.

    Returns:
        A ``CalibrationResult`` whose ``model`` holds the EMA weights, in eval mode.

    Raises:
        NotConvertedError: ``model`` was not converted.
        BudgetError: The target is below the lowest FLOPs ratio the model can reach.
        CalibrationError: ``max_nonfinite_in_a_row`` non-finite losses in a row.
        DataError, ConfigError, CheckpointError, OutputExistsError: bad inputs.

    Example:
        >>> import dynconvert
        >>> from dynconvert.models import build_model
        >>> model = dynconvert.convert(build_model("dit-tiny"), budget=0.5)  # doctest: +SKIP
        >>> cfg = dynconvert.CalibrationConfig(target=0.5, steps=20, batch_size=8)  # doctest: +SKIP
        >>> result = dynconvert.calibrate(model, "digits", cfg)  # doctest: +SKIP
    """
    cfg = as_config(config)
    state = _converted_state(model, cfg.target)
    adapter = adapter or select_adapter(model, cfg.adapter, cfg.adapter_args)
    objective = build_objective(cfg, adapter)
    labels = resolve_labels(model, adapter, cfg)
    source = as_source(data)

    # Setup: accelerator, teacher, trainable parameters, optimiser, EMA, resume.
    accelerator = accelerator or make_accelerator(cfg)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size {cfg.batch_size} must be divisible by the {world} processes")
    teacher = _frozen_teacher(model, teacher, cfg, device)
    with _training_mode(model, state):
        run = _setup(model, state, cfg, accelerator)
        lambdas = LambdaSchedule(cfg.target, cfg.lambda_hold_steps, cfg.warmup_steps)
        model.train()
        set_routing(model, "train")
        stream = batch_stream(
            source, cfg.batch_size, seed=cfg.seed, rank=rank, world=world, start=run.start,
            stop=cfg.steps, num_workers=cfg.num_workers,
        )  # fmt: skip
        step_terms = StepTerms(
            cfg=cfg, accelerator=accelerator, adapter=adapter, objective=objective, state=state,
            ddp_model=run.ddp_model, model=model, teacher=teacher,
        )  # fmt: skip
        t0 = time.perf_counter()

        # Training loop: one optimiser step per iteration.
        for step in range(run.start, cfg.steps):
            seed_step(cfg.seed, rank, step)
            batch = check_batch(source.prepare(next(stream), device))
            x0 = batch["x"].float()
            batch = run.last_batch = labels_for_step(batch, labels, adapter, cfg)
            noisy = objective.noise(x0)
            lam = lambdas(step)
            terms = step_terms(batch, x0, noisy, lam=lam, step=step)
            values, skipped, grad_norm = _optimise(run, terms, lam, step)
            # Checkpoint (never while non-finite losses are in a row: keep the last good one).
            wrote = _checkpoint_if_due(run, step + 1)
            if on_step is not None and accelerator.is_main_process:
                rate = (step + 1 - run.start) / max(time.perf_counter() - t0, 1e-9)
                on_step(_step_info(run, step + 1, values, lam, grad_norm, skipped, wrote, rate))

    # Result: the EMA weights in the model, the raw weights beside them.
    if run.last_batch is None and cfg.capacity_points:
        # Resumed at the last step: no batch was drawn in this call; the capacities need one.
        first = batch_stream(source, cfg.batch_size, seed=cfg.seed, rank=rank, world=world,
                             start=0, stop=1)  # fmt: skip
        batch = check_batch(source.prepare(next(first), device))
        run.last_batch = labels_for_step(batch, labels, adapter, cfg)
    return _finish(run, adapter, objective)


@dataclass
class _Run:
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


def _converted_state(model: nn.Module, target: float) -> Any:
    """The RouterBank of a converted model whose lowest reachable FLOPs ratio is <= target."""
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


def _frozen_teacher(
    model: nn.Module, teacher: nn.Module | None, cfg: CalibrationConfig, device: Any
) -> nn.Module | None:
    """The model to distil from, frozen and full width: the given one, or (distillation on) a
    copy of ``model`` as it is now."""
    if cfg.distill_weight > 0 and teacher is None:
        teacher = copy.deepcopy(model)
    if teacher is not None:
        teacher.requires_grad_(False).eval().to(device)
        if is_converted(teacher):
            set_routing(teacher, "full")
    return teacher


@contextmanager
def _training_mode(model: nn.Module, state: Any) -> Iterator[None]:
    """Put back, however the run ends, what calibration changes on the model: requires_grad
    flags, the routing mode, the forward accelerate's mixed precision wraps, and the label
    dropout of its embedders (zeroed: the loop drops labels itself, so a teacher sees the same
    labels)."""
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
            p.requires_grad_(grad_flags[n])
        set_routing(model, saved_mode)
        restore_forward(model, saved_forward)


def _router_parameters(state: Any) -> list[nn.Parameter]:
    """The router parameters of a converted model's state."""
    if hasattr(state, "router_parameters"):
        return list(state.router_parameters())
    return list(state.parameters())


def _setup(model: nn.Module, state: Any, cfg: CalibrationConfig, accelerator: Any) -> _Run:
    """Trainable parameters, optimiser and EMA, a resumed run's state loaded, all prepared."""
    if cfg.trainable == "routers":
        router_ids = {id(p) for p in _router_parameters(state)}
        for p in model.parameters():
            p.requires_grad_(id(p) in router_ids)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("no parameter is trainable; check trainable= and requires_grad flags")
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay
    )
    ema = EMA(model, cfg.ema_decay, names=names, warmup=cfg.ema_warmup)
    resumed = load_training_state(cfg, model, ema)
    accelerator.wait_for_everyone()  # all processes looked for checkpoints before any write
    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    ema.to(accelerator.device)
    run = _Run(cfg, accelerator, model, ddp_model, state, params, optimizer, ema)
    if resumed is not None:
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


def _optimise(
    run: _Run, terms: dict[str, torch.Tensor], lam: float, step: int
) -> tuple[dict[str, float], str | None, float | None]:
    """Back-propagate and take the optimiser step unless the loss or the gradient is bad.

    Returns:
        The logged values (means over processes), why the step was skipped (None,
        "nonfinite_loss" or "grad_norm") and the gradient norm before clipping (None when the
        loss was non-finite).

    Raises:
        CalibrationError: ``max_nonfinite_in_a_row`` non-finite losses in a row.
    """
    cfg, accelerator, counters = run.cfg, run.accelerator, run.counters
    total = terms["loss"]
    # All processes agree on the values to log and on whether the loss is finite.
    logged = torch.stack(
        [terms[k].detach().float() for k in TERMS] + [(~torch.isfinite(total)).float()]
    )
    if accelerator.num_processes > 1:
        logged = accelerator.reduce(logged, reduction="mean")
    values = dict(zip(TERMS, logged[:-1].tolist(), strict=True))
    skipped, grad_norm = None, None
    if float(logged[-1]) > 0:
        skipped, run.in_a_row = "nonfinite_loss", run.in_a_row + 1
        counters["skipped_nonfinite"] += 1
        if run.in_a_row >= cfg.max_nonfinite_in_a_row:
            raise CalibrationError(nonfinite_message(run.in_a_row, step, run.last_ckpt))
    else:
        run.in_a_row = 0
        accelerator.backward(total)
        grad_norm = float(accelerator.clip_grad_norm_(run.params, cfg.grad_clip or math.inf))
        too_big = cfg.skip_grad_norm is not None and grad_norm > cfg.skip_grad_norm
        if not math.isfinite(grad_norm) or too_big:
            skipped = "grad_norm"
            counters["skipped_grad_norm"] += 1
            if accelerator.scaler is not None:
                accelerator.scaler.update()  # fp16: lower the scale, reset its state
        else:
            run.optimizer.step()
            lower_token_bias(run.state, cfg, lam, terms.get("token_keep"), accelerator)
            run.ema.update(run.model)
    run.optimizer.zero_grad(set_to_none=True)
    run.history["loss"].append(values["loss"])
    run.history["flops_ratio"].append(values["flops_ratio"])
    run.last = values
    return values, skipped, grad_norm


def _checkpoint_if_due(run: _Run, done: int) -> Path | None:
    """Write the checkpoint after ``done`` steps when one is due (every ``checkpoint_every``
    steps and at the end) and no non-finite loss is pending; returns its path, else None."""
    cfg = run.cfg
    due = cfg.checkpoint_every and done % cfg.checkpoint_every == 0
    if not cfg.output_dir or not (due or done == cfg.steps) or run.in_a_row != 0:
        return None
    run.last_ckpt = save_training_state(
        run.accelerator, cfg, run.model, run.ema, run.optimizer, done, run.history, run.counters
    )
    return run.last_ckpt


def _step_info(
    run: _Run,
    done: int,
    values: dict[str, float],
    lam: float,
    grad_norm: float | None,
    skipped: str | None,
    wrote: Path | None,
    rate: float,
) -> StepInfo:
    """The progress report of the step that completed ``done`` steps (``rate``: steps/s)."""
    total = run.cfg.steps
    return StepInfo(
        step=done,
        total_steps=total,
        loss=values["loss"],
        terms={k: values[k] for k in TERMS if k not in ("loss", "flops_ratio")},
        flops_ratio=values["flops_ratio"],
        lambda_target=lam,
        lr=run.optimizer.param_groups[0]["lr"],
        grad_norm=grad_norm,
        steps_per_sec=rate,
        eta_seconds=(total - done) / rate if rate > 0 else math.inf,
        skipped=skipped,
        skipped_nonfinite=run.counters["skipped_nonfinite"],
        skipped_grad_norm=run.counters["skipped_grad_norm"],
        checkpoint=str(wrote) if wrote else None,
    )


def _finish(run: _Run, adapter: ModelAdapter, objective: Any) -> CalibrationResult:
    """The EMA weights into the model (eval mode), the raw ones kept beside them, and the token
    capacities of the planned path measured on the last batch (``calibration/capacity.py``)."""
    cfg, model = run.cfg, run.model
    train_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    run.ema.copy_to(model)
    model.eval()
    if cfg.capacity_points:
        measure_token_capacity(model, adapter, objective, run.last_batch, cfg.capacity_points)
    run.accelerator.wait_for_everyone()
    return CalibrationResult(
        model=model,
        config=cfg,
        steps=cfg.steps,
        losses=list(run.history["loss"]),
        flops_ratios=list(run.history["flops_ratio"]),
        last_terms=run.last,
        skipped_nonfinite=run.counters["skipped_nonfinite"],
        skipped_grad_norm=run.counters["skipped_grad_norm"],
        last_checkpoint=run.last_ckpt,
        resumed_from=run.resumed_from,
        train_state_dict=train_state,
    )
