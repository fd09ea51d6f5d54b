"""The calibration loop: fine-tune a converted model toward its FLOPs budget.

docs/method.md, "Training objective".

One readable function in the spirit of DiT's ``train.py``, run through Hugging Face accelerate so
the same code serves one CPU, one GPU, or many processes (``accelerate launch`` / ``torchrun``,
DDP with ``find_unused_parameters=True`` because routed-off units leave parameters unused).
Every step: seed from (seed, rank, step), read this process's rows, noise them at stratified
timesteps, run the dynamic model, add the FLOPs term (and the complete-model and distillation
terms when enabled), skip the step on a non-finite loss or an absurd gradient norm, else clip,
take one AdamW step and update the EMA. Progress goes to ``on_step`` and, as the config's
``progress`` says, to a bar on stderr or to log lines (``progress.py``); nothing is printed.

``calibrate`` reads top to bottom as setup, the loop (one step, a checkpoint when due, the
progress report) and the result; the pieces of one step are below it, the setup is ``setup.py``
and the loss terms of a step are ``step.py``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dynconvert.calibration.accumulate import forward_backward
from dynconvert.calibration.adapters import ModelAdapter, resolve_labels, select_adapter
from dynconvert.calibration.capacity import measure_token_capacity
from dynconvert.calibration.checkpoint import save_training_state, seed_step
from dynconvert.calibration.config import CalibrationConfig, as_config
from dynconvert.calibration.data import as_source, check_batch
from dynconvert.calibration.distributed import make_accelerator
from dynconvert.calibration.fit import check_before_start
from dynconvert.calibration.memory_release import release_when_tight
from dynconvert.calibration.objectives import build_objective
from dynconvert.calibration.progress import CalibrationProgress, MicroBatchInfo, MicroBatchReport
from dynconvert.calibration.recompute import gradient_checkpointing
from dynconvert.calibration.result import CalibrationResult, StepInfo
from dynconvert.calibration.schedule import LambdaSchedule, range_lambda
from dynconvert.calibration.setup import (
    TrainingRun,
    converted_state,
    frozen_teacher,
    setup_run,
    training_mode,
)
from dynconvert.calibration.sharded import finish_unsharded, gather_result
from dynconvert.calibration.sharded_checkpoint import save_sharded_training_state
from dynconvert.calibration.step import (
    TERMS,
    StepTerms,
    labels_for_step,
    lower_token_bias,
    nonfinite_message,
)
from dynconvert.calibration.stream import batch_stream
from dynconvert.calibration.trainable import merge_lora
from dynconvert.errors import CalibrationError, ConfigError
from dynconvert.runtime.routing import budget, set_routing

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
    on_micro_batch: Callable[[MicroBatchInfo], None] | None = None,
) -> CalibrationResult:
    """Fine-tune a converted model toward ``config.target`` (docs/method.md, "Training objective").

    Args:
        model: A model returned by ``dynconvert.convert`` (trained in place).
        data: Latents folder, "digits", dict of tensors, ``Source``, dataset or iterable of
            batch dicts (see ``data.as_source``).
        config: A ``CalibrationConfig`` or a dict of its fields.
        on_step: Called on the main process after every step with a ``StepInfo``; beside it
            ``config.progress`` shows a bar or log lines (``progress="off"``: nothing).
        teacher: Frozen model to distil from (default: a copy of ``model`` at the start, run
            full width); only used with ``distill_weight`` > 0.
        adapter: How to call the model (default: chosen from its class and ``config.adapter``).
        accelerator: An ``accelerate.Accelerator`` to use instead of a new one.
        on_micro_batch: Like ``on_step``, after each micro-batch (``grad_accum_steps`` > 1).

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
    state = converted_state(model, cfg.target)
    adapter = adapter or select_adapter(model, cfg.adapter, cfg.adapter_args)
    objective = build_objective(cfg, adapter)
    labels = resolve_labels(model, adapter, cfg)
    source = as_source(data)

    # Setup: accelerator, teacher, trainable parameters, optimiser, EMA, resume.
    accelerator = accelerator or make_accelerator(cfg)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    _check_divisible(cfg, world)
    plan = check_before_start(model, cfg, accelerator)  # the plan against the device (fit.py)
    release_when_tight(device, plan and plan.total)  # CPU, tight: freed memory is given back
    teacher = frozen_teacher(model, teacher, cfg, device)
    progress, micro = _progress(cfg, accelerator, on_micro_batch)  # a bar, log lines or none
    with training_mode(model, state), progress, contextlib.ExitStack() as after_setup:
        run = setup_run(model, state, cfg, accelerator)
        after_setup.enter_context(gradient_checkpointing(model, cfg.gradient_checkpointing))
        progress.start(run.start, cfg.target, run.resumed_from)
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
            batch = run.last_batch = _draw(stream, source, device, labels, adapter, cfg)
            x0 = batch["x"].float()
            noisy = objective.noise(x0)
            lam, scope = _step_target(model, state, lambdas, cfg.seed, step)
            with scope:  # forward and backward, micro-batch by micro-batch (accumulate.py)
                terms, nonfinite = forward_backward(
                    step_terms, accelerator, run.ddp_model, batch, x0, noisy,
                    cfg.grad_accum_steps, micro.at(step), lam=lam, step=step,
                )  # fmt: skip
            values, skipped, grad_norm = _optimise(run, terms, nonfinite, lam, step)
            # Checkpoint (never while non-finite losses are in a row: keep the last good one).
            wrote = _checkpoint_if_due(run, step + 1)
            if accelerator.is_main_process:
                rate = (step + 1 - run.start) / max(time.perf_counter() - t0, 1e-9)
                info = _step_info(run, step + 1, values, lam, grad_norm, skipped, wrote, rate)
                if on_step is not None:
                    on_step(info)
                progress(info)

    # Result: the EMA weights in the model, the raw weights beside them.
    if run.last_batch is None and cfg.capacity_points:  # resumed at the last step: draw one
        first = batch_stream(source, cfg.batch_size, seed=cfg.seed, rank=rank, world=world, stop=1)
        run.last_batch = _draw(first, source, device, labels, adapter, cfg)
    return _finish(run, adapter, objective)


def _progress(
    cfg: Any, accelerator: Any, on_micro_batch: Callable[[MicroBatchInfo], None] | None
) -> tuple[CalibrationProgress, MicroBatchReport]:
    """The progress the run shows itself (on the main process only) and the report of its
    micro-batches while a step accumulates (``progress.MicroBatchReport``)."""
    main = accelerator.is_main_process
    progress = CalibrationProgress(cfg.progress if main else "off", cfg.steps, cfg.log_every)
    report = on_micro_batch if main else None
    return progress, MicroBatchReport(cfg.steps, cfg.grad_accum_steps, progress, report)


def _check_divisible(cfg: Any, world: int) -> None:
    """The global batch splits evenly over the processes and the accumulation steps."""
    if cfg.batch_size % (world * cfg.grad_accum_steps):
        raise ConfigError(
            f"batch_size {cfg.batch_size} must be divisible by the {world} processes x "
            f"grad_accum_steps {cfg.grad_accum_steps}"
        )


def _draw(
    stream: Iterator[Any], source: Any, device: Any, labels: Any, adapter: ModelAdapter, cfg: Any
) -> dict[str, torch.Tensor]:
    """This process's next rows from ``stream``, on its device, checked, with the labels the
    model sees this step (drawn and dropped with the step's seed)."""
    return labels_for_step(check_batch(source.prepare(next(stream), device)), labels, adapter, cfg)


def _step_target(
    model: nn.Module, state: Any, lambdas: LambdaSchedule, seed: int, step: int
) -> tuple[float, contextlib.AbstractContextManager]:
    """This step's lambda, and the context its forward and backward run in: for a
    budget-conditioned model a budget drawn from its range, which the routers read
    (schedule.range_lambda); else the schedule's lambda and no context."""
    if state.budget_range is None:
        return lambdas(step), contextlib.nullcontext()
    lam, read = range_lambda(
        step, seed, state.budget_range, lambdas.hold_steps, lambdas.warmup_steps
    )
    return lam, budget(model, read)


def _optimise(
    run: TrainingRun, terms: dict[str, torch.Tensor], nonfinite: bool, lam: float, step: int
) -> tuple[dict[str, float], str | None, float | None]:
    """Take the optimiser step on the gradients back-propagated by ``forward_backward`` unless
    the loss (``nonfinite``: on some process) or the gradient is bad.

    Returns:
        The logged values (means over processes), why the step was skipped (None,
        "nonfinite_loss" or "grad_norm") and the gradient norm before clipping (None when the
        loss was non-finite).

    Raises:
        CalibrationError: ``max_nonfinite_in_a_row`` non-finite losses in a row.
    """
    cfg, accelerator, counters = run.cfg, run.accelerator, run.counters
    # All processes agree on the values to log (and already did on whether a loss was finite).
    flag = terms["loss"].new_tensor(float(nonfinite))
    logged = torch.stack([terms[k].detach().float() for k in TERMS] + [flag])
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


def _checkpoint_if_due(run: TrainingRun, done: int) -> Path | None:
    """Write the checkpoint after ``done`` steps when one is due (every ``checkpoint_every``
    steps and at the end) and no non-finite loss is pending; returns its path, else None."""
    cfg = run.cfg
    due = cfg.checkpoint_every and done % cfg.checkpoint_every == 0
    if not cfg.output_dir or not (due or done == cfg.steps) or run.in_a_row != 0:
        return None
    if run.skeleton is not None:  # FSDP: sharded or full, as the accelerate config says
        run.last_ckpt = save_sharded_training_state(
            run.accelerator, cfg, run.model, run.ema, run.optimizer, run.names, done,
            run.history, run.counters,
        )  # fmt: skip
        return run.last_ckpt
    run.last_ckpt = save_training_state(
        run.accelerator, cfg, run.model, run.ema, run.optimizer, done, run.history, run.counters
    )
    return run.last_ckpt


def _step_info(
    run: TrainingRun,
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


def _finish(run: TrainingRun, adapter: ModelAdapter, objective: Any) -> CalibrationResult:
    """The EMA weights into the model (eval mode; a trained LoRA merged unless kept), the raw
    ones kept beside them, and the token capacities of the planned path measured on the last
    batch (``calibration/capacity.py``)."""
    cfg, model = run.cfg, run.model
    if run.skeleton is not None:  # FSDP: gathered into an unsharded copy on the main process
        main = run.accelerator.is_main_process
        result, train_state = gather_result(model, run.ema, run.skeleton, main)
        model = finish_unsharded(result, model, run.accelerator.device)
    else:
        # Only what the EMA overwrites is copied: frozen weights (trainable=routers) are the
        # same raw or averaged, so the raw state shares them (a second copy of a 12B model's
        # frozen weights would double the end-of-run peak for nothing). A LoRA merge writes
        # into the frozen base weights it wraps: those are copied too.
        averaged = set(run.ema.shadow)
        merging = cfg.trainable == "lora" and cfg.lora_save == "merge"
        train_state = {
            k: v.detach().cpu().clone()
            if k in averaged or (merging and ".base_layer." in k)
            else v.detach().cpu()
            for k, v in model.state_dict().items()
        }
        run.ema.copy_to(model)
    if model is not None:
        merge_lora(model, cfg)  # trainable="lora", lora_save="merge": no peft layer is left
        model.eval()
    if cfg.capacity_points and model is not None:
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
        trainable_params=run.counts["trainable_params"],
        total_params=run.counts["total_params"],
    )
