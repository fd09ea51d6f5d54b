"""LoRA adapters in a saved folder (issue 21): inside the save's all-or-nothing guarantee, and
a run calibrated with ``trainable=lora`` loads and samples where peft cannot be imported."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dynconvert
from dynconvert.errors import RecordError
from dynconvert.io import files as iofiles
from dynconvert.testing import tiny_dit

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")


class Stopped(BaseException):
    """The save was stopped at a file operation (nothing after it ran)."""


def with_adapters(seed: int, names: list[str]) -> torch.nn.Module:
    """A converted tiny DiT (weights from ``seed``) carrying LoRA adapters ``names``."""
    torch.manual_seed(seed)
    model = dynconvert.convert(tiny_dit(seed=seed), 0.5, seed=seed).eval()
    for i, name in enumerate(names):
        torch.manual_seed(seed * 10 + i)
        cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["qkv", "fc1"],
                              init_lora_weights=False)  # fmt: skip
        peft.inject_adapter_in_model(cfg, model, adapter_name=name)
    return model


def forward(model, inputs):
    with torch.no_grad():
        return model(*inputs)


@pytest.mark.slow  # about 40 save + load rounds of a tiny DiT: 15 s of CPU
def test_a_resave_with_adapters_stopped_anywhere_leaves_one_of_the_two_saves(tmp_path, monkeypatch):
    # The old save keeps one adapter in the folder itself; the new one two, in subfolders.
    old, new = with_adapters(0, ["a"]), with_adapters(1, ["b", "c"])
    inputs = tiny_dit().example_inputs(batch_size=2)
    expected = {"old": forward(old, inputs), "new": forward(new, inputs)}
    first = dynconvert.save(old, tmp_path / "first")
    ops: list[tuple[str, str]] = []
    monkeypatch.setattr(iofiles, "fault_hook", lambda op, path: ops.append((op, str(path))))
    dynconvert.save(new, shutil.copytree(first, tmp_path / "count"))
    assert sum("adapter_model" in p for _, p in ops) >= 8, ops  # staged, renamed, per adapter
    seen = {"old": 0, "new": 0}
    for stop in range(len(ops)):
        folder = shutil.copytree(first, tmp_path / f"stop-{stop}")
        count = iter(range(stop))  # the operation numbered stop raises

        def hook(op, path, count=count):
            if next(count, None) is None:
                raise Stopped(f"{op} {path}")

        monkeypatch.setattr(iofiles, "fault_hook", hook)
        with pytest.raises(Stopped):
            dynconvert.save(new, folder)
        monkeypatch.setattr(iofiles, "fault_hook", None)
        got = forward(dynconvert.load(folder), inputs)
        which = min(expected, key=lambda k: float((got - expected[k]).abs().max()))
        torch.testing.assert_close(got, expected[which], atol=1e-6, rtol=1e-6, msg=str(ops[stop]))
        seen[which] += 1
        dynconvert.save(new, folder)  # the next save completes and tidies up
        assert not [p for p in folder.rglob(".*")], (stop, list(folder.rglob(".*")))
        torch.testing.assert_close(forward(dynconvert.load(folder), inputs), expected["new"])
    assert seen["old"] and seen["new"], seen  # stopped on both sides of the commit


def test_two_adapters_load_from_their_subfolders_and_a_record_cannot_point_outside(tmp_path):
    model = with_adapters(0, ["a", "b"])
    inputs = tiny_dit().example_inputs(batch_size=2)
    out = dynconvert.save(model, tmp_path / "m")
    assert (
        sorted(p.name for p in out.glob("*/adapter_model.safetensors"))
        == ["adapter_model.safetensors"] * 2
    )
    torch.testing.assert_close(forward(dynconvert.load(out), inputs), forward(model, inputs))
    record = json.loads((out / "dynconvert.json").read_text())
    record["lora"]["adapters"]["a"]["folder"] = "../m/a"
    (out / "dynconvert.json").write_text(json.dumps(record))
    with pytest.raises(RecordError, match="no folder inside it for the LoRA adapter 'a'"):
        dynconvert.load(out)


SAMPLE_WITHOUT_PEFT = """
import sys
sys.modules["peft"] = None  # import peft raises ImportError, as when it is not installed
from dynconvert.cli.app import main
sys.argv = ["dynconvert", "sample", "--run", sys.argv[1], "--out", sys.argv[2], "--steps", "2"]
main()
"""


@pytest.mark.slow  # a short digits run with trainable=lora, then sampling: about 60 s of CPU
def test_a_lora_run_loads_and_samples_without_peft(tmp_path):
    run = tmp_path / "run"
    convert = [sys.executable, "-m", "dynconvert", "convert", "--model", "digits", "--target-flops",
               "0.5", "--steps", "4", "--out", str(run), "--set", "calibration.trainable=lora",
               "--set", "report.bench=false", "--set", "evaluate.per_class=2"]  # fmt: skip
    done = subprocess.run(convert, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert not any(run.glob("**/adapter_model.safetensors"))  # merged: nothing for peft
    grid = tmp_path / "grid.png"
    cmd = [sys.executable, "-c", SAMPLE_WITHOUT_PEFT, str(run), str(grid)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=Path.cwd())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert grid.is_file() and grid.stat().st_size > 0
