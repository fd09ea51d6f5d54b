"""The command line: help with examples, convert end to end on a tiny model, inspect / sample /
bench output, one-line errors with exit code 1 that leave no partial run folder, and --resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import dynconvert
from dynconvert.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--model",
    "dit-tiny",
    "--random-init",
    "--target-flops",
    "0.5",
    "--data",
    "synthetic",
    "--steps",
    "2",
    "--set",
    "calibration.batch_size=4",
    "--set",
    "report.profile_timesteps=3",
    "--set",
    "report.profile_batch=4",
    "--set",
    "report.executed_timesteps=1",
    "--set",
    "report.bench_batch=2",
    "--set",
    "report.bench_repeats=1",
]
REPORT_KEYS = {
    "run_dir",
    "model",
    "model_class",
    "recipe",
    "target_flops",
    "steps",
    "flops_ratio",
    "flops_ratio_blocks",
    "executed_flops_ratio",
    "speedup",
    "unit",
    "static_macs",
    "dynamic_macs",
    "blocks_macs",
    "flops_ratio_per_t",
    "profile",
    "calibration",
    "bench",
    "timings",
    "files",
}


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def one_line_error(result) -> str:
    """The run failed with exit code 1 and said why in exactly one line on stderr."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One finished tiny run: (folder, report printed with --json)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs") / "tiny"
    result = invoke(
        "convert", *TINY, "--out", out, "--set", "calibration.checkpoint_every=1", "--json"
    )
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


HELP = [
    [],
    ["inspect"],
    ["convert"],
    ["sample"],
    ["bench"],
    ["recipes"],
    ["recipes", "list"],
    ["recipes", "show"],
]


@pytest.mark.parametrize("command", HELP, ids=lambda c: " ".join(c) or "root")
def test_every_help_exits_0_and_shows_an_example(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    assert (
        "Examples" in result.stdout and f"dynconvert {' '.join(command)}".strip() in result.stdout
    )


@pytest.mark.slow
def test_version_and_python_m():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"dynconvert {dynconvert.__version__}"
    proc = subprocess.run(
        [sys.executable, "-m", "dynconvert", "--version"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == f"dynconvert {dynconvert.__version__}"


def test_convert_end_to_end(tiny_run):
    out, report = tiny_run
    assert REPORT_KEYS <= set(report)
    assert report["target_flops"] == 0.5 and report["steps"] == 2 and report["unit"] == "MACs"
    assert len(report["flops_ratio_per_t"]) == 1000
    assert report["flops_ratio"] == pytest.approx(sum(report["flops_ratio_per_t"]) / 1000, abs=1e-5)
    assert 0 < report["executed_flops_ratio"] < 1.2 and report["speedup"] > 0
    assert json.loads((out / "report.json").read_text()) == report
    for name in ("model.safetensors", "dynconvert.json", "run.json", "report.json"):
        assert (out / name).is_file()
    assert list((out / "checkpoints").glob("step-*.pt"))
    model = dynconvert.load(out)
    assert dynconvert.is_converted(model)
    record = json.loads((out / "dynconvert.json").read_text())
    assert record["flops_ratio_per_t"] == report["flops_ratio_per_t"]
    assert "measured" in record["flops_ratio_note"]


def test_convert_prints_a_table_without_json(tmp_path):
    result = invoke("convert", *TINY, "--out", tmp_path / "r", "--set", "report.bench=false")
    assert result.exit_code == 0, result.output
    assert "Run report" in result.stdout and "FLOPs ratio" in result.stdout
    assert "step 2/2" in result.stderr  # progress on stderr


def test_inspect_json_has_the_documented_keys():
    result = invoke("inspect", "--model", "dit-tiny", "--json")
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    for key in (
        "static_macs",
        "blocks_macs",
        "other_macs",
        "min_budget",
        "sites",
        "skipped",
        "capture",
        "unit",
    ):
        assert key in s
    assert s["unit"] == "MACs" and 0 < s["min_budget"] < 1
    assert s["static_macs"] == pytest.approx(s["blocks_macs"] + s["other_macs"])
    kinds = {site["kind"] for site in s["sites"]}
    assert kinds == {"attention", "mlp"} and all("token_routing" in site for site in s["sites"])


@pytest.mark.slow  # builds DiT-XL/2 (4-5 s); the small presets cover inspect in the default run
def test_inspect_dit_xl_needs_no_weights():
    result = invoke("inspect", "--model", "dit-xl", "--json")
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    assert s["static_macs"] == pytest.approx(118.6e9, rel=0.01)  # DiT-XL/2 at 256 px: 118.6 GMACs
    assert len(s["sites"]) == 56 and s["blocks"] == 28


def test_inspect_table_and_run(tiny_run):
    out, _ = tiny_run
    result = invoke("inspect", "--run", out)
    assert result.exit_code == 0, result.output
    assert "blocks.0.attn" in result.stdout and "reachable budget" in result.stdout
    s = json.loads(invoke("inspect", "--run", out, "--json").stdout)
    assert s["run"]["budget"] == 0.5 and all("mean_units_on" in site for site in s["sites"])


def test_sample_writes_a_grid(tiny_run, tmp_path):
    out, _ = tiny_run
    png = tmp_path / "grid.png"
    result = invoke(
        "sample",
        "--run",
        out,
        "--out",
        png,
        "--labels",
        "1,2",
        "--steps",
        "2",
        "--compare",
        "--raw",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert png.is_file() and json.loads(result.stdout)["path"] == str(png)
    line = one_line_error(invoke("sample", "--run", out, "--out", png, "--steps", "2"))
    assert "--vae" in line  # latents need decoding


def test_bench_json_has_the_documented_keys(tiny_run, bench_keys):
    result = invoke(
        "bench", "--model", "dit-tiny", "--keep", "0.5", "--batch", "2", "--repeats", "1", "--json"
    )
    assert result.exit_code == 0, result.output
    assert bench_keys <= set(json.loads(result.stdout))
    out, _ = tiny_run
    result = invoke(
        "bench", "--run", out, "--batch", "2", "--repeats", "1", "--no-memory", "--json"
    )
    assert result.exit_code == 0, result.output
    assert bench_keys <= set(json.loads(result.stdout))
    assert "--keep" in one_line_error(invoke("bench", "--model", "dit-tiny"))


def test_recipes_list_and_show():
    result = invoke("recipes", "list", "--json")
    assert result.exit_code == 0
    names = {r["name"] for r in json.loads(result.stdout)}
    assert {
        "digits",
        "dit-xl-imagenet256",
        "dit-s",
        "dit-b",
        "uvit-imagenet256",
        "pixart-alpha",
    } <= names
    assert "dit-xl-imagenet256" in invoke("recipes", "list").stdout
    shown = invoke("recipes", "show", "dit-xl-imagenet256")
    assert shown.exit_code == 0 and "accelerate launch" in shown.stdout and "#" in shown.stdout
    resolved = json.loads(
        invoke("recipes", "show", "digits", "--json", "--set", "calibration.lr=2e-5").stdout
    )
    assert resolved["calibration"]["lr"] == 2e-5 and "ema_decay" in resolved["calibration"]
    assert "shipped recipes" in one_line_error(invoke("recipes", "show", "nope"))


BAD = {
    "unknown model": (["--model", "dit-xxl"], "Unknown model"),
    "budget 0": (["--target-flops", "0"], "(0, 1]"),
    "budget 1.5": (["--target-flops", "1.5"], "(0, 1]"),
    "budget abc": (["--target-flops", "abc"], "number"),
    "missing checkpoint": (["--checkpoint", "/no/such/file.pt"], "--checkpoint"),
    "unknown --set key": (["--set", "calibration.learning_rate=1"], "valid keys"),
    "run field in --set": (["--set", "calibration.target=0.3"], "--target-flops"),
    "bad device": (["--device", "tpu"], "--device"),
    "unreachable budget": (["--target-flops", "0.1"], "minimum"),
    "missing data": (["--data", "/no/such/latents"], "--data"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_one_line_exit_1_and_writes_nothing(name, tmp_path):
    extra, expect = BAD[name]
    out = tmp_path / "run"
    base = [a for a in TINY]
    if name == "missing checkpoint":
        base.remove("--random-init")
    if name == "unknown model":
        base[base.index("dit-tiny")] = "dit-xxl"
        extra = []
    line = one_line_error(invoke("convert", *base, *extra, "--out", out))
    assert expect in line
    assert not out.exists()


USAGE = {
    "bad option value": (["--steps", "abc"], "--steps"),
    "unknown option": (["--bogus"], "--bogus"),
}


@pytest.mark.parametrize("name", list(USAGE))
def test_bad_command_line_is_a_usage_error_exit_2_and_writes_nothing(name, tmp_path):
    """typer reports bad command-line input itself: the usage line, the option, exit code 2."""
    extra, expect = USAGE[name]
    out = tmp_path / "run"
    result = invoke("convert", *TINY, *extra, "--out", out)
    assert result.exit_code == 2, result.output
    assert "Usage: dynconvert convert" in result.stderr and expect in result.stderr
    assert "Traceback" not in result.output and not out.exists()


def test_no_command_prints_the_usage_with_exit_2():
    result = invoke()
    assert result.exit_code == 2 and "Usage: dynconvert" in result.output


def test_library_messages_name_settings_and_the_cli_names_flags(tmp_path):
    """One error in both forms: Python names (`random_init=True`) from the library, flags from
    the command line; the CLI's table maps every flag it uses to a real option."""
    from dynconvert.cli.errors import FLAGS, cli_message
    from dynconvert.errors import CheckpointError, OutputExistsError
    from dynconvert.runs import RunRequest, prepare_run, resolve_source

    with pytest.raises(CheckpointError, match="`random_init=True` to try") as info:
        resolve_source("dit-tiny")
    assert "--" not in str(info.value)
    line = one_line_error(invoke("convert", *[a for a in TINY if a != "--random-init"]))
    assert "--random-init to try" in line and "`" not in line

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    request = RunRequest(
        model="dit-tiny", target_flops=0.5, data="synthetic", random_init=True, out=str(busy)
    )
    with pytest.raises(OutputExistsError, match="choose another `out`") as info:
        prepare_run(request)
    assert "--" not in str(info.value)
    assert cli_message(str(info.value)).endswith("choose another --out")

    helps = "".join(invoke(c, "--help").stdout for c in ("convert", "sample", "bench", "export"))
    assert all(flag in helps for flag in FLAGS.values())
    assert cli_message("see `dynconvert.write_latents`") == "see `dynconvert.write_latents`"


def test_ctrl_c_is_exit_130(monkeypatch):
    import dynconvert.recipes

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(dynconvert.recipes, "shipped_recipes", interrupted)
    result = invoke("recipes", "list")
    assert result.exit_code == 130 and "Interrupted." in result.stderr


def test_cli_uses_only_typer_public_api():
    for path in (ROOT / "dynconvert" / "cli").glob("*.py"):
        text = path.read_text()
        for banned in ("import click", "from click", "typer.core", "typer._click", "cls="):
            assert banned not in text, f"{path.name} uses {banned}"


def test_bench_silences_native_stderr_but_not_python_stderr(monkeypatch, tmp_path):
    from dynconvert.cli.render import native_stderr_silenced

    with open(tmp_path / "stderr.txt", "w+") as f:
        monkeypatch.setattr(sys, "stderr", f)  # a real descriptor, as on a terminal
        with native_stderr_silenced():
            os.write(f.fileno(), b"native\n")  # what the profiler's C++ side does
            print("python", file=sys.stderr)
        assert sys.stderr is f
        os.write(f.fileno(), b"restored\n")
        f.seek(0)
        assert f.read().split() == ["python", "restored"]


def test_recipe_file_with_an_unknown_key(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(
        "name: mine\nmodel: dit-tiny\ncalibration:\n  steps: 2\n  lerning_rate: 1.0e-4\n"
    )
    out = tmp_path / "run"
    line = one_line_error(
        invoke("convert", "--recipe", recipe, "--random-init", "--data", "synthetic", "--out", out)
    )
    assert "lerning_rate" in line and "lr" in line and not out.exists()


def test_no_weights_without_hub_access_says_so(tmp_path):
    out = tmp_path / "run"
    env = {"HF_HUB_OFFLINE": "1"}
    # --force: the memory plan of DiT-XL/2 at the recipe's batch would be refused first
    line = one_line_error(
        invoke(
            "convert",
            "--model",
            "dit-xl",
            "--target-flops",
            "0.5",
            "--data",
            "synthetic",
            "--out",
            out,
            "--force",
            env=env,
        )
    )
    assert "--checkpoint" in line and "hub" in line and "--random-init" in line
    assert not out.exists()
    line = one_line_error(
        invoke("convert", "--model", "dit-s", "--data", "synthetic", "--out", out)
    )
    assert "--checkpoint" in line and not out.exists()


@pytest.mark.slow
def test_convert_from_a_diffusers_folder(tmp_path):
    from dynconvert.runs import load_run
    from dynconvert.testing import tiny_diffusers_dit

    folder = tmp_path / "transformer"
    tiny_diffusers_dit().save_pretrained(folder)
    args = [a for a in TINY if a != "--random-init"]
    args[args.index("dit-tiny")] = "dit-xl"  # a DiT from a diffusers folder (tiny here)
    out = tmp_path / "run"
    result = invoke(
        "convert",
        *args,
        "--checkpoint",
        folder,
        "--set",
        "calibration.num_workers=0",
        "--out",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["recipe"] == "dit-xl-imagenet256"
    model, info = load_run(out)  # not a preset: rebuilt from the config kept in run.json
    assert type(model).__name__ == "DiTTransformer2DModel" and info["source"]["weights"] == "folder"
    png = tmp_path / "grid.png"
    result = invoke("sample", "--run", out, "--out", png, "--steps", "2", "--compare", "--raw")
    assert result.exit_code == 0, result.output
    assert png.is_file()


def test_out_folder_with_another_run_is_refused(tiny_run, tmp_path):
    out, _ = tiny_run
    before = sorted(p.name for p in out.rglob("*"))
    other = [a if a != "0.5" else "0.7" for a in TINY]
    line = one_line_error(invoke("convert", *other, "--out", out))
    assert "another run" in line and "--out" in line and "--resume" in line
    line = one_line_error(invoke("convert", *TINY, "--out", out))  # the same, finished: refused too
    assert "finished" in line and "--out" in line
    assert sorted(p.name for p in out.rglob("*")) == before
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert "--out" in one_line_error(invoke("convert", *TINY, "--out", busy))
    assert "nothing to resume" in one_line_error(
        invoke("convert", *TINY, "--out", tmp_path / "new", "--resume")
    )


@pytest.mark.slow  # 2 s; test_reliability resumes stopped and torn runs by default
def test_resume_continues_an_interrupted_run(tmp_path, monkeypatch):
    from dynconvert.cli import render

    out = tmp_path / "run"
    args = [
        *TINY,
        "--steps",
        "4",
        "--set",
        "calibration.checkpoint_every=1",
        "--set",
        "report.bench=false",
        "--out",
        out,
    ]
    real = render.StepProgress.__call__

    def crash_at_3(self, info):
        real(self, info)
        if info.step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(render.StepProgress, "__call__", crash_at_3)
    result = invoke("convert", *args)
    assert result.exit_code == 130 and "--resume" in result.stderr
    assert (out / "checkpoints" / "step-0000003.pt").is_file() and not (
        out / "report.json"
    ).exists()
    monkeypatch.setattr(render.StepProgress, "__call__", real)
    assert "--resume" in one_line_error(
        invoke("convert", *args)
    )  # unfinished: says how to continue
    result = invoke("convert", *args, "--resume", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["steps"] == 4 and report["calibration"]["resumed_from"].endswith(
        "step-0000003.pt"
    )
    result = invoke(
        "convert", *args, "--resume", "--steps", "5", "--json"
    )  # a finished run, longer
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == 5


def test_a_crash_before_the_first_checkpoint_leaves_nothing(tmp_path, monkeypatch):
    from dynconvert.cli import render

    def crash(self, info):
        raise RuntimeError("boom")

    monkeypatch.setattr(render.StepProgress, "__call__", crash)
    out = tmp_path / "run"
    result = invoke("convert", *TINY, "--out", out)
    assert result.exit_code != 0 and isinstance(result.exception, RuntimeError)
    assert not out.exists()


def test_debug_variable_shows_the_traceback():
    result = invoke("convert", "--model", "dit-xxl", env={"DYNCONVERT_DEBUG": "1"})
    assert result.exit_code == 1 and "Traceback" in result.stderr and "Error: " in result.stderr


EXAMPLES = ["convert_and_count_diffusers.py", "calibrate_tiny.py", "export_and_sample.py"]
# Runs each example as __main__ with its own argv, in one fresh interpreter (torch and diffusers
# are imported once), and exits with the first failing script's status.
DRIVER = """
import runpy, sys, traceback
codes = {}
for script, *argv in CASES:
    sys.argv = [script, *argv]
    try:
        runpy.run_path(script, run_name="__main__")
        codes[script] = 0
    except SystemExit as e:
        codes[script] = 0 if e.code in (None, 0) else (e.code if isinstance(e.code, int) else 1)
    except BaseException:
        traceback.print_exc()
        codes[script] = 1
print("EXIT CODES", codes)
sys.exit(max(codes.values()))
"""


@pytest.mark.slow
def test_examples_run(tmp_path):
    cases = [[str(ROOT / "examples" / name)] for name in EXAMPLES]
    cases[1].append(str(tmp_path / "tiny"))
    cases[2] += ["", str(tmp_path / "grid.png")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    code = f"CASES = {cases!r}" + DRIVER
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-1000:] + proc.stderr[-3000:]
    assert "EXIT CODES" in proc.stdout and (tmp_path / "grid.png").is_file()
    assert (tmp_path / "tiny" / "model.safetensors").is_file()
