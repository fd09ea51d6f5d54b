"""The reliability catalogue, second round (issue 23): files and folders.

Links: nothing is read, written, truncated or deleted through a link inside a folder
dynconvert reads or writes (lock, checkpoints, weights, record, temp files), and a pipe in a
file's place is refused at once. Re-saving is all or nothing: a save stopped at each of its
file operations leaves the old save or the new one loading. Faults (a read-only folder, a full
disk, a file where a folder belongs, a dangling ``--out`` link, a batch of 0) are one error, exit
code 1 on the command line, and lose nothing.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from test_reliability import SETS, TINY, files, invoke, refused

import dynconvert
from dynconvert.calibration.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    remove_stale_temps,
    save_checkpoint,
)
from dynconvert.errors import DynconvertError, FileError, RecordError
from dynconvert.io import files as iofiles
from dynconvert.runs import LOCK_FILE, RunLock
from dynconvert.testing import tiny_dit

pytestmark = pytest.mark.usefixtures("one_thread")


def converted(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return dynconvert.convert(tiny_dit(seed=seed), 0.5, seed=seed).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two converted tiny DiTs with different weights, one saved; inputs and their outputs."""
    torch.set_num_threads(1)
    a, b = converted(0), converted(1)
    inputs = tiny_dit().example_inputs(batch_size=2)
    folder = tmp_path_factory.mktemp("saved") / "a"
    dynconvert.save(a, folder)
    with torch.no_grad():
        return {"folder": folder, "a": a, "b": b, "inputs": inputs,
                "out_a": a(*inputs), "out_b": b(*inputs)}  # fmt: skip


def output(folder: Path, inputs) -> torch.Tensor:
    with torch.no_grad():
        return dynconvert.load(folder)(*inputs)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- links --------------------------------------------------------------------------------


def test_a_planted_lock_link_or_hard_link_is_refused_and_its_target_kept(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file\n")
    for kind in ("symlink", "hard link"):
        out = tmp_path / kind.replace(" ", "-")
        out.mkdir()
        (os.symlink if kind == "symlink" else os.link)(victim, out / LOCK_FILE)
        with pytest.raises(FileError, match="link"):
            RunLock(out).acquire()
        line = refused(invoke("convert", *TINY, "--steps", "2", "--out", out))
        assert "link" in line
        assert victim.read_text() == "the user's file\n"


def test_a_checkpoints_link_is_never_read_written_or_pruned_through(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for step in (1, 2, 3):
        save_checkpoint(elsewhere / f"step-{step:07d}.pt", {"step": step})
    (elsewhere / ".step-0000009.pt.1.tmp").write_bytes(b"someone's file")
    before = files(elsewhere)
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    for act in (
        lambda: list_checkpoints(run),
        lambda: prune_checkpoints(run, keep=1),
        lambda: remove_stale_temps(run),
        lambda: save_checkpoint(run / "checkpoints" / "step-0000004.pt", {"step": 4}),
        lambda: load_checkpoint(run / "checkpoints" / "step-0000001.pt"),
    ):
        with pytest.raises(DynconvertError, match="link"):
            act()
    line = refused(invoke("convert", *TINY, "--steps", "4", "--resume", "--out", run))
    assert "link" in line
    assert files(elsewhere) == before


def test_a_checkpoint_linked_out_of_the_folder_is_not_loaded(tmp_path):
    outside = save_checkpoint(tmp_path / "outside.pt", {"step": 1})
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "step-0000001.pt").symlink_to(outside)
    with pytest.raises(DynconvertError, match="link"):
        load_checkpoint(folder / "step-0000001.pt")


@pytest.mark.parametrize("entry", ["model.safetensors", "dynconvert.json"])
def test_weights_or_record_reached_through_a_link_are_refused(entry, models, tmp_path):
    run = shutil.copytree(models["folder"], tmp_path / "run")
    outside = tmp_path / f"outside-{entry}"
    (run / entry).rename(outside)
    (run / entry).symlink_to(outside)
    before = files(tmp_path)
    with pytest.raises(RecordError, match="link"):
        dynconvert.load(run)
    line = refused(invoke("sample", "--run", run, "--out", tmp_path / "g.png", "--steps", "1"))
    assert "link" in line
    assert files(tmp_path) == before


@pytest.mark.parametrize("entry", ["dynconvert.json", "model.safetensors"])
def test_a_pipe_in_a_files_place_is_refused_at_once(entry, models, tmp_path):
    run = shutil.copytree(models["folder"], tmp_path / "run")
    (run / entry).unlink()
    os.mkfifo(run / entry)
    done: list[BaseException] = []
    worker = threading.Thread(target=lambda: _catch(done, lambda: dynconvert.load(run)))
    worker.start()
    worker.join(timeout=60)  # a reader blocked on the pipe would never return
    if worker.is_alive():
        os.open(run / entry, os.O_WRONLY | os.O_NONBLOCK)  # release it before failing
        pytest.fail("load waited on a pipe")
    assert isinstance(done[0], RecordError) and "regular file" in str(done[0])


def _catch(into: list, fn) -> None:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - handed to the test
        into.append(e)


def test_saving_over_links_replaces_them_and_leaves_their_targets(models, tmp_path):
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("model.safetensors", "dynconvert.json"):
        (out / name).symlink_to(victim)
    dynconvert.save(models["a"], out)
    assert victim.read_bytes() == b"precious"
    assert not any((out / n).is_symlink() for n in ("model.safetensors", "dynconvert.json"))
    torch.testing.assert_close(output(out, models["inputs"]), models["out_a"], atol=0, rtol=0)


def test_stale_temp_cleanup_removes_a_link_itself_never_its_target(tmp_path):
    from dynconvert.runs.folder import remove_stale_temps as remove_run_temps

    victim = tmp_path / "victim.txt"
    victim.write_text("kept")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".model.safetensors.1.tmp").symlink_to(victim)
    (run / "checkpoints" / ".step-0000001.pt.1.tmp").symlink_to(victim)
    removed = remove_run_temps(run)
    assert len(removed) == 2 and victim.read_text() == "kept"


# --- atomic re-save -----------------------------------------------------------------------


class Killed(BaseException):
    """A writer stopped at a file operation (after it, nothing more happens)."""


def test_a_resave_stopped_at_any_file_operation_leaves_one_of_the_two_saves(
    models, tmp_path, monkeypatch
):
    ops: list[tuple[str, str]] = []
    monkeypatch.setattr(iofiles, "fault_hook", lambda op, path: ops.append((op, path.name)))
    dynconvert.save(models["b"], shutil.copytree(models["folder"], tmp_path / "count"))
    assert len(ops) >= 10, ops  # staged writes, the commit, the renames, the second record
    versions = {"a": 0, "b": 0}
    for stop in range(len(ops)):
        folder = shutil.copytree(models["folder"], tmp_path / f"stop-{stop}")
        seen: list[int] = []

        def hook(op, path, stop=stop, seen=seen):
            seen.append(1)
            if len(seen) > stop:
                raise Killed(f"{op} {path.name}")

        monkeypatch.setattr(iofiles, "fault_hook", hook)
        with pytest.raises(Killed):
            dynconvert.save(models["b"], folder)
        monkeypatch.setattr(iofiles, "fault_hook", None)
        got = output(folder, models["inputs"])
        which = "a" if torch.equal(got, models["out_a"]) else "b"
        assert torch.equal(got, models[f"out_{which}"]), (stop, ops[stop])
        versions[which] += 1
        dynconvert.save(models["b"], folder)  # the next save recovers and tidies up
        assert sorted(p.name for p in folder.iterdir()) == ["dynconvert.json", "model.safetensors"]
        assert torch.equal(output(folder, models["inputs"]), models["out_b"])
    assert versions["a"] and versions["b"], versions  # both sides of the commit were stopped


# --- faults -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault", [errno.ENOSPC, errno.EROFS, errno.EFBIG], ids=["full", "read-only", "past ulimit"]
)
def test_a_write_fault_mid_run_is_one_line_and_loses_no_checkpoint(fault, tmp_path, monkeypatch):
    """The run folder becomes full or read-only at the checkpoint after step 2 of 4."""

    def hook(op, path):
        if op == "create" and path.name == "step-0000004.pt":
            raise OSError(fault, os.strerror(fault))

    out = tmp_path / "run"
    monkeypatch.setattr(iofiles, "fault_hook", hook)
    line = one_error(invoke("convert", *TINY, "--steps", "4", "--out", out))
    assert "cannot write" in line and "step-0000004.pt" in line
    assert [s for s, _ in list_checkpoints(out)] == [2]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.setattr(iofiles, "fault_hook", None)
    result = invoke("convert", *TINY, "--steps", "4", "--resume", "--out", out)
    assert result.exit_code == 0, result.output


def one_error(result) -> str:
    """A run stopped on the way: exit code 1, its progress lines, then one error, no traceback."""
    assert result.exit_code == 1, (result.output, result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


def test_save_to_a_file_or_under_one_is_one_error(models, tmp_path):
    (tmp_path / "file").write_text("x")
    for target in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(FileError, match="file"):
            dynconvert.save(models["a"], target)
    assert files(tmp_path) == {"file": hashlib.sha256(b"x").hexdigest()}


def test_a_dangling_out_link_is_one_line(tmp_path):
    (tmp_path / "out").symlink_to(tmp_path / "missing")
    line = refused(invoke("convert", *TINY, "--steps", "2", "--out", tmp_path / "out"))
    assert "link to a missing folder" in line
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_batch_of_0_runs_as_in_the_original(mode):
    original = tiny_dit().eval()
    args = [a[:0] for a in original.example_inputs(batch_size=2)]
    model = getattr(dynconvert.convert(tiny_dit(), 0.5), mode)()
    expected = original(*args)
    got = model(*args)
    assert got.shape == expected.shape == (0, *expected.shape[1:])


ULIMIT = """
import sys
from dynconvert.cli import app
sys.argv = ["dynconvert", *sys.argv[1:]]
app()
"""


@pytest.mark.slow  # a real process under `ulimit -f`: the kernel refuses the checkpoint write
def test_a_file_size_limit_is_one_line_in_a_real_process(tmp_path):
    out = tmp_path / "run"
    sets = [a for k, v in SETS.items() for a in ("--set", f"{k}={v}")]
    args = ["convert", "--model", "dit-tiny", "--random-init", "--data", "synthetic",
            "--device", "cpu", "--target-flops", "0.5", "--steps", "4", *sets,
            "--out", str(out)]  # fmt: skip
    cmd = f"ulimit -f 400; exec {sys.executable} -c '{ULIMIT}' " + " ".join(args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "file size limit" in lines[0]
    assert not out.exists()  # a fresh run that stopped before its first checkpoint: all undone
