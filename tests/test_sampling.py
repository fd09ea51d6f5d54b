"""sample(): shapes, determinism, guidance, schedulers, timestep keys; save_grid / compare_grid."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import dynconvert
from dynconvert.errors import ConfigError
from dynconvert.sampling import (
    compare_grid,
    comparison_titles,
    make_scheduler,
    model_spec,
    sample,
    save_grid,
)
from dynconvert.testing import (
    randomize_routing,
    tiny_diffusers_dit,
    tiny_dit,
    tiny_pixart,
    tiny_uvit,
)


def _record_calls(model):
    """Record (x batch, t, labels) of every top-level call of ``model``."""
    calls = []

    def hook(module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        y = kwargs.get("class_labels", args[2] if len(args) > 2 else None)
        x = kwargs.get("hidden_states", args[0] if args else None)
        calls.append((x.shape[0], t.clone(), None if y is None else y.clone()))

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_shape_and_determinism():
    model = tiny_dit()
    a = sample(model, labels=[0, 1, 2], steps=4, seed=1)
    b = sample(model, labels=[0, 1, 2], steps=4, seed=1)
    c = sample(model, labels=[0, 1, 2], steps=4, seed=2)
    assert a.shape == (3, 4, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_same_seed_same_initial_noise_for_any_model():
    """With zero steps of change (an identity-like schedule is not available), the first model
    input of two different models of the same sample shape must be the same noise."""
    seen = []
    for model in (tiny_dit(seed=0), tiny_dit(seed=5)):
        calls: list[torch.Tensor] = []
        h = model.register_forward_pre_hook(
            lambda m, args, calls=calls: calls.append(args[0][:2].clone())
        )
        sample(model, labels=[3, 4], steps=2, seed=7)
        h.remove()
        seen.append(calls[0])
    assert torch.equal(seen[0], seen[1])


def test_converted_with_all_routers_on_matches_original():
    original = tiny_dit()
    converted = dynconvert.convert(tiny_dit(), budget=0.5)  # routers start with every unit on
    ref = sample(original, labels=[1, 5, 9], steps=5, seed=3)
    dyn = sample(converted, labels=[1, 5, 9], steps=5, seed=3)  # eval routing: fast path
    scale = ref.abs().max()
    assert torch.allclose(dyn, ref, atol=1e-4 * scale, rtol=1e-4)
    with dynconvert.routing(converted, "full"):
        full = sample(converted, labels=[1, 5, 9], steps=5, seed=3)
    assert torch.allclose(full, ref, atol=1e-4 * scale, rtol=1e-4)


def test_guidance_doubles_the_batch_with_the_null_label():
    model = tiny_dit()
    calls, h = _record_calls(model)
    guided = sample(model, labels=[2, 7], steps=3, cfg_scale=4.0)
    h.remove()
    assert len(calls) == 3
    for n, t, y in calls:
        assert n == 4 and y.tolist() == [2, 7, 10, 10]  # null label = num_classes
        assert torch.all(t == t[0])  # both halves at one timestep: one set of width masks
    calls, h = _record_calls(model)
    plain = sample(model, labels=[2, 7], steps=3, cfg_scale=1.0)
    h.remove()
    assert all(n == 2 for n, _, _ in calls)
    assert not torch.allclose(guided, plain)


def test_diffusers_dit_null_label_is_num_embeds():
    model = tiny_diffusers_dit()
    assert model_spec(model).null_label == 10
    calls, h = _record_calls(model)
    out = sample(model, labels=[0, 3], steps=2)
    h.remove()
    assert out.shape == (2, 4, 8, 8)
    assert calls[0][2].tolist() == [0, 3, 10, 10]


@pytest.mark.parametrize("scheduler", ["ddim", "dpm", "ddpm"])
@pytest.mark.parametrize("builder", [tiny_dit, tiny_diffusers_dit])
def test_each_scheduler_runs_with_the_training_timesteps(scheduler, builder):
    model = builder()
    calls, h = _record_calls(model)
    out = sample(model, labels=[1, 2], steps=4, scheduler=scheduler)
    h.remove()
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    expected = make_scheduler(scheduler)
    expected.set_timesteps(4)
    assert [int(t[0]) for _, t, _ in calls] == expected.timesteps.tolist()


def test_ddpm_250_is_dits_respacing():
    s = make_scheduler("ddpm", learned_sigma=True)
    s.set_timesteps(250)
    ts = s.timesteps.tolist()
    assert len(ts) == 250 and ts[0] == 999 and ts[-1] == 0
    assert s.config.variance_type == "learned_range"


def test_uvit_scaled_linear_and_t_plus_one():
    model = tiny_uvit()  # 11 classes, no null label known
    spec = model_spec(model)
    assert spec.beta_schedule == "scaled_linear" and spec.timestep_offset == 1
    with pytest.raises(ConfigError, match="null_label"):
        sample(model, labels=[0, 1], steps=2)
    calls, h = _record_calls(model)
    out = sample(model, labels=[0, 1], steps=4, null_label=10, cfg_scale=2.0)
    h.remove()
    expected = make_scheduler("ddim", beta_schedule="scaled_linear")
    expected.set_timesteps(4)
    assert [int(t[0]) for _, t, _ in calls] == (expected.timesteps + 1).tolist()
    assert calls[0][2].tolist() == [0, 1, 10, 10]
    assert out.shape == (2, 4, 8, 8)


def test_pixart_guidance_needs_null_cond():
    model = tiny_pixart()
    cond = torch.randn(2, 5, 12)
    with pytest.raises(ConfigError, match="null_cond"):
        sample(model, cond=cond, steps=2)
    out = sample(model, cond=cond, null_cond=torch.zeros(5, 12), steps=2)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("builder", [tiny_dit, tiny_uvit])
def test_converted_sampling_fills_the_mask_table_with_scheduler_timesteps(builder):
    model = dynconvert.convert(builder(), budget=0.5)
    randomize_routing(model, keep=0.5)
    bank = dynconvert.get_state(model)
    bank.clear_cache()
    spec = model_spec(model)
    kwargs = {"null_label": 10} if spec.null_label is None else {}
    sample(model, labels=[0, 1], steps=6, scheduler="dpm", **kwargs)
    expected = make_scheduler("dpm", beta_schedule=spec.beta_schedule)
    expected.set_timesteps(6)
    keys = {float(t) + spec.timestep_offset for t in expected.timesteps}
    assert {t for _, t in bank._table} == keys  # keyed (budget, t): the training t values


def test_on_step_and_chunks():
    model = tiny_dit()
    seen = []
    whole = sample(model, labels=list(range(5)), steps=3, seed=4)
    parts = sample(
        model,
        labels=list(range(5)),
        steps=3,
        seed=4,
        batch_size=2,
        on_step=lambda i, n: seen.append((i, n)),
    )
    assert seen == [(i, 9) for i in range(1, 10)]
    assert torch.allclose(whole, parts, rtol=1e-4, atol=1e-4 * whole.abs().max())


def test_model_mode_is_restored():
    model = tiny_dit().train()
    sample(model, labels=[0], steps=1)
    assert model.training


def test_errors_name_the_fix():
    model = tiny_dit()
    with pytest.raises(ConfigError, match="labels="):
        sample(model, steps=2)
    with pytest.raises(ConfigError, match="out of range"):
        sample(model, labels=[11], steps=2)
    with pytest.raises(ConfigError, match="unknown scheduler"):
        sample(model, labels=[0], scheduler="euler")
    with pytest.raises(ConfigError, match="steps"):
        sample(model, labels=[0], steps=0)


def test_save_grid_writes_a_png(tmp_path):
    images = torch.linspace(-1, 1, 6 * 16 * 16).reshape(6, 1, 16, 16)
    path = save_grid(images, tmp_path / "sub" / "grid.png", nrow=3, upscale=2)
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and im.mode == "L"
        assert im.size == (3 * 33 + 1, 2 * 33 + 1)  # 32 px cells, 1 px padding
    assert os.listdir(path.parent) == ["grid.png"]
    rgb = save_grid(torch.rand(4, 3, 8, 8), tmp_path / "rgb.png", value_range=(0, 1))
    with Image.open(rgb) as im:
        assert im.mode == "RGB" and im.size == (19, 19)


def test_save_grid_is_atomic(tmp_path, monkeypatch):
    path = save_grid(torch.zeros(1, 1, 4, 4), tmp_path / "grid.png")
    before = path.read_bytes()

    def broken_replace(src, dst, **dir_fds):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        save_grid(torch.ones(4, 1, 4, 4), path)
    assert path.read_bytes() == before  # the old file is intact
    assert os.listdir(tmp_path) == ["grid.png"]  # and no temporary file is left behind


def test_save_grid_rejects_latents(tmp_path):
    with pytest.raises(ConfigError, match="VAE"):
        save_grid(torch.zeros(2, 4, 8, 8), tmp_path / "x.png")


def test_compare_grid_side_by_side(tmp_path):
    a, b = -torch.ones(4, 1, 8, 8), torch.ones(4, 1, 8, 8)
    path = compare_grid(a, b, tmp_path / "cmp.png", nrow=2, separator=3)
    with Image.open(path) as im:
        assert im.size == (19 + 3 + 19, 19)
        assert im.getpixel((5, 5)) == 0 and im.getpixel((19 + 3 + 5, 5)) == 255
        assert im.getpixel((20, 5)) == 255  # the separator
    with pytest.raises(ConfigError, match="same shape"):
        compare_grid(a, b[:2], tmp_path / "bad.png")


def test_compare_grid_titles_say_which_side_is_which(tmp_path):
    """The titles sit on a white strip above each grid; the grids below are unchanged."""
    a, b = -torch.ones(4, 1, 8, 8), torch.ones(4, 1, 8, 8)
    assert comparison_titles(0.514) == ("original", "dynamic, 0.51x FLOPs")
    assert comparison_titles(None) == ("original", "dynamic")
    plain = np.asarray(Image.open(compare_grid(a, b, tmp_path / "plain.png", nrow=2, upscale=4)))
    path = compare_grid(a, b, tmp_path / "titled.png", nrow=2, upscale=4,
                        titles=comparison_titles(0.514))  # fmt: skip
    titled = np.asarray(Image.open(path))
    strip = titled.shape[0] - plain.shape[0]
    assert titled.shape[1] == plain.shape[1] and 14 <= strip <= 40
    assert np.array_equal(titled[strip:], plain)
    half = plain.shape[1] // 2
    left, right = titled[:strip, : half - 2], titled[:strip, half + 2 :]
    assert (left < 100).any() and (right < 100).any()  # text on both sides
    assert (right < 100).sum() > (left < 100).sum()  # "dynamic, 0.51x FLOPs" is the longer


class _PointMassOracle(torch.nn.Module):
    """The exact eps predictor for data that is always ``mu``.

    eps = (x_t - sqrt(abar) mu) / sqrt(1 - abar).
    """

    def __init__(self, mu: torch.Tensor, schedule: str = "linear"):
        super().__init__()
        from dynconvert.calibration.diffusion import make_betas

        abar = torch.cumprod(1.0 - torch.tensor(make_betas(schedule)), 0).float()
        self.register_buffer("abar", abar)
        self.mu = mu

    def forward(self, x, t):
        a = self.abar[t.long()].reshape(-1, 1, 1, 1)
        return (x - a.sqrt() * self.mu) / (1.0 - a).sqrt()


@pytest.mark.parametrize("scheduler", ["ddim", "dpm", "ddpm"])
def test_an_exact_denoiser_recovers_the_data(scheduler):
    """Holds only if the scheduler's schedule and the timesteps the model sees are consistent."""
    mu = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4)
    out = sample(
        _PointMassOracle(mu), num_samples=3, steps=20, scheduler=scheduler, image_size=4, channels=1
    )
    assert out.shape == (3, 1, 4, 4)
    assert (out - mu).abs().max() < 1e-3
