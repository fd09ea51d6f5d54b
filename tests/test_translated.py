"""The translated-digits demo (issue 25, item 2): its data, preset and shipped weights, classifier,
training loop, evaluation and recipe, sharing the digits demo's machinery."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dynconvert.calibration.data import as_source
from dynconvert.cli import app
from dynconvert.demo import data, metrics
from dynconvert.demo.models import DEMOS, build_demo, demo_spec
from dynconvert.demo.translated import TRANSLATED_CONFIG
from dynconvert.errors import ConfigError
from dynconvert.measure.evaluations import EVALUATIONS
from dynconvert.models import build_model, list_presets
from dynconvert.recipes import load_recipe, recipe_for_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return build_model("translated").eval()


def test_place_pastes_each_glyph_at_its_position():
    glyphs = torch.arange(8.0).reshape(2, 1, 2, 2)
    out = data.place(glyphs, torch.tensor([0, 2]), torch.tensor([1, 0]), 4)
    assert out.shape == (2, 1, 4, 4)
    assert torch.equal(out[0, 0, 0:2, 1:3], glyphs[0, 0]) and torch.equal(
        out[1, 0, 2:4, 0:2], glyphs[1, 0]
    )
    assert int((out == data.BACKGROUND).sum()) == 2 * 16 - 8  # everything else is background
    with pytest.raises(ConfigError, match="does not fit"):
        data.place(glyphs, torch.tensor([3, 0]), torch.tensor([0, 0]), 4)


def test_translated_data_is_the_digits_on_an_empty_canvas():
    ref = data.translated().tensors
    digits = data.digits(16).tensors
    assert ref["x"].shape == (1797, 1, 32, 32) and torch.equal(ref["y"], digits["y"])
    # Each image holds its digit's 16x16 pixels exactly once, the rest is background.
    assert torch.allclose(ref["x"].sum((1, 2, 3)), digits["x"].sum((1, 2, 3)) - (32 * 32 - 16 * 16))
    assert float((ref["x"] > -1).float().mean()) < 0.25  # mostly empty canvas
    # Seeded: the same positions every time, others for another seed; spread over the canvas.
    assert torch.equal(data.translated().tensors["x"], ref["x"])
    other = data.translated(copies=2, seed=1).tensors["x"]
    assert other.shape[0] == 2 * 1797 and not torch.equal(other[:1797], ref["x"])
    ink = (ref["x"] > -1).float().mean((0, 1))  # (32, 32): where the digits fall
    assert (
        ink[:8].sum() > 0 and ink[-8:].sum() > 0 and ink[:, :8].sum() > 0 and ink[:, -8:].sum() > 0
    )
    assert len(as_source("translated")) == 1797
    with pytest.raises(ConfigError, match="copies"):
        data.translated(copies=0)


def test_preset_shipped_weights_and_options(model):
    from safetensors.torch import load_file

    assert "translated" in list_presets() and build_model("dit-translated").preset == "translated"
    assert (model.input_size, model.in_channels, model.num_classes) == (32, 1, 10)
    assert model.x_embedder.num_patches == 64 == demo_spec("translated").tokens
    spec = DEMOS["translated"]
    assert spec.weights.is_file() and spec.weights.stat().st_size < 1_000_000
    shipped = load_file(str(spec.weights))
    state = model.state_dict()
    assert set(shipped) == set(state)
    assert all(torch.equal(state[k], v.float()) for k, v in shipped.items())
    assert state["final_layer.linear.weight"].abs().sum() > 0  # trained (zero at DiT's init)
    with pytest.raises(ConfigError, match="valid options"):
        build_model("translated", width=3)
    assert build_demo("translated", pretrained=False, depth=1).preset_kwargs == {
        "pretrained": False,
        "depth": 1,
    }
    with pytest.raises(ConfigError, match="the demos are"):
        demo_spec("letters")
    assert TRANSLATED_CONFIG["patch_size"] == 4
    evaluation = EVALUATIONS["translated"]  # its classifier knows the translated model only
    assert evaluation.check(model) == "" and "translated" in evaluation.check(build_model("digits"))


def test_classifier_recognises_held_out_digits_anywhere_on_the_canvas():
    x, y = metrics.real_digits("translated")
    _, held_out = metrics.digits_split(benchmark="translated")
    assert demo_spec("translated").classifier.is_file()
    assert metrics.classifier_accuracy(x[held_out], y[held_out], "translated") >= 0.9
    assert metrics.features(x[:3], benchmark="translated").shape == (3, 64)
    assert metrics.frechet_distance(x[:200], x[:200], "translated") < 1e-6


def test_training_runs_on_the_translated_canvas_and_is_seeded():
    from dynconvert.demo.training import train_digits

    a = train_digits("translated", steps=2, batch_size=8)
    b = train_digits("translated", steps=2, batch_size=8)
    assert a.model.input_size == 32 and a.model.preset == "translated" and not a.model.training
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.mark.slow  # 31 s on a shared machine; the digits recipe test walks the same path
def test_recipe_runs_with_its_metrics(tmp_path):
    assert recipe_for_model("translated") == "translated"
    recipe = load_recipe("translated")
    assert (recipe.data, recipe.evaluate.kind) == ("translated", "translated")
    out = tmp_path / "run"
    args = ["convert", "--model", "translated", "--out", str(out), "--json", "--steps", "2",
            "--set", "calibration.batch_size=4", "--set", "report.profile_timesteps=2",
            "--set", "report.profile_batch=2", "--set", "report.executed_timesteps=1",
            "--set", "report.bench=false", "--set", "evaluate.per_class=1",
            "--set", "evaluate.steps=2", "--set", "samples.steps=2"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["recipe"] == "translated"
    assert set(report["classifier_accuracy"]) == {"original", "dynamic"}
    assert report["evaluation"]["benchmark"] == "translated"  # scored by the translated classifier
    assert report["evaluation"]["classifier_accuracy_real_heldout"] > 0.9
    assert report["samples"] == "samples.png" and (out / "samples.png").is_file()
    with Image.open(out / "samples.png") as im:  # one row per class of 32x32 samples, under titles
        grids = 10 * (32 * 2 + 1) + 1
        assert grids < im.size[1] <= grids + 40
