"""The lambda schedule and the stratified timestep samplers."""

from __future__ import annotations

import math

import pytest
import torch

from dynconvert.calibration.schedule import (
    LambdaSchedule,
    lambda_at,
    logit_normal_quantile,
    sample_ddpm_timesteps,
    sample_flow_times,
    stratified_uniform,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lambda_schedule_key_steps():
    sched = LambdaSchedule(target=0.5, hold_steps=100, warmup_steps=1000)
    assert [sched(s) for s in (0, 50, 99, 100)] == [1.0, 1.0, 1.0, 1.0]
    assert sched(101) == pytest.approx(1.0 - 0.5 / 1000)
    assert sched(600) == pytest.approx(0.75)
    assert sched(1099) == pytest.approx(0.5 + 0.5 / 1000)
    assert sched(1100) == pytest.approx(0.5)
    assert sched(200_000) == pytest.approx(0.5)
    # The paper's lambda 0.7 run: 5k warm-up.
    assert lambda_at(100 + 2500, 0.7, 100, 5000) == pytest.approx(0.85)
    # No warm-up: jump to the target after the hold.
    assert lambda_at(9, 0.3, 10, 0) == 1.0 and lambda_at(10, 0.3, 10, 0) == 0.3
    values = [sched(s) for s in range(0, 1500)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))  # never rises


def test_every_batch_spans_all_quarters():
    g = torch.Generator().manual_seed(0)
    for n in (4, 8, 9, 13, 64, 256):
        for _ in range(50):
            t = sample_ddpm_timesteps(n, 1000, 4, generator=g)
            assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
            quarters = torch.bincount(t // 250, minlength=4)
            assert (quarters > 0).all()
            assert quarters.max() - quarters.min() <= 1  # balanced


def test_quarters_are_uniform_over_many_batches():
    g = torch.Generator().manual_seed(1)
    t = torch.cat([sample_ddpm_timesteps(16, 1000, 4, generator=g) for _ in range(2000)])
    counts = torch.bincount(t // 50, minlength=20).double()  # 20 bins of 50 steps
    expected = t.numel() / 20
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    assert chi2 < 45.0  # 19 dof: p ~ 0.001
    assert abs(t.double().mean().item() - 499.5) < 5.0


def test_small_batch_and_stratum_assignment():
    u = stratified_uniform(2, 4, generator=torch.Generator().manual_seed(0))
    assert (u * 4).floor().tolist() == [0.0, 2.0]
    u = stratified_uniform(1000, 4, generator=torch.Generator().manual_seed(0))
    assert ((u >= 0) & (u < 1)).all()
    assert ((u * 4).floor()[:250] == 0).all() and ((u * 4).floor()[750:] == 3).all()


def test_flow_times_stratified_by_logit_normal_quantiles():
    # Quartile boundaries of the standard logit-normal: sigmoid(Phi^-1(k / 4)).
    z = [-0.6744897501960817, 0.0, 0.6744897501960817]
    edges = [0.0] + [1 / (1 + math.exp(-v)) for v in z] + [1.0]
    g = torch.Generator().manual_seed(0)
    all_s = []
    for _ in range(200):
        s = sample_flow_times(8, "logit_normal", 0.0, 1.0, 4, generator=g)
        all_s.append(s)
        for q in range(4):
            part = s[2 * q : 2 * q + 2]
            assert ((part >= edges[q]) & (part <= edges[q + 1])).all()
    s = torch.cat(all_s)
    # The stratified draws still follow the logit-normal: logit(s) ~ N(0, 1).
    logit = torch.log(s / (1 - s))
    assert abs(logit.mean().item()) < 0.05 and abs(logit.std().item() - 1.0) < 0.05
    assert float(logit_normal_quantile(torch.tensor([0.5]), mean=1.0)) == pytest.approx(
        1 / (1 + math.exp(-1.0)), rel=1e-6
    )
    uni = sample_flow_times(4, "uniform", generator=torch.Generator().manual_seed(3))
    assert [int(v * 4) for v in uni] == [0, 1, 2, 3]
