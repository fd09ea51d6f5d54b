"""The reliability catalogue (issue 13): bad input and faults, each with what must hold.

Bad input, through the command line and the Python API: exit code 1 (or one dynconvert error),
at most 3 lines of output, no traceback, and no file under the test's folder new or changed.
Faults: a run killed with SIGKILL during calibration and during a checkpoint write resumes to
the very weights of an uninterrupted run; two writers into one folder: exactly one succeeds and
the folder holds its run; the same command twice gives identical weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import dynconvert
from dynconvert.calibration.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from dynconvert.calibration.config import CalibrationConfig
from dynconvert.cli import app
from dynconvert.errors import ConfigError, DynconvertError, OutputExistsError, RecordError
from dynconvert.recipes import load_recipe
from dynconvert.runs import (
    LOCK_FILE,
    RunLock,
    RunRequest,
    convert_run,
    holder,
    load_run,
    prepare_run,
)
from dynconvert.testing import tiny_dit

pytestmark = pytest.mark.usefixtures("one_thread")

SETS = {
    "calibration.batch_size": "4", "calibration.checkpoint_every": "2",
    "report.profile_timesteps": "2", "report.profile_batch": "4", "report.executed_timesteps": "1",
    "report.bench": "false", "cpu_threads": "1",
}  # fmt: skip
BASE = ["--model", "dit-tiny", "--random-init", "--data", "synthetic", "--device", "cpu"]
TINY = [
    *BASE,
    "--target-flops",
    "0.5",
    *[a for k, v in SETS.items() for a in ("--set", f"{k}={v}")],
]
STEPS = ["--steps", "4"]


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def files(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` -> sha256 of its bytes."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def refused(result) -> str:
    """Exit code 1, at most 3 non-empty lines in all, no traceback; returns the error line."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert 1 <= len(lines) <= 3, lines
    assert "Traceback" not in result.output
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1, lines
    return errors[0]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, what: str = "") -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys(), what
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, (
        what,
        len(differ),
        differ[:6],
        [float((wa[k].float() - wb[k].float()).abs().max()) for k in differ[:6]],
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished 4-step run, and an unfinished one "killed" after step 3 (checkpoint at 2)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("reliability")
    result = invoke("convert", *TINY, *STEPS, "--out", root / "finished")
    assert result.exit_code == 0, result.output

    def stop_at_3(info):
        if info.step == 3:
            raise KeyboardInterrupt

    request = RunRequest(model="dit-tiny", target_flops=0.5, data="synthetic", steps=4,
                         random_init=True, device="cpu", out=str(root / "unfinished"),
                         overrides=[f"{k}={v}" for k, v in SETS.items()])  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        convert_run(request, on_step=stop_at_3)
    assert [s for s, _ in list_checkpoints(root / "unfinished")] == [2]
    return root


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    path.write_text(json.dumps(data))


# --- bad input through the command line ------------------------------------------------------

SET_CASES = {
    "whole float steps": ("calibration.steps=5.0", "[1, 2147483647]"),
    "whole float batch size": ("calibration.batch_size=8.0", "[1, 65536]"),
    "seed 1e30": ("calibration.seed=1e30", "[0, 4294967295]"),
    "seed past 2**64": ("calibration.seed=100000000000000000000", "[0, 4294967295]"),
    "string for a float": ("convert.tau=abc", "(0, inf)"),
    "whole float groups": ("convert.mlp_groups=2.0", "[1, 2147483647]"),
    "huge report batch": ("report.profile_batch=1e30", "[1, 65536]"),
    "float label": ("samples.labels=[1, 2.0]", "integer"),
    "adapter_args value": ("calibration.adapter_args={x: 1}", "string"),
    "cpu_threads float": ("cpu_threads=2.0", "[1, 4096]"),
    "lr out of range": ("calibration.lr=1e30", "[0, 10]"),
    "model_kwargs type": ("model_kwargs={depth: 2.0}", "model_kwargs"),
    "batch size past its range": ("calibration.batch_size=2147483647", "[1, 65536]"),
    "a grid of latents": ("samples.grid=true", "samples.grid"),
}


@pytest.mark.parametrize("name", list(SET_CASES))
def test_bad_set_values_are_one_line(name, tmp_path):
    item, expect = SET_CASES[name]
    bounded = ["--set", "calibration.steps=4"]  # a case that passed by mistake stays short
    result = invoke("convert", *TINY, *bounded, "--set", item, "--out", tmp_path / "run")
    assert expect in refused(result)
    assert files(tmp_path) == {}


def test_a_recipe_file_is_checked_field_by_field(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("name: mine\nmodel: dit-tiny\ncalibration:\n  steps: 1.0e1\n")
    before = files(tmp_path)
    line = refused(invoke("convert", *TINY, "--recipe", recipe, "--out", tmp_path / "run"))
    assert "steps must be an integer in [1, 2147483647]; got 10.0" in line
    assert files(tmp_path) == before
    recipe.write_text("name: mine\nmodel: !!python/object/apply:os.system ['touch pwned']\n")
    line = refused(invoke("convert", *TINY, "--recipe", recipe, "--out", tmp_path / "run"))
    assert "constructor" in line and not Path("pwned").exists()


@pytest.mark.parametrize("where", ["under a file", "unwritable system folder"])
def test_an_unwritable_out_is_refused_first(where, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    out = tmp_path / "file.txt" / "run" if where == "under a file" else Path("/proc/no/run")
    before = files(tmp_path)
    line = refused(invoke("convert", *TINY, "--out", out))
    assert "--out" in line and "cannot be written" in line
    assert files(tmp_path) == before


def test_an_empty_out_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default folder would be runs/ here
    assert "--out is empty" in refused(invoke("convert", *TINY, "--out", ""))
    assert files(tmp_path) == {}


def test_sample_out_is_checked_before_loading(runs, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    before = files(tmp_path)
    line = refused(
        invoke("sample", "--run", runs / "finished", "--out", tmp_path / "file.txt" / "g.png")
    )
    assert "cannot be written" in line
    assert files(tmp_path) == before


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(runs, tmp_path):
    run = copy_run(runs / "unfinished", tmp_path / "run")
    before = files(tmp_path)
    line = refused(invoke("convert", *TINY, "--steps", "1", "--resume", "--out", run))
    assert "checkpoint at step 2" in line and "--steps" in line
    assert files(tmp_path) == before


def test_resume_of_a_finished_run_needs_more_steps(runs, tmp_path):
    before = files(runs / "finished")
    line = refused(invoke("convert", *TINY, *STEPS, "--resume", "--out", runs / "finished"))
    assert "finished 4 steps" in line
    assert files(runs / "finished") == before


def _checkpoint_without_config(path: Path) -> None:
    payload = load_checkpoint(path)
    del payload["config"]
    save_checkpoint(path, payload)


def _checkpoint_with_other_optimizer(path: Path) -> None:
    payload = load_checkpoint(path)
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3, 5))])
    other.zero_grad()
    payload["optimizer"] = other.state_dict()
    save_checkpoint(path, payload)


def _step_4(path: Path) -> Path:
    return path / "checkpoints" / "step-0000004.pt"


def _run_version(path: Path) -> None:
    edit_json(path / "run.json", version=99)


def _run_status(path: Path) -> None:
    edit_json(path / "run.json", status="paused")


FOLDER_CASES = {
    "checkpoint without config": (
        lambda p: _checkpoint_without_config(_step_4(p)), "lacks 'config'"
    ),
    "another model's optimizer": (
        lambda p: _checkpoint_with_other_optimizer(_step_4(p)), "optimizer state"
    ),
    "newer run-folder version": (_run_version, "version 99"),
    "unknown run status": (_run_status, "status"),
    "run.json source not a mapping": (lambda p: edit_json(p / "run.json", source="x"), "source"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(FOLDER_CASES))
def test_a_failed_resume_leaves_the_folder_as_it_was(name, runs, tmp_path):
    """Resuming the finished run to 6 steps: refused, and run.json still says "finished"."""
    spoil, expect = FOLDER_CASES[name]
    run = copy_run(runs / "finished", tmp_path / "run")
    spoil(run)
    before = files(tmp_path)
    line = refused(invoke("convert", *TINY, "--steps", "6", "--resume", "--out", run))
    assert expect in line
    assert files(tmp_path) == before
    assert json.loads((run / "run.json").read_text()).get("status") in ("finished", "paused")


def _record(path: Path, **changes) -> None:
    edit_json(path / "dynconvert.json", **changes)


RECORD_CASES = {
    "budget string": ({"budget": "abc"}, "budget"),
    "short always_on": ({"always_on": [0]}, "always-on units"),
    "weights outside the folder": ({"weights__file": "../model.safetensors"}, "inside the folder"),
    "newer format": ({"format_version": 99}, "newer"),
    "newer plan": ({"plan__version": 99}, "plan version 99"),
    "weights bytes string": ({"weights__bytes": "12"}, "weights.bytes"),
    "preset_kwargs of the wrong type": ({"preset_kwargs": {"depth": "x"}}, "cannot rebuild"),
    "alias to a missing weight": ({"aliases": {"a": "nope"}}, "lack"),
}


@pytest.mark.parametrize("name", list(RECORD_CASES))
def test_bad_records_are_refused_by_load_and_sample(name, runs, tmp_path):
    changes, expect = RECORD_CASES[name]
    run = copy_run(runs / "finished", tmp_path / "run")
    _record(run, **changes)
    before = files(tmp_path)
    with pytest.raises(RecordError) as err:
        load_run(run)
    assert expect in str(err.value)
    line = refused(invoke("sample", "--run", run, "--out", tmp_path / "grid.png", "--steps", "1"))
    assert expect in line
    assert files(tmp_path) == before


# --- bad input through the Python API --------------------------------------------------------


def test_api_integer_fields_take_5_and_refuse_5_0_and_1e30(tmp_path):
    assert CalibrationConfig(target=0.5, steps=5).steps == 5
    for bad in (5.0, 1e30, "5", True, 2**40):
        with pytest.raises(ConfigError, match=r"steps must be an integer in \[1, 2147483647\]"):
            CalibrationConfig(target=0.5, steps=bad)
    with pytest.raises(ConfigError, match=r"seed must be an integer in \[0, 4294967295\]"):
        dynconvert.convert(tiny_dit(), 0.5, seed=1e30)
    with pytest.raises(ConfigError, match="mlp_groups"):
        dynconvert.ConvertConfig(mlp_groups=2.0)
    with pytest.raises(ConfigError, match="steps"):
        load_recipe("digits", ["calibration.steps=5.0"])
    request = RunRequest(model="dit-tiny", data="synthetic", random_init=True, steps=5.0,
                         out=str(tmp_path / "run"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"`steps` must be an integer in \[1, 2147483647\]"):
        prepare_run(request)
    assert files(tmp_path) == {}


# --- the lock ----------------------------------------------------------------------------------


def test_a_locked_folder_is_refused_at_once_naming_the_holder(runs, tmp_path):
    run = copy_run(runs / "unfinished", tmp_path / "run")
    empty = tmp_path / "empty"
    empty.mkdir()
    with RunLock(run), RunLock(empty):
        assert holder(run) == os.getpid()
        with pytest.raises(OutputExistsError, match=f"PID {os.getpid()}"):
            RunLock(run).acquire()
        before = files(tmp_path)
        line = refused(invoke("convert", *TINY, *STEPS, "--resume", "--out", run))
        assert f"PID {os.getpid()}" in line and "in use" in line
        line = refused(invoke("convert", *TINY, *STEPS, "--out", empty))
        assert f"PID {os.getpid()}" in line
        assert files(tmp_path) == before
    assert holder(run) is None and not (run / LOCK_FILE).exists()


def test_a_failed_fresh_run_removes_only_what_it_wrote(tmp_path, monkeypatch):
    from dynconvert.cli import render

    def crash(self, info):
        raise RuntimeError("boom")

    monkeypatch.setattr(render.StepProgress, "__call__", crash)
    out = tmp_path / "mine"
    out.mkdir()  # the user made the folder: it stays, empty
    result = invoke("convert", *TINY, *STEPS, "--out", out)
    assert isinstance(result.exception, RuntimeError)
    assert out.is_dir() and list(out.iterdir()) == []


def test_sigterm_runs_the_cleanup(tmp_path, monkeypatch):
    import signal

    from dynconvert.cli import render

    def terminate(self, info):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(render.StepProgress, "__call__", terminate)
    out = tmp_path / "run"
    result = invoke("convert", *TINY, *STEPS, "--out", out)
    assert result.exit_code == 143 and not out.exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_weights_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    """The weights are staged beside the old save and fsynced, the record that names them is
    the commit point, then they are renamed into place (io/commit.py)."""
    from dynconvert.io import files as iofiles

    model = dynconvert.convert(tiny_dit(), 0.5)
    calls = []
    monkeypatch.setattr(iofiles, "fault_hook", lambda op, path: calls.append((op, path.name)))
    dynconvert.save(model, tmp_path)
    staged = calls[0][1]
    assert staged.startswith(".model.safetensors.") and staged.endswith(".next")
    write = ["create", "write", "fsync", "rename"]
    assert calls == [
        *[(op, staged) for op in write],
        *[(op, "dynconvert.json") for op in write],  # the commit
        ("rename", "model.safetensors"),
        *[(op, "dynconvert.json") for op in write],  # the record without its staged names
    ]


# --- faults: kills, two writers, the same command twice ----------------------------------------

KILLED = textwrap.dedent(
    """
    import os, sys
    import torch
    from dynconvert.calibration import checkpoint
    from dynconvert.runs import RunRequest, convert_run
    torch.set_num_threads(1)
    out, when, sets = sys.argv[1], sys.argv[2], sys.argv[3:]
    real_save = torch.save

    def save(obj, f, *a, **k):  # a kill while step 4's checkpoint is half written
        if obj.get("step") == 4:
            f.write(b"half a checkpoint"); f.flush()
            os.kill(os.getpid(), 9)
        real_save(obj, f, *a, **k)

    def on_step(info):  # a kill during calibration, after step 3 (checkpoint at step 2)
        if when == "calibration" and info.step == 3:
            os.kill(os.getpid(), 9)

    checkpoint.torch.save = save if when == "write" else real_save
    convert_run(RunRequest(model="dit-tiny", target_flops=float(sets.pop(0)), data="synthetic",
                           steps=4, random_init=True, device="cpu", out=out, overrides=sets),
                on_step=on_step)
    """
)


def _start(out: Path, when: str, target: str = "0.5") -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    sets = [f"{k}={v}" for k, v in SETS.items()]
    return subprocess.Popen(
        [sys.executable, "-c", KILLED, str(out), when, target, *sets],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_the_same_command_twice_gives_identical_weights(runs, tmp_path):
    torch.manual_seed(1234)  # another global RNG state: nothing may depend on it
    result = invoke("convert", *TINY, *STEPS, "--out", tmp_path / "again")
    assert result.exit_code == 0, result.output
    assert_same_weights(runs / "finished", tmp_path / "again")


def test_a_stopped_run_resumes_to_the_uninterrupted_weights(runs, tmp_path):
    """The unfinished run stopped after step 3 (checkpoint at 2): resumed, it is the finished."""
    run = copy_run(runs / "unfinished", tmp_path / "run")
    result = invoke("convert", *TINY, *STEPS, "--resume", "--out", run)
    assert result.exit_code == 0, result.output
    assert_same_weights(runs / "finished", run)


def test_a_torn_write_is_cleaned_up_and_resumes_exactly(runs, tmp_path):
    """What a kill during a write leaves (temp files of a dead writer) goes on the next start."""
    run = copy_run(runs / "unfinished", tmp_path / "run")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])  # its PID has ended
    dead.wait()
    torn = [
        run / "checkpoints" / f".step-0000004.pt.{dead.pid}.tmp",
        run / ".model.safetensors.x1.tmp",
    ]
    for p in torn:
        p.write_bytes(b"half a file")
    (run / LOCK_FILE).write_text(f"{dead.pid}\n")  # a lock file a killed run left: not held
    result = invoke("convert", *TINY, *STEPS, "--resume", "--out", run)
    assert result.exit_code == 0, result.output
    assert not any(p.exists() for p in torn) and not (run / LOCK_FILE).exists()
    assert_same_weights(runs / "finished", run)


HOLD = "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); " \
    "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); " \
    "print('locked', flush=True); sys.stdin.read()"  # fmt: skip


def test_a_folder_another_process_locked_is_refused(runs, tmp_path):
    run = copy_run(runs / "unfinished", tmp_path / "run")
    other = subprocess.Popen([sys.executable, "-c", HOLD, str(run / LOCK_FILE)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert other.stdout.readline().strip() == "locked"
        before = files(tmp_path)
        line = refused(invoke("convert", *TINY, *STEPS, "--resume", "--out", run))
        assert f"PID {other.pid}" in line
        assert files(tmp_path) == before
    finally:
        other.communicate("")
    result = invoke("convert", *TINY, *STEPS, "--resume", "--out", run)  # free again: resumes
    assert result.exit_code == 0, result.output


@pytest.mark.slow
# Failed once on 2026-12-07 (resumed weights differed); not reproduced since: three runs on
# 2026-12-08 passed, and a kill at each file operation of a run resumes exactly
# (test_reliability_kills.py). A failure names the run and the tensors that differ.
def test_kill_9_then_resume_and_two_writers_at_once(runs, tmp_path):
    """Real processes: SIGKILL during calibration and during a checkpoint write, then resume:
    the weights of the uninterrupted run. Two writers at once: exactly one succeeds and the
    folder holds its run."""
    procs = {
        "calibration": _start(tmp_path / "killed", "calibration"),
        "write": _start(tmp_path / "torn", "write"),
        "writer 0.5": _start(tmp_path / "shared", "none", "0.5"),
        "writer 0.7": _start(tmp_path / "shared", "none", "0.7"),
    }
    done = {name: (p.wait(timeout=600), p.stderr.read()) for name, p in procs.items()}

    assert done["calibration"][0] == -9 and done["write"][0] == -9, done
    torn = tmp_path / "torn" / "checkpoints"
    assert [p.name for p in torn.glob(".*.tmp")], "the kill left a half-written temp file"
    for name in ("killed", "torn"):
        assert [s for s, _ in list_checkpoints(tmp_path / name)] == [2]
        result = invoke("convert", *TINY, *STEPS, "--resume", "--out", tmp_path / name)
        assert result.exit_code == 0, (name, result.output)
        assert_same_weights(runs / "finished", tmp_path / name, name)
    assert not list(torn.glob(".*.tmp"))  # removed on the next start

    codes = sorted((done[w][0], w) for w in ("writer 0.5", "writer 0.7"))
    assert [c for c, _ in codes] == [0, 1], done
    winner, loser = codes[0][1], codes[1][1]
    assert "in use" in done[loser][1] or "another run" in done[loser][1], done[loser][1]
    target = float(winner.split()[-1])
    shared = tmp_path / "shared"
    assert json.loads((shared / "run.json").read_text())["identity"]["target_flops"] == target
    assert json.loads((shared / "report.json").read_text())["target_flops"] == target
    assert json.loads((shared / "dynconvert.json").read_text())["budget"] == target
    assert not (shared / LOCK_FILE).exists()


def test_convert_seed_gives_identical_routers_whatever_the_global_rng():
    def routers(global_seed: int, seed: int = 0) -> dict[str, torch.Tensor]:
        model = tiny_dit()
        torch.manual_seed(global_seed)
        state = dynconvert.convert(model, 0.5, seed=seed).state_dict()
        return {k: v for k, v in state.items() if k.startswith("dynconvert.")}

    a, b, c = routers(1), routers(2), routers(1, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_every_catalogue_error_is_a_dynconvert_error():
    """The CLI's one-line guarantee rests on this: the cases above raise DynconvertError."""
    with pytest.raises(DynconvertError):
        CalibrationConfig(target=0.5, batch_size=8.0)
