"""One calibration step's pieces: its loss terms, the token-bias step, the labels it trains on.

``loop.calibrate`` runs them in order every step (docs/method.md, "Training objective"); they are
here so that the loop itself reads as setup, steps, checkpoints and the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from dynconvert.calibration.adapters import ModelAdapter, drop_labels
from dynconvert.calibration.config import CalibrationConfig
from dynconvert.calibration.objectives import (
    distill_loss,
    flops_loss,
    token_keep,
    token_keep_loss,
    token_keep_target,
)
from dynconvert.calibration.schedule import token_bias_step
from dynconvert.errors import DataError
from dynconvert.flops import last_flops_ratio
from dynconvert.runtime.routing import routing

TERMS = ("loss", "diffusion", "flops", "flops_ratio", "mse", "vb", "distill", "complete")
"""The values every step logs (means over the batch and over processes); "loss" is the total."""


@dataclass(frozen=True)
class StepTerms:
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
        """The terms of ``TERMS`` as tensors; "loss" is the total to back-propagate.

        Args:
            batch: This process's rows (labels already dropped for this step).
            x0: The clean inputs (B, C, H, W), float32.
            noisy: ``objective.noise(x0)``, a NoisyBatch: x_t, the model's timesteps t, noise.
            lam: The FLOPs target lambda of this step.
            step: The step index (the complete-model loss runs while it is below
                ``cfg.complete_model_steps``).
        """
        cfg, adapter = self.cfg, self.adapter
        terms = dict.fromkeys(TERMS, torch.zeros((), device=x0.device))
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


def lower_token_bias(
    state: Any, cfg: CalibrationConfig, lam: float, keep: torch.Tensor | None, accelerator: Any
) -> None:
    """Lower every token router's output bias by one ``schedule.token_bias_step``.

    Called after an optimiser step, while the batch kept more than ``sqrt(lam)`` of its tokens.
    AdamW moves the bias about lr per step, far too slowly to leave its initial value (35): this
    carries it down at the pace of lambda's warm-up, and stops as soon as the batch keeps no more
    than the cap, so the routers' own weights (which the keep cap pushed toward "drop" all
    along) cannot switch every token off once the bias arrives. Applied with the optimiser step
    (a skipped step changes no weight); a no-op without token routers or a budget (target 1).

    Args:
        state: The converted model's RouterBank (its ``token`` routers and ``config``).
        cfg: The run's config (``target``, ``warmup_steps``).
        lam: The FLOPs target lambda of this step.
        keep: The batch's mean token keep rate (a 0-d tensor), None without token routers.
        accelerator: The run's ``accelerate.Accelerator`` (the rate is averaged over processes).

    Example:
        >>> lower_token_bias(bank, cfg, 0.7, terms.get("token_keep"), accelerator)  # doctest: +SKIP
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


def labels_for_step(
    batch: dict[str, torch.Tensor], labels: Any, adapter: ModelAdapter, cfg: CalibrationConfig
) -> dict[str, torch.Tensor]:
    """The batch with the labels the model sees this step.

    Labels are the batch's own, or random ones for label-free distillation; each is dropped to
    the null label with the CFG probability; an unconditional model gets none. Dropout happens
    here, outside the model, so that a teacher sees the same labels.

    Args:
        batch: This process's rows, ``{"x": (B, C, H, W), "y": (B,) optional, ...}``.
        labels: The model's ``adapters.LabelPolicy``.
        adapter: How the model is called (its family decides whether labels can be drawn).
        cfg: The run's config (``diffusion_weight``: a diffusion loss needs real labels).

    Raises:
        DataError: A class-conditional model trained with a diffusion loss on unlabelled rows.

    Example:
        >>> batch = labels_for_step(batch, policy, adapter, cfg)  # doctest: +SKIP
    """
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


def nonfinite_message(count: int, step: int, last_ckpt: Any) -> str:
    """The error of a run stopped after ``count`` non-finite losses in a row, ending at ``step``.

    Example:
        >>> nonfinite_message(5, 9, None)[:60]
        'calibration stopped: 5 non-finite losses in a row (steps 6..'
    """
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
