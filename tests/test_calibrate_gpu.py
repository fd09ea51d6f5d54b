"""Calibration on CUDA: fp32 / bf16 / fp16 runs, resume, the fp16 skip path (``-m gpu``)."""

from __future__ import annotations

import math

import pytest
import torch

import dynconvert
from dynconvert.calibration import CalibrationConfig, calibrate
from dynconvert.testing import tiny_dit

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def converted():
    return dynconvert.convert(tiny_dit(seed=0), budget=0.5)


def latents(n: int = 128) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(n, 4, 8, 8, generator=g), "y": torch.randint(0, 10, (n,), generator=g)}


def quick(**overrides) -> CalibrationConfig:
    base = dict(target=0.5, steps=20, batch_size=16, lambda_hold_steps=0, warmup_steps=0)
    base.update(overrides)
    return CalibrationConfig(**base)


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_calibration_on_cuda(precision):
    result = calibrate(
        converted(), latents(), quick(mixed_precision=precision, lr=5e-3, ema_decay=0.0)
    )
    assert all(math.isfinite(v) for v in result.losses[2:])
    assert result.flops_ratios[-1] < result.flops_ratios[0] - 0.2
    model = result.model
    assert next(model.parameters()).device.type == "cuda" and not model.training
    x, t, y = (
        torch.randn(8, 4, 8, 8, device="cuda"),
        torch.linspace(0, 999, 8, device="cuda"),
        torch.arange(8, device="cuda"),
    )
    with torch.no_grad():
        out = model(x, t, y)  # the eval fast path, on the GPU
    assert out.shape == (8, 8, 8, 8) and torch.isfinite(out).all()
    assert dynconvert.last_flops_ratio(model).mean().item() < 0.9


def test_resume_on_cuda(tmp_path):
    opts = dict(steps=8, checkpoint_every=4, ema_decay=0.9, complete_model_steps=2, lr=1e-3)
    full = calibrate(converted(), latents(), quick(output_dir=str(tmp_path / "a"), **opts))
    calibrate(converted(), latents(), quick(output_dir=str(tmp_path / "b"), **{**opts, "steps": 4}))
    resumed = calibrate(
        converted(), latents(), quick(output_dir=str(tmp_path / "b"), resume=True, **opts)
    )
    assert resumed.losses[:4] == full.losses[:4]
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5)


def test_fp16_skipped_steps_keep_the_scaler_consistent():
    result = calibrate(
        converted(), latents(), quick(steps=4, mixed_precision="fp16", skip_grad_norm=1e-9)
    )
    assert result.skipped_grad_norm + result.skipped_nonfinite == 4
