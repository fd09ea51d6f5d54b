"""The digits demo: preset and shipped weights, sample quality, classifier, Frechet distance,
evaluate_digits and its grid, and the training loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import dynconvert
import dynconvert.demo  # registers the "digits" preset
from dynconvert.demo import metrics
from dynconvert.demo.digits import DIGITS_CONFIG, DIGITS_SAMPLING, DIGITS_WEIGHTS, build_digits
from dynconvert.errors import CheckpointError, ConfigError
from dynconvert.models import build_model, list_presets
from dynconvert.sampling import sample


@pytest.fixture(scope="module")
def digits_model():
    return build_model("digits").eval()


def test_preset_is_registered():
    assert "digits" in list_presets()
    model = build_model("dit-digits")
    assert model.preset == "digits"
    assert (model.input_size, model.in_channels, model.num_classes) == (16, 1, 10)
    assert model.learn_sigma and model.y_embedder.dropout_prob > 0  # null label 10 for CFG


def test_shipped_weights_load_and_differ_from_random_init(digits_model):
    from safetensors.torch import load_file

    assert DIGITS_WEIGHTS.is_file() and DIGITS_WEIGHTS.stat().st_size < 5_000_000
    shipped = load_file(str(DIGITS_WEIGHTS))
    state = digits_model.state_dict()
    assert set(shipped) == set(state)
    for name, value in shipped.items():
        assert torch.equal(state[name], value.float()), name
    random_init = build_model("digits", pretrained=False).state_dict()
    trained = state["final_layer.linear.weight"]
    assert not torch.equal(trained, random_init["final_layer.linear.weight"])  # zero at init
    assert trained.abs().sum() > 0
    assert not torch.allclose(
        state["blocks.0.attn.qkv.weight"], random_init["blocks.0.attn.qkv.weight"]
    )


def test_build_digits_options():
    with pytest.raises(ConfigError, match="valid options"):
        build_model("digits", width=3)
    with pytest.raises(CheckpointError, match="pretrained=False"):
        build_model("digits", depth=2)
    small = build_model("digits", pretrained=False, depth=2)
    assert len(small.blocks) == 2 and small.preset_kwargs == {"pretrained": False, "depth": 2}
    fresh = build_digits(pretrained=False)
    assert fresh.preset == "digits" and not fresh.final_layer.linear.weight.any()  # DiT's zero init


@pytest.mark.slow  # 4 s; the digits recipe and evaluation tests sample in the default set
def test_ddim_samples_are_recognisable_digits(digits_model):
    labels = torch.arange(10).repeat_interleave(3)
    images = sample(digits_model, labels=labels, seed=0, **DIGITS_SAMPLING)
    assert images.shape == (30, 1, 16, 16)
    assert metrics.classifier_accuracy(images, labels) >= 0.8


def test_classifier_accuracy_on_held_out_real_digits():
    x, y = metrics.real_digits()
    _, held_out = metrics.digits_split()
    assert len(held_out) > 300
    assert metrics.classifier_accuracy(x[held_out], y[held_out]) >= 0.9


def test_frechet_distance_is_zero_for_equal_sets_and_grows_with_noise():
    x, _ = metrics.real_digits()
    x = x[:400]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    assert metrics.frechet_distance(x, x) < 1e-6
    small = metrics.frechet_distance(x, x + 0.1 * noise)
    large = metrics.frechet_distance(x, x + 0.4 * noise)
    assert 0 < small < large
    with pytest.raises(ConfigError, match="at least 2"):
        metrics.frechet_distance(x[:1], x)


def test_metrics_check_their_inputs():
    with pytest.raises(ConfigError, match="1-channel"):
        metrics.classifier_accuracy(torch.zeros(2, 3, 16, 16), torch.zeros(2))
    with pytest.raises(ConfigError, match="one label per image"):
        metrics.classifier_accuracy(torch.zeros(2, 1, 16, 16), torch.zeros(3))


def test_evaluate_digits_and_grid(digits_model, tmp_path):
    from dynconvert.demo import evaluate_digits, write_demo_grid

    model = dynconvert.convert(build_model("digits").eval(), budget=0.5)  # all routers still on
    progress = []
    result = evaluate_digits(
        None,
        model,
        per_class=2,
        steps=8,
        on_progress=lambda stage, i, n: progress.append((stage, i, n)),
    )
    assert result["samples"] == 20
    assert set(result["classifier_accuracy"]) >= {"original", "dynamic"}
    assert set(result["frechet_distance"]) >= {"original", "dynamic", "dynamic_vs_original"}
    t = result["tensors"]
    assert t["original"].shape == t["dynamic"].shape == (20, 1, 16, 16)
    # Freshly converted: every unit on, so the dynamic model reproduces the original.
    assert torch.allclose(t["original"], t["dynamic"], atol=1e-3)
    assert 1.0 <= result["flops_ratio"]["dynamic"] < 1.02  # all on, plus the routers' own cost
    assert result["frechet_distance"]["dynamic_vs_original"] < 1e-2
    assert [p for p in progress if p[0] == "original"][-1] == ("original", 8, 8)
    assert [p for p in progress if p[0] == "dynamic"][-1] == ("dynamic", 8, 8)
    json.dumps({k: v for k, v in result.items() if k != "tensors"})

    path = write_demo_grid(result, tmp_path / "samples.png", columns=2, upscale=2)
    with Image.open(path) as im:
        cell = 16 * 2 + 1
        width, height = im.size
        assert width == 2 * (2 * cell + 1) + 3 and 10 * cell + 1 < height <= 10 * cell + 41
        titles = np.asarray(im.convert("L"))[: height - (10 * cell + 1)]  # above the grids
        assert titles.min() < 100 and titles.max() == 255  # dark text on white
    with pytest.raises(ConfigError, match="evaluate_digits"):
        write_demo_grid({}, tmp_path / "bad.png")


@pytest.mark.slow  # 1 s; test_evaluate_digits_and_grid runs the evaluation by default
def test_evaluate_digits_with_a_separate_original(digits_model):
    from dynconvert.demo import evaluate_digits
    from dynconvert.testing import randomize_routing

    model = dynconvert.convert(build_model("digits").eval(), budget=0.5)
    randomize_routing(model, keep=0.5)
    result = evaluate_digits(digits_model, model, per_class=1, steps=4)
    assert result["flops_ratio"]["dynamic"] < 0.95
    assert not torch.allclose(result["tensors"]["original"], result["tensors"]["dynamic"])


def test_train_digits_runs_and_is_seeded():
    from dynconvert.demo.training import train_digits

    infos = []
    a = train_digits(steps=2, batch_size=8, on_step=infos.append)
    b = train_digits(steps=2, batch_size=8)
    assert [i.step for i in infos] == [1, 2] and infos[-1].steps == 2
    assert a.model.num_classes == DIGITS_CONFIG["num_classes"] and not a.model.training
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), name


def test_converted_digits_model_saves_and_loads_without_a_base(tmp_path):
    from dynconvert.testing import randomize_routing

    model = dynconvert.convert(build_model("digits").eval(), budget=0.5)
    randomize_routing(model, keep=0.5)
    dynconvert.save(model, tmp_path / "run")
    loaded = dynconvert.load(tmp_path / "run").eval()  # rebuilt from the "digits" preset
    settings = {**DIGITS_SAMPLING, "steps": 5}
    a = sample(model, labels=[3, 8], seed=1, **settings)
    b = sample(loaded, labels=[3, 8], seed=1, **settings)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_demo_routes_tokens_at_mid_and_high_noise(tmp_path):
    """The demo's own run (recipe digits, target 0.5, 400 steps; minutes on a CPU) meets its
    budget with the token routers switching a visible share of tokens off (issue 11)."""
    from dynconvert.runs import RunRequest, convert_run

    overrides = ["evaluate.kind=none", "report.bench=false", "samples.grid=false"]
    report = convert_run(
        RunRequest(model="digits", target_flops=0.5, out=str(tmp_path / "run"), overrides=overrides)
    )
    assert abs(report["flops_ratio"] - 0.5) < 0.05
    assert report["token_keep"]["t_ge_500"] < 0.9
    keep = dict(zip(report["profile"]["timesteps"], report["profile"]["token_keep"]))
    assert keep[0] > keep[999]  # more tokens kept near the data than near pure noise
