"""The calibration loop: fine-tune a converted model toward its FLOPs budget (method.md).

One readable function in the spirit of DiT's ``train.py``, run through Hugging Face accelerate so
the same code serves one CPU, one GPU, or many processes (``accelerate launch`` / ``torchrun``,
DDP with ``find_unused_parameters=True`` because routed-off units leave parameters unused).
Every step: seed from (seed, rank, step), read this process's rows, noise them at stratified
timesteps, run the dynamic model, add the FLOPs term (and the complete-model and distillation
terms when enabled), skip the step on a non-finite loss or an absurd gradient norm, else clip,
take one AdamW step and update the EMA. Progress goes to ``on_step``; nothing is printed.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from dynconvert.calibration.accumulate import forward_backward
from dynconvert.calibration.adapters import (
    ModelAdapter,
    drop_labels,
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
from dynconvert.calibration.distributed import (
    MISSING,
    make_accelerator,
    restore_forward,
    sharding_of,
)
from dynconvert.calibration.ema import EMA
from dynconvert.calibration.fit import check_before_start
from dynconvert.calibration.objectives import (
    build_objective,
    distill_loss,
    flops_loss,
    token_keep,
    token_keep_loss,
    token_keep_target,
)
from dynconvert.calibration.recompute import gradient_checkpointing
from dynconvert.calibration.result import CalibrationResult, StepInfo
from dynconvert.calibration.schedule import LambdaSchedule, token_bias_step
from dynconvert.calibration.sharded import finish_unsharded, gather_result, prepare_sharding
from dynconvert.calibration.sharded_checkpoint import (
    resume_after_sharding,
    save_sharded_training_state,
)
from dynconvert.calibration.stream import batch_stream
from dynconvert.errors import (
    BudgetError,
    CalibrationError,
    ConfigError,
    DataError,
    NotConvertedError,
)
from dynconvert.flops import last_flops_ratio, min_ratio
from dynconvert.runtime.routing import routing, set_routing
from dynconvert.runtime.state import get_state, is_converted

_TERMS = ("loss", "diffusion", "flops", "flops_ratio", "mse", "vb", "distill", "complete")


def _router_parameters(state: Any) -> list[nn.Parameter]:
    """The router parameters of a converted model's state."""
    if hasattr(state, "router_parameters"):
        return list(state.router_parameters())
    return list(state.parameters())


def _check_budget(state: Any, target: float) -> None:
    minimum = min_ratio(state.plan, state.config.token_reduction)
    if target < minimum - 1e-9:
        raise BudgetError(
            f"target {target} is below the minimum FLOPs ratio this converted model can reach "
            f"({minimum:.4f}: only the always-on units and unroutable parts running); choose "
            f"target >= {minimum:.4f}, or convert with more routable sites"
        )


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
    if not is_converted(model):
        raise NotConvertedError(
            "calibrate needs a converted model; call dynconvert.convert(model, budget) first"
        )
    state = get_state(model)
    _check_budget(state, cfg.target)
    adapter = adapter or select_adapter(model, cfg.adapter, cfg.adapter_args)
    objective = build_objective(cfg, adapter)
    labels = resolve_labels(model, adapter, cfg)
    source = as_source(data)

    # Setup: accelerator, teacher, trainable parameters, optimiser, EMA, resume.
    accelerator = accelerator or make_accelerator(cfg)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    if cfg.batch_size % (world * cfg.grad_accum_steps):
        raise ConfigError(
            f"batch_size {cfg.batch_size} must be divisible by the {world} processes x "
            f"grad_accum_steps {cfg.grad_accum_steps}"
        )
    check_before_start(model, cfg, accelerator)  # the memory plan against the device's memory
    if cfg.distill_weight > 0 and teacher is None:
        teacher = copy.deepcopy(model)
    if teacher is not None:
        teacher.requires_grad_(False).eval().to(device)
        if is_converted(teacher):
            set_routing(teacher, "full")
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    saved_forward = model.__dict__.get("forward", MISSING)  # mixed precision wraps it
    saved_mode = getattr(state, "mode", None)
    dropouts: list[tuple[nn.Module, float]] = []
    recompute = contextlib.ExitStack()  # gradient checkpointing, undone with the rest
    try:
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
        # FSDP (sharded.py): the EMA is made from the shards, a resumed state loaded into them.
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
            ema.to(device)
        recompute.enter_context(gradient_checkpointing(model, cfg.gradient_checkpointing))
        start, history = 0, {"loss": [], "flops_ratio": []}
        counters = {"skipped_nonfinite": 0, "skipped_grad_norm": 0}
        last_ckpt = None
        if resumed is not None:
            if not sharded:
                optimizer.load_state_dict(resumed["optimizer"])
            if accelerator.scaler is not None and resumed.get("scaler") is not None:
                accelerator.scaler.load_state_dict(resumed["scaler"])
            rng = resumed.get("rng") or []
            if len(rng) == world:
                restore_rng(rng[rank])
            start, history, counters = resumed["step"], resumed["history"], resumed["counters"]
            last_ckpt = resumed["path"]

        lambdas = LambdaSchedule(cfg.target, cfg.lambda_hold_steps, cfg.warmup_steps)
        # Label dropout happens in the loop, outside the model, so a teacher sees the same labels.
        dropouts = [(m, m.dropout_prob) for m in label_embedders(model)]
        for m, _ in dropouts:
            m.dropout_prob = 0.0
        model.train()
        set_routing(model, "train")
        stream = batch_stream(
            source, cfg.batch_size, seed=cfg.seed, rank=rank, world=world, start=start,
            stop=cfg.steps, num_workers=cfg.num_workers,
        )  # fmt: skip
        in_a_row, t0, last, last_batch = 0, time.perf_counter(), {}, None
        step_terms = _StepTerms(
            cfg=cfg,
            accelerator=accelerator,
            adapter=adapter,
            objective=objective,
            state=state,
            ddp_model=ddp_model,
            model=model,
            teacher=teacher,
        )

        # Training loop: one optimiser step per iteration.
        for step in range(start, cfg.steps):
            seed_step(cfg.seed, rank, step)
            batch = check_batch(source.prepare(next(stream), device))
            x0 = batch["x"].float()
            batch = _labels_for_step(batch, labels, adapter, cfg)
            last_batch = batch
            noisy = objective.noise(x0)
            lam = lambdas(step)
            # Forward and backward, micro-batch by micro-batch (accumulate.py); every process
            # agrees before each backward whether the loss is finite, and on the values to log.
            terms, nonfinite = forward_backward(
                step_terms, accelerator, ddp_model, batch, x0, noisy, cfg.grad_accum_steps,
                lam=lam, step=step,
            )  # fmt: skip
            logged = torch.stack(
                [terms[k].float() for k in _TERMS] + [terms["loss"].new_tensor(float(nonfinite))]
            )
            if world > 1:
                logged = accelerator.reduce(logged, reduction="mean")
            values = dict(zip(_TERMS, logged[:-1].tolist(), strict=True))
            skipped, grad_norm = None, None
            if float(logged[-1]) > 0:
                skipped, in_a_row = "nonfinite_loss", in_a_row + 1
                counters["skipped_nonfinite"] += 1
                if in_a_row >= cfg.max_nonfinite_in_a_row:
                    raise CalibrationError(_nonfinite_message(in_a_row, step, last_ckpt))
            else:
                in_a_row = 0
                grad_norm = float(accelerator.clip_grad_norm_(params, cfg.grad_clip or math.inf))
                too_big = cfg.skip_grad_norm is not None and grad_norm > cfg.skip_grad_norm
                if not math.isfinite(grad_norm) or too_big:
                    skipped = "grad_norm"
                    counters["skipped_grad_norm"] += 1
                    if accelerator.scaler is not None:
                        accelerator.scaler.update()  # fp16: lower the scale, reset its state
                else:
                    optimizer.step()
                    _lower_token_bias(state, cfg, lam, terms.get("token_keep"), accelerator)
                    ema.update(model)
            optimizer.zero_grad(set_to_none=True)
            history["loss"].append(values["loss"])
            history["flops_ratio"].append(values["flops_ratio"])
            last = values

            # Checkpoint (never while non-finite losses are in a row: keep the last good one).
            done, wrote = step + 1, None
            due = cfg.checkpoint_every and done % cfg.checkpoint_every == 0
            if cfg.output_dir and (due or done == cfg.steps) and in_a_row == 0:
                save = save_sharded_training_state if sharded else save_training_state
                extra = (names,) if sharded else ()
                wrote = save(
                    accelerator, cfg, model, ema, optimizer, *extra, done, history, counters
                )
                last_ckpt = wrote

            if on_step is not None and accelerator.is_main_process:
                rate = (done - start) / max(time.perf_counter() - t0, 1e-9)
                on_step(
                    StepInfo(
                        step=done,
                        total_steps=cfg.steps,
                        loss=values["loss"],
                        terms={k: values[k] for k in _TERMS if k not in ("loss", "flops_ratio")},
                        flops_ratio=values["flops_ratio"],
                        lambda_target=lam,
                        lr=optimizer.param_groups[0]["lr"],
                        grad_norm=grad_norm,
                        steps_per_sec=rate,
                        eta_seconds=(cfg.steps - done) / rate if rate > 0 else math.inf,
                        skipped=skipped,
                        skipped_nonfinite=counters["skipped_nonfinite"],
                        skipped_grad_norm=counters["skipped_grad_norm"],
                        checkpoint=str(wrote) if wrote else None,
                    )
                )
    finally:
        recompute.close()
        for m, p in dropouts:
            m.dropout_prob = p
        for n, p in model.named_parameters():
            p.requires_grad_(grad_flags[n])
        set_routing(model, saved_mode)
        restore_forward(model, saved_forward)

    # Result: the EMA weights in the model, the raw weights beside them (under FSDP both gathered
    # into an unsharded copy on the main process; the other processes get None).
    if sharded:
        result, train_state = gather_result(model, ema, skeleton, accelerator.is_main_process)
        model = finish_unsharded(result, model, device)
    else:
        train_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        ema.copy_to(model)
    if model is not None:
        model.eval()
    if cfg.capacity_points and model is not None:
        # Token capacities of the planned path, measured on real data (calibration/capacity.py).
        if last_batch is None:  # resumed at the last step: no batch was drawn in this call
            first = batch_stream(source, cfg.batch_size, seed=cfg.seed, rank=rank, world=world,
                                 start=0, stop=1)  # fmt: skip
            last_batch = _labels_for_step(
                check_batch(source.prepare(next(first), device)), labels, adapter, cfg
            )
        measure_token_capacity(model, adapter, objective, last_batch, cfg.capacity_points)
    accelerator.wait_for_everyone()
    return CalibrationResult(
        model=model,
        config=cfg,
        steps=cfg.steps,
        losses=list(history["loss"]),
        flops_ratios=list(history["flops_ratio"]),
        last_terms=last,
        skipped_nonfinite=counters["skipped_nonfinite"],
        skipped_grad_norm=counters["skipped_grad_norm"],
        last_checkpoint=last_ckpt,
        resumed_from=resumed["path"] if resumed else None,
        train_state_dict=train_state,
    )


@dataclass(frozen=True)
class _StepTerms:
    """The loss terms of one step, from what stays fixed over the run (built before the loop).

    total = diffusion_weight * diffusion + w (mean F_dyn/F_static - lambda)^2
            + w max(0, mean token keep - sqrt(lambda))^2  (with token routers)
            [+ distill_weight * MSE to the teacher] [+ complete-model diffusion loss]
    """

    cfg: CalibrationConfig
    accelerator: Any  # accelerate.Accelerator: autocast for mixed precision
    adapter: ModelAdapter  # calls a model on (x_t, t, batch) and returns its prediction
    objective: Any  # the diffusion objective: its loss of a prediction
    state: Any  # the converted model's RouterBank: masks of its last forward, for the FLOPs
    ddp_model: nn.Module  # the model as accelerate prepared it (DDP-wrapped on several processes)
    model: nn.Module  # the same model unwrapped, for the complete-model pass
    teacher: nn.Module | None  # frozen full-width model to distil from

    def __call__(
        self,
        batch: dict[str, torch.Tensor],
        x0: torch.Tensor,
        noisy: Any,
        *,
        lam: float,
        step: int,
    ) -> dict[str, torch.Tensor]:
        """The terms of ``_TERMS`` as tensors; "loss" is the total to back-propagate.

        Args:
            batch: This process's rows (labels already dropped for this step).
            x0: The clean inputs (B, C, H, W), float32.
            noisy: ``objective.noise(x0)``, a NoisyBatch: x_t, the model's timesteps t, noise.
            lam: The FLOPs target lambda of this step.
            step: The step index (the complete-model loss runs while it is below
                ``cfg.complete_model_steps``).
        """
        cfg, adapter = self.cfg, self.adapter
        terms = dict.fromkeys(_TERMS, torch.zeros((), device=x0.device))
        with self.accelerator.autocast():
            out = adapter(self.ddp_model, noisy.x_t, noisy.t, batch).float()  # the dynamic model
        ratios = last_flops_ratio(self.state).float()  # (B,), read before any other forward
        kept = token_keep(self.state)  # (B,) or None, from the same call's masks
        diff = self.objective.loss(out, x0, noisy)
        terms["diffusion"] = diff["loss"].mean()
        terms["mse"] = diff["mse"].mean().detach()
        if "vb" in diff:
            terms["vb"] = diff["vb"].mean().detach()
        # The FLOPs term uses the batch mean: a batch spanning all timesteps may spend more
        # at hard ones and less at easy ones, as long as the mean meets lambda.
        # Plus a one-sided cap on the mean token keep rate (sqrt(lambda)): without it the width
        # routers meet the budget alone and the token routers never switch a token off.
        terms["flops"] = flops_loss(ratios, lam, cfg.flops_weight) + token_keep_loss(
            kept, lam, cfg.flops_weight
        ).to(ratios.device)
        terms["flops_ratio"] = ratios.mean().detach()
        if kept is not None:  # read by the token-bias step after the optimiser step
            terms["token_keep"] = kept.mean().detach()
        total = terms["flops"]
        if cfg.diffusion_weight > 0:
            total = total + cfg.diffusion_weight * terms["diffusion"]
        if cfg.distill_weight > 0:
            with torch.no_grad(), self.accelerator.autocast():
                target = adapter(self.teacher, noisy.x_t, noisy.t, batch).float()
            terms["distill"] = distill_loss(out, target).mean()
            total = total + cfg.distill_weight * terms["distill"]
        if step < cfg.complete_model_steps:
            # Same weights, full width, all tokens; outside DDP's forward, in the same backward.
            with routing(self.model, "full"), self.accelerator.autocast():
                full_out = adapter(self.model, noisy.x_t, noisy.t, batch).float()
            terms["complete"] = self.objective.loss(full_out, x0, noisy)["loss"].mean()
            total = total + terms["complete"]
        terms["loss"] = total
        return terms


def _lower_token_bias(
    state: Any, cfg: CalibrationConfig, lam: float, keep: torch.Tensor | None, accelerator: Any
) -> None:
    """After an optimiser step, lower every token router's output bias by one step of
    ``schedule.token_bias_step`` while the batch kept more than ``sqrt(lam)`` of its tokens.

    AdamW moves the bias about lr per step, far too slowly to leave its initial value (35): this
    carries it down at the pace of lambda's warm-up, and stops as soon as the batch keeps no more
    than the cap, so the routers' own weights (which the keep cap pushed toward "drop" all
    along) cannot switch every token off once the bias arrives. Applied with the optimiser step
    (a skipped step changes no weight); a no-op without token routers or a budget (target 1).
    """
    routers = getattr(state, "token", None)
    if not routers or keep is None or cfg.target >= 1.0:
        return
    if accelerator.num_processes > 1:  # every process moves the bias alike
        keep = accelerator.reduce(keep.detach().float(), reduction="mean")
    if float(keep) <= token_keep_target(lam) + 1e-6:
        return
    delta = token_bias_step(float(state.config.token_bias_init), cfg.warmup_steps)
    with torch.no_grad():
        for router in routers.values():
            router.net[2].bias.sub_(delta)


def _labels_for_step(batch: dict, labels, adapter: ModelAdapter, cfg: CalibrationConfig) -> dict:
    """Labels the model sees this step: given, or random for label-free distillation; dropped
    to the null label with the CFG probability; removed for unconditional models."""
    y = batch.get("y")
    if not labels.uses_labels:
        return {k: v for k, v in batch.items() if k != "y"}
    if (
        y is None
        and labels.num_classes is not None
        and adapter.name in ("dit", "diffusers_dit", "uvit")
    ):
        if cfg.diffusion_weight > 0:
            raise DataError(
                "the batches have no labels 'y' but the model is class-conditional; add labels, or "
                "train by distillation alone (diffusion_weight=0, distill_weight=1)"
            )
        y = torch.randint(0, labels.num_classes, (batch["x"].shape[0],), device=batch["x"].device)
    if y is None:
        return batch
    return {**batch, "y": drop_labels(y.long(), labels)}


def _nonfinite_message(count: int, step: int, last_ckpt: Any) -> str:
    where = (
        f"the last good checkpoint is {last_ckpt} (resume=True continues from it)"
        if last_ckpt
        else "no checkpoint was written (set output_dir and checkpoint_every to keep one)"
    )
    return (
        f"calibration stopped: {count} non-finite losses in a row (steps {step - count + 2}.."
        f"{step + 1}); the weights were not updated by those steps; {where}. Try a lower lr, "
        "mixed_precision='no', or check the data for NaN/inf"
    )
