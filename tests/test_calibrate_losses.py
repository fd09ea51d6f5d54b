"""Loss terms of calibration against hand-computed values (eps, VB, v, flow, FLOPs, distill)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dynconvert.calibration.config import CalibrationConfig
from dynconvert.calibration.diffusion import GaussianDiffusion, make_betas
from dynconvert.calibration.objectives import (
    EpsObjective,
    FlowObjective,
    build_objective,
    distill_loss,
    flops_loss,
)
from dynconvert.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_beta_schedules_endpoints():
    lin = make_betas("linear", 1000)
    assert lin[0] == pytest.approx(1e-4) and lin[-1] == pytest.approx(0.02)
    assert np.allclose(np.diff(lin), (0.02 - 1e-4) / 999)
    sl = make_betas("scaled_linear", 1000)
    assert sl[0] == pytest.approx(0.00085) and sl[-1] == pytest.approx(0.012)
    assert np.allclose(np.sqrt(sl)[1:] - np.sqrt(sl)[:-1], (0.012**0.5 - 0.00085**0.5) / 999)
    assert make_betas("linear", 500)[-1] == pytest.approx(0.04)  # DiT scales by 1000 / T
    with pytest.raises(ConfigError, match="linear, scaled_linear"):
        make_betas("cosine")


def test_q_sample_and_eps_mse_by_hand():
    diff = GaussianDiffusion("linear")
    abar = np.cumprod(1 - make_betas("linear"))
    x0 = torch.tensor([[[[0.5, -1.0]]]])  # (1, 1, 1, 2)
    noise = torch.tensor([[[[1.0, 2.0]]]])
    t = torch.tensor([400])
    xt = diff.q_sample(x0, t, noise)
    a = abar[400]
    expect = [math.sqrt(a) * 0.5 + math.sqrt(1 - a) * 1.0, -math.sqrt(a) + 2 * math.sqrt(1 - a)]
    assert xt.flatten().tolist() == pytest.approx(expect, rel=1e-6)
    eps = torch.tensor([[[[0.0, 1.0]]]])
    terms = diff.hybrid_loss(eps, x0, xt, t, noise)
    assert set(terms) == {"mse", "loss"}
    assert terms["mse"].item() == pytest.approx((1.0**2 + 1.0**2) / 2)


def _vb_reference(x0, xt, t, eps, v, betas):
    """The VB term from the textbook formulas (float64, exact normal CDF for t > 0 not needed)."""
    alphas = 1 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_var_clipped = np.append(post_var[1], post_var[1:])
    b, a, ap = betas[t], abar[t], abar_prev[t]
    x0_hat = (xt - math.sqrt(1 - a) * eps) / math.sqrt(a)

    def post_mean(x_start):
        return (math.sqrt(ap) * b / (1 - a)) * x_start + (
            math.sqrt(alphas[t]) * (1 - ap) / (1 - a)
        ) * xt

    mu_q, mu_p = post_mean(x0), post_mean(x0_hat)
    frac = (v + 1) / 2
    logvar_p = frac * math.log(b) + (1 - frac) * math.log(post_var_clipped[t])
    var_q, var_p = post_var_clipped[t], np.exp(logvar_p)
    if t > 0:
        # KL(N(mu_q, var_q) || N(mu_p, var_p))
        #   = log(s_p/s_q) + (var_q + (mu_q-mu_p)^2)/(2 var_p) - 1/2
        kl = 0.5 * np.log(var_p / var_q) + (var_q + (mu_q - mu_p) ** 2) / (2 * var_p) - 0.5
        return float(np.mean(kl) / math.log(2))

    def cdf(z):
        return 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))

    sd = np.sqrt(var_p)
    upper = np.where(x0 > 0.999, 1.0, cdf((x0 + 1 / 255 - mu_p) / sd))
    lower = np.where(x0 < -0.999, 0.0, cdf((x0 - 1 / 255 - mu_p) / sd))
    return float(np.mean(-np.log(np.maximum(upper - lower, 1e-12))) / math.log(2))


@pytest.mark.parametrize("t", [0, 1, 37, 500, 999])
def test_vb_term_matches_independent_formula(t):
    g = torch.Generator().manual_seed(t)
    x0 = torch.rand(1, 2, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    x0[0, 0, 0, 0] = 1.0  # the edge bins of the decoder
    x0[0, 0, 0, 1] = -1.0
    noise = torch.randn(1, 2, 2, 2, generator=g, dtype=torch.float64)
    eps = noise + 0.3 * torch.randn(1, 2, 2, 2, generator=g, dtype=torch.float64)
    v = torch.rand(1, 2, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    diff = GaussianDiffusion("linear")
    tt = torch.tensor([t])
    xt = diff.q_sample(x0.float(), tt, noise.float())
    out = torch.cat([eps, v], dim=1).float()
    terms = diff.hybrid_loss(out, x0.float(), xt, tt, noise.float())
    ref = _vb_reference(
        x0.numpy(), xt.double().numpy(), t, eps.numpy(), v.numpy(), make_betas("linear")
    )
    assert terms["vb"].item() == pytest.approx(ref, rel=2e-3, abs=1e-5)
    assert terms["loss"].item() == pytest.approx(terms["mse"].item() + terms["vb"].item(), rel=1e-6)
    assert terms["mse"].item() == pytest.approx(((noise - eps) ** 2).mean().item(), rel=1e-5)


def test_vb_trains_only_the_variance_channels():
    diff = GaussianDiffusion("linear")
    x0 = torch.randn(2, 2, 2, 2)
    noise = torch.randn(2, 2, 2, 2)
    t = torch.tensor([3, 700])
    xt = diff.q_sample(x0, t, noise)
    out = torch.randn(2, 4, 2, 2, requires_grad=True)
    diff.hybrid_loss(out, x0, xt, t, noise)["vb"].sum().backward()
    assert torch.all(out.grad[:, :2] == 0)  # the mean is detached inside the VB term
    assert out.grad[:, 2:].abs().sum() > 0


def test_learned_range_endpoints():
    diff = GaussianDiffusion("linear")
    t = torch.tensor([10])
    hi = diff.learned_log_variance(torch.ones(1, 1, 1, 1), t)
    lo = diff.learned_log_variance(-torch.ones(1, 1, 1, 1), t)
    assert hi.item() == pytest.approx(math.log(make_betas("linear")[10]), rel=1e-6)
    assert lo.item() == pytest.approx(
        float(diff.table("posterior_log_variance_clipped")[10]), rel=1e-6
    )


def test_eps_objective_rejects_wrong_channels_and_learn_sigma_flag():
    diff = GaussianDiffusion("linear")
    obj = EpsObjective(diff, learn_sigma=True)
    x0 = torch.zeros(2, 4, 2, 2)
    torch.manual_seed(0)
    noisy = obj.noise(x0)
    with pytest.raises(ConfigError, match="learn_sigma=True"):
        obj.loss(torch.zeros(2, 4, 2, 2), x0, noisy)
    with pytest.raises(ConfigError, match="channels"):
        EpsObjective(diff).loss(torch.zeros(2, 3, 2, 2), x0, noisy)
    no_sigma = EpsObjective(diff, learn_sigma=False).loss(torch.zeros(2, 8, 2, 2), x0, noisy)
    assert "vb" not in no_sigma


def test_v_prediction_target_by_hand():
    cfg = CalibrationConfig(target=0.5, objective="v", beta_schedule="scaled_linear")
    obj = build_objective(cfg)
    abar = np.cumprod(1 - make_betas("scaled_linear"))
    torch.manual_seed(1)
    x0 = torch.full((4, 1, 1, 1), 0.5)
    noisy = obj.noise(x0)
    idx = noisy.index.tolist()
    v = torch.tensor(
        [
            math.sqrt(abar[i]) * n - math.sqrt(1 - abar[i]) * 0.5
            for i, n in zip(idx, noisy.noise.flatten().tolist(), strict=True)
        ]
    )
    exact = obj.loss(v.reshape(4, 1, 1, 1), x0, noisy)
    assert exact["loss"].abs().max().item() < 1e-6
    off = obj.loss(v.reshape(4, 1, 1, 1) + 2.0, x0, noisy)
    assert off["loss"].tolist() == pytest.approx([4.0] * 4, rel=1e-5)


def test_flow_interpolation_velocity_and_timestep_scale():
    obj = FlowObjective(dist="uniform", strata=4, timestep_scale=1000.0)
    torch.manual_seed(2)
    x0 = torch.full((4, 1, 1, 1), 2.0)
    noisy = obj.noise(x0)
    s = noisy.s
    assert noisy.t.tolist() == pytest.approx((s * 1000).tolist())
    expect = (1 - s) * 2.0 + s * noisy.noise.flatten()
    assert noisy.x_t.flatten().tolist() == pytest.approx(expect.tolist(), rel=1e-6)
    velocity = noisy.noise - x0
    assert obj.loss(velocity, x0, noisy)["loss"].abs().max().item() < 1e-12
    assert obj.loss(velocity + 1.0, x0, noisy)["loss"].tolist() == pytest.approx([1.0] * 4)
    # Learned-sigma outputs: only the first C channels are the velocity.
    assert obj.loss(torch.cat([velocity, velocity * 7], 1), x0, noisy)["loss"].abs().max() < 1e-12


def test_flops_term_and_distill_by_hand():
    ratios = torch.tensor([0.4, 0.9, 0.5, 0.6], requires_grad=True)  # mean 0.6
    term = flops_loss(ratios, lam=0.5, weight=2.0)
    assert term.item() == pytest.approx(2.0 * 0.1**2)
    term.backward()
    assert ratios.grad.tolist() == pytest.approx([2 * 2.0 * 0.1 / 4] * 4)
    assert flops_loss(torch.tensor([1.0]), 1.0).item() == 0.0
    s, t = torch.zeros(2, 2, 1, 1), torch.tensor([1.0, 3.0]).reshape(1, 2, 1, 1).expand(2, 2, 1, 1)
    assert distill_loss(s, t).tolist() == pytest.approx([5.0, 5.0])
    with pytest.raises(ConfigError, match="teacher"):
        distill_loss(torch.zeros(1, 2, 1, 1), torch.zeros(1, 4, 1, 1))


def test_build_objective_auto_uses_adapter_defaults():
    from dynconvert.calibration.adapters import select_adapter
    from dynconvert.models import build_model

    cfg = CalibrationConfig(target=0.5)
    uvit = select_adapter(build_model("uvit-tiny"))
    obj = build_objective(cfg, uvit)
    assert obj.kind == "eps" and obj.timestep_offset == 1
    assert obj.diffusion.table("betas")[0] == pytest.approx(0.00085)
    torch.manual_seed(0)
    noisy = obj.noise(torch.zeros(8, 4, 2, 2))
    assert torch.equal(noisy.t, noisy.index + 1)  # U-ViT sees t in 1..1000
    dit = build_objective(cfg, select_adapter(build_model("dit-tiny")))
    assert dit.diffusion.table("betas")[-1] == pytest.approx(0.02)
    assert build_objective(CalibrationConfig(target=0.5, objective="flow")).kind == "flow"
