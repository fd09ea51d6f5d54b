"""Recipes: the shipped files load, document every field, reject unknown keys naming the valid
ones, take dotted --set overrides, and each one runs end to end on a tiny model of its family."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dynconvert.cli import app
from dynconvert.errors import ConfigError
from dynconvert.recipes import (
    RECIPE_DIR,
    Recipe,
    apply_overrides,
    load_recipe,
    parse_value,
    recipe_for_model,
    recipe_from_dict,
    shipped_recipes,
)

pytestmark = pytest.mark.usefixtures("one_thread")

EXPECTED = {"digits", "dit-s", "dit-b", "dit-xl-imagenet256", "uvit-imagenet256", "pixart-alpha"}


def test_shipped_recipes_load_and_check():
    assert EXPECTED <= set(shipped_recipes())
    for name in shipped_recipes():
        r = load_recipe(name)
        assert r.name == name and r.model and r.description
        assert 0 < r.target_flops <= 1
        assert r.calibration_config().target == r.target_flops
        r.convert_config()


def test_the_shipped_files_live_in_the_top_level_folder():
    assert RECIPE_DIR == Path(__file__).resolve().parents[1] / "recipes"
    assert {p.parent for p in shipped_recipes().values()} == {RECIPE_DIR}
    assert (RECIPE_DIR / "digits.yaml").is_file()


def test_every_field_is_documented_in_the_yaml():
    key = re.compile(r"^(\s*)([A-Za-z_][\w-]*):")
    for name, path in shipped_recipes().items():
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            m = key.match(line)
            if not m:
                continue
            inline = "#" in line
            above = i > 0 and lines[i - 1].strip().startswith("#")
            section = line.rstrip().endswith(":") and not inline  # a section header: its fields say
            assert inline or above or section or m.group(2) in ("name", "description"), (
                f"{name}.yaml line {i + 1} ({line.strip()}) has no comment"
            )


def test_dit_xl_recipe_is_the_published_setting():
    r = load_recipe("dit-xl-imagenet256")
    cal = r.calibration_config()
    assert r.model == "dit-xl" and r.target_flops == 0.5
    assert cal.lr == 1e-4 and cal.batch_size == 256 and cal.warmup_steps == 1000
    assert cal.complete_model_steps == 30_000 and cal.ema_decay == 0.9999
    assert 150_000 <= cal.steps <= 200_000 and cal.mixed_precision == "bf16"
    assert cal.timestep_strata == 4 and cal.flops_weight == 2.0
    assert "accelerate launch" in r.launch and "--num_processes 8" in r.launch
    assert "-m dynconvert convert --recipe dit-xl-imagenet256" in r.launch
    assert load_recipe("dit-s").calibration_config().steps == 50_000
    assert load_recipe("dit-b").calibration_config().steps == 100_000


def test_unknown_keys_list_the_valid_ones(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nmodel: dit-tiny\nlearning_rate: 1e-4\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(str(bad))
    msg = str(err.value)
    assert "learning_rate" in msg and "calibration" in msg and "target_flops" in msg
    bad.write_text("name: bad\ncalibration:\n  learning_rate: 1.0e-4\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(str(bad))
    assert "learning_rate" in str(err.value) and "lr" in str(err.value)
    with pytest.raises(ConfigError, match="valid keys of samples"):
        load_recipe("digits", ["samples.colour=red"])
    # Python names in the library's message; the command line shows --target-flops (test_cli)
    with pytest.raises(ConfigError, match="set `target_flops` instead"):
        load_recipe("digits", ["calibration.target=0.3"])


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError, match="lr"):
        load_recipe("digits", ["calibration.lr=abc"])
    with pytest.raises(ConfigError, match="target_flops"):
        load_recipe("digits", ["target_flops=1.5"])
    with pytest.raises(ConfigError, match="scheduler"):
        load_recipe("digits", ["samples.scheduler=euler"])
    with pytest.raises(ConfigError, match="tau"):
        load_recipe("digits", ["convert.tau=0"])
    with pytest.raises(ConfigError, match="key=value"):
        load_recipe("digits", ["calibration.lr"])
    with pytest.raises(ConfigError, match="shipped recipes"):
        load_recipe("no-such-recipe")


def test_set_overrides_are_typed_and_dotted():
    assert parse_value("2e-5") == 2e-5 and parse_value("1.0e-4") == 1e-4
    assert (
        parse_value("true") is True
        and parse_value("null") is None
        and parse_value("[1, 2]") == [1, 2]
    )
    r = load_recipe(
        "digits", ["calibration.lr=2e-5", "model=dit-tiny", "calibration.adam_betas=[0.9, 0.99]"]
    )
    assert r.calibration["lr"] == 2e-5 and r.model == "dit-tiny"
    assert r.calibration_config().adam_betas == (0.9, 0.99)
    assert apply_overrides({"name": "x"}, {"report.bench": False}) == {
        "name": "x",
        "report": {"bench": False},
    }


def test_round_trip_and_defaults():
    r = load_recipe("uvit-imagenet256")
    assert recipe_from_dict(r.to_dict()) == r
    d = Recipe(name="d")
    assert d.calibration_config(0.5).steps == 50_000 and d.report.bench


def test_default_recipe_for_a_model():
    assert recipe_for_model("dit-xl") == "dit-xl-imagenet256"
    assert recipe_for_model("DiT-S/2") == "dit-s"
    assert recipe_for_model("U-ViT-L/2") == "uvit-imagenet256"
    assert recipe_for_model("pixart-alpha") == "pixart-alpha"
    assert recipe_for_model("digits") == "digits"
    assert recipe_for_model("dit-tiny") is None


# Every recipe on a tiny model of its family: override the model and take a handful of steps.
LIGHT = [
    "--steps", "2", "--data", "synthetic", "--random-init",
    "--set", "calibration.batch_size=4", "--set", "calibration.num_workers=0",
    "--set", "report.profile_timesteps=2", "--set", "report.profile_batch=2",
    "--set", "report.executed_timesteps=1", "--set", "report.bench_batch=2",
    "--set", "report.bench_repeats=1",
]  # fmt: skip
FAMILIES = [
    ("dit-xl-imagenet256", "dit-tiny"),
    # dit-s and dit-b run the same tiny DiT as dit-xl with other settings: slow set.
    pytest.param("dit-s", "dit-tiny", marks=pytest.mark.slow),
    pytest.param("dit-b", "dit-tiny", marks=pytest.mark.slow),
    ("uvit-imagenet256", "uvit-tiny"),
    ("pixart-alpha", "pixart-tiny"),
]


@pytest.mark.parametrize("recipe,tiny", FAMILIES)
def test_recipe_runs_on_a_tiny_model_of_its_family(recipe, tiny, tmp_path):
    out = tmp_path / "run"
    args = ["convert", "--recipe", recipe, "--model", tiny, "--out", str(out), "--json", *LIGHT]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["recipe"] == recipe and report["steps"] == 2
    assert 0 < report["flops_ratio"] <= 1.1 and len(report["flops_ratio_per_t"]) == 1000
    record = json.loads((out / "dynconvert.json").read_text())
    assert (out / record["weights"]["file"]).is_file() and (out / "report.json").is_file()


def test_digits_recipe_runs_with_its_metrics(tmp_path):
    out = tmp_path / "digits"
    light = [a for a in LIGHT if a != "--random-init"]  # the shipped weights
    args = ["convert", "--recipe", "digits", "--out", str(out), "--json", *light,
            "--set", "evaluate.per_class=2", "--set", "evaluate.steps=2",
            "--set", "samples.steps=2", "--set", "report.sampling_budget=10"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for key in ("classifier_accuracy", "frechet_distance"):
        assert set(report[key]) == {"original", "dynamic"}
    assert report["samples"] == "samples.png" and (out / "samples.png").is_file()
    assert report["classifier_accuracy"]["original"] > 0.5  # the shipped weights, not random ones
    # Budget hit at sampling: thresholds shifted on held-out samples of the recipe's sampler,
    # training and sampling ratios side by side, the step stored in the record.
    budget = report["calibration"]["sampling_budget"]
    assert budget["sampler"]["samples"] == 10 and budget["after"] < budget["before"]
    assert report["flops_ratio_sampling"] == budget["after"] and report["flops_ratio_train"] > 0
    record = json.loads((out / "dynconvert.json").read_text())
    assert record["calibration"]["sampling_budget"] == budget
