"""The calibration loop on a tiny converted DiT: FLOPs move toward the target, exact resume,
guard rails (non-finite losses, absurd gradients, unreachable targets), options."""

from __future__ import annotations

import math

import pytest
import torch

import dynconvert
from dynconvert.calibration import CalibrationConfig, StepInfo, calibrate
from dynconvert.calibration.checkpoint import list_checkpoints
from dynconvert.errors import (
    BudgetError,
    CalibrationError,
    CheckpointError,
    DataError,
    NotConvertedError,
    OutputExistsError,
)
from dynconvert.flops import min_ratio
from dynconvert.testing import tiny_dit

pytestmark = pytest.mark.usefixtures("one_thread")


def converted(budget: float = 0.5):
    return dynconvert.convert(tiny_dit(seed=0), budget=budget)


def latents(n: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 4, 8, 8, generator=g), "y": torch.randint(0, 10, (n,), generator=g)}


def quick(**overrides) -> CalibrationConfig:
    base = dict(target=0.5, steps=6, batch_size=8, lambda_hold_steps=0, warmup_steps=0, seed=0)
    base.update(overrides)
    return CalibrationConfig(**base)


def test_flops_ratio_moves_toward_target():
    model = converted()
    infos: list[StepInfo] = []
    cfg = quick(steps=30, lr=5e-3, ema_decay=0.0, lambda_hold_steps=2, warmup_steps=10)
    result = calibrate(model, latents(), cfg, on_step=infos.append)
    ratios = result.flops_ratios
    assert len(ratios) == 30 and ratios[0] > 0.99
    assert sum(ratios[-5:]) / 5 < ratios[0] - 0.25  # moved most of the way to 0.5
    assert abs(sum(ratios[-5:]) / 5 - 0.5) < 0.2
    # Progress reports: every step, with the schedule, speed and ETA.
    assert [i.step for i in infos] == list(range(1, 31))
    assert infos[0].lambda_target == 1.0 and infos[-1].lambda_target == 0.5
    assert infos[5].lambda_target == pytest.approx(1.0 - 0.5 * 3 / 10)
    assert all(i.total_steps == 30 and i.lr == 5e-3 and i.steps_per_sec > 0 for i in infos)
    assert infos[-1].eta_seconds == 0.0 and infos[0].eta_seconds > 0
    assert set(infos[0].terms) == {"diffusion", "flops", "mse", "vb", "distill", "complete"}
    assert infos[0].terms["vb"] > 0  # learned sigma: DiT's hybrid loss
    assert infos[3].loss == pytest.approx(result.losses[3])
    assert all(math.isfinite(i.grad_norm) for i in infos)
    # The returned model holds the EMA (decay 0: the last weights), in eval mode.
    assert not result.model.training
    state = result.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in result.train_state_dict.items())
    x, t, y = torch.randn(16, 4, 8, 8), torch.linspace(0, 999, 16), torch.arange(16) % 10
    with torch.no_grad():
        result.model(x, t, y)
    eval_ratio = dynconvert.last_flops_ratio(result.model).mean().item()
    assert eval_ratio < 0.85


@pytest.mark.slow  # 3 s; test_reliability's stopped-run and torn-write resumes run by default
def test_resume_equals_an_uninterrupted_run(tmp_path):
    opts = dict(
        steps=8,
        checkpoint_every=3,
        ema_decay=0.9,
        complete_model_steps=4,
        distill_weight=0.5,
        lr=1e-3,
        lambda_hold_steps=1,
        warmup_steps=4,
    )
    full = calibrate(converted(), latents(), quick(output_dir=str(tmp_path / "a"), **opts))
    assert [s for s, _ in list_checkpoints(tmp_path / "a")] == [6, 8]  # keep_checkpoints=2
    # "Killed" after 5 steps (its last checkpoint is at step 5), then resumed to 8.
    first = calibrate(
        converted(), latents(), quick(output_dir=str(tmp_path / "b"), **{**opts, "steps": 5})
    )
    assert first.losses == full.losses[:5]
    resumed = calibrate(
        converted(), latents(), quick(output_dir=str(tmp_path / "b"), resume=True, **opts)
    )
    assert resumed.resumed_from.name == "step-0000005.pt"
    assert resumed.losses == full.losses  # exactly, step by step
    assert resumed.flops_ratios == full.flops_ratios
    for key, value in full.train_state_dict.items():
        assert torch.equal(resumed.train_state_dict[key], value), key
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # same EMA
    with pytest.raises(CheckpointError, match="lr"):
        calibrate(
            converted(),
            latents(),
            quick(output_dir=str(tmp_path / "b"), resume=True, **{**opts, "lr": 1.0}),
        )
    with pytest.raises(OutputExistsError, match="resume=True"):
        calibrate(converted(), latents(), quick(output_dir=str(tmp_path / "b"), **opts))


def nan_batches(bad_steps: set[int], n: int = 12) -> list[dict[str, torch.Tensor]]:
    data = latents(8 * n)
    out = []
    for i in range(n):
        x = data["x"][8 * i : 8 * i + 8].clone()
        if i in bad_steps:
            x[0, 0, 0, 0] = float("nan")
        out.append({"x": x, "y": data["y"][8 * i : 8 * i + 8]})
    return out


def test_nonfinite_loss_is_skipped_and_counted():
    model = converted()
    infos: list[StepInfo] = []
    result = calibrate(model, nan_batches({2}), quick(steps=5), on_step=infos.append)
    assert result.skipped_nonfinite == 1 and math.isnan(result.losses[2])
    assert infos[2].skipped == "nonfinite_loss" and infos[2].grad_norm is None
    assert [i.skipped for i in infos if i.step != 3] == [None] * 4
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_nonfinite_losses_in_a_row_stop_the_run(tmp_path):
    cfg = quick(steps=10, checkpoint_every=1, max_nonfinite_in_a_row=3, output_dir=str(tmp_path))
    with pytest.raises(CalibrationError) as err:
        calibrate(converted(), nan_batches(set(range(3, 12))), cfg)
    msg = str(err.value)
    assert "3 non-finite losses in a row" in msg and "steps 4..6" in msg
    assert "step-0000003.pt" in msg
    # The last good checkpoint is kept; nothing was written during the failing steps.
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    with pytest.raises(CalibrationError, match="no checkpoint was written"):
        calibrate(
            converted(), nan_batches(set(range(12))), quick(steps=10, max_nonfinite_in_a_row=2)
        )


def test_absurd_gradient_norm_skips_the_step():
    model = converted()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    infos: list[StepInfo] = []
    result = calibrate(
        model, latents(), quick(steps=3, skip_grad_norm=1e-8, ema_decay=0.0), on_step=infos.append
    )
    assert result.skipped_grad_norm == 3 and result.skipped_nonfinite == 0
    assert all(i.skipped == "grad_norm" and i.grad_norm > 1e-8 for i in infos)
    assert all(torch.equal(before[k], v) for k, v in result.train_state_dict.items())


def test_unreachable_target_is_refused_with_its_minimum():
    model = converted(0.5)
    bank = dynconvert.get_state(model)
    minimum = min_ratio(bank.plan, bank.config.token_reduction)
    with pytest.raises(BudgetError) as err:
        calibrate(model, latents(), quick(target=minimum / 2))
    assert f"{minimum:.4f}" in str(err.value)
    with pytest.raises(NotConvertedError, match="convert"):
        calibrate(tiny_dit(), latents(), quick())


def test_routers_only_keeps_base_weights():
    model = converted()
    bank = dynconvert.get_state(model)
    router_ids = {id(p) for p in bank.parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    base_before = {n: v for n, v in before.items() if not n.startswith("dynconvert.")}
    assert len(base_before) == len(before) - len(router_ids)
    result = calibrate(
        model, latents(), quick(steps=3, trainable="routers", lr=1e-2, ema_decay=0.0)
    )
    after = dict(result.model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in base_before.items())
    routers = [n for n in before if n.startswith("dynconvert.")]
    assert any(not torch.equal(result.train_state_dict[n], before[n]) for n in routers)
    # The raw state copies only what the EMA overwrites: frozen weights are shared, not doubled.
    raw = result.train_state_dict
    assert all(raw[n].data_ptr() == after[n].data_ptr() for n in base_before)
    assert all(raw[n].data_ptr() != after[n].data_ptr() for n in routers)
    assert {n: p.requires_grad for n, p in result.model.named_parameters()} == flags  # restored


def test_distillation_alone_needs_no_labels():
    data = {"x": latents()["x"]}
    with pytest.raises(DataError, match="labels"):
        calibrate(converted(), data, quick(steps=2))
    infos: list[StepInfo] = []
    cfg = quick(steps=3, diffusion_weight=0.0, distill_weight=1.0, complete_model_steps=2)
    calibrate(converted(), data, cfg, on_step=infos.append)
    assert infos[0].terms["distill"] < 1e-10  # student starts as the teacher (all units on)
    assert infos[-1].terms["distill"] > 1e-6
    assert infos[0].terms["complete"] > 0.0 and infos[2].terms["complete"] == 0.0
    assert infos[0].loss == pytest.approx(
        infos[0].terms["flops"] + infos[0].terms["complete"], rel=1e-5
    )


def test_label_dropout_moves_outside_the_model():
    model = converted()
    embedder = model.y_embedder
    assert embedder.dropout_prob == 0.1
    seen = []
    hook = embedder.register_forward_pre_hook(
        lambda m, args: seen.append((m.dropout_prob, args[0].clone())) if m.training else None
    )  # training calls only: the capacity measurement at the end runs in eval (no dropout)
    calibrate(model, latents(), quick(steps=4, batch_size=32, label_dropout=0.5))
    hook.remove()
    assert embedder.dropout_prob == 0.1  # restored
    assert len(seen) == 4 and all(p == 0.0 for p, _ in seen)  # the model does not drop again
    labels = torch.cat([y for _, y in seen])
    assert 0.3 < (labels == 10).float().mean().item() < 0.7  # null label 10 at ~50%


def test_uvit_runs_with_its_offset_and_schedule():
    from dynconvert.testing import tiny_uvit

    model = dynconvert.convert(tiny_uvit(), budget=0.6)
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    result = calibrate(model, latents(), quick(target=0.6, steps=2))
    hook.remove()
    assert len(result.losses) == 2 and all(math.isfinite(v) for v in result.losses)
    assert all(int(t.min()) >= 1 for t in seen)  # U-ViT timesteps are 1..1000
    assert result.last_terms["vb"] == 0.0  # eps model, no learned sigma


def test_calibrate_is_a_function_and_calibration_a_plain_package():
    import types

    import dynconvert.calibration

    assert type(dynconvert.calibration) is types.ModuleType  # an ordinary package
    assert dynconvert.calibrate is dynconvert.calibration.calibrate
    model = dynconvert.convert(tiny_dit(in_channels=1, input_size=16), budget=0.5)
    result = dynconvert.calibrate(model, "digits", {"target": 0.5, "steps": 2, "batch_size": 8})
    assert len(result.losses) == 2 and result.config.target == 0.5
