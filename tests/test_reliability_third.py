"""The reliability catalogue, third round (issue 23): cases the first two rounds did not write.

A record's timestep convention is checked against the model (its forward signature, the
convention known for its class, what analysis derives from a preset's example inputs): a
record that names another argument, scale or direction is refused. Then crafted folders per
class of the issue: values JSON allows but a record must not hold (NaN, infinities, negative
or huge numbers, wrong types), links and odd files where a record or weights belong, weights
headers that lie, names of code. Each is refused with one line (exit code 1 from ``sample
--run``) in under a CPU second, and nothing is written.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest
import torch
from test_reliability import files, invoke, refused
from test_reliability_records import copy, saved  # noqa: F401 (the module's saved run)

import dynconvert
from dynconvert.errors import DynconvertError, RecordError
from dynconvert.runs import load_run
from dynconvert.testing import tiny_dit

pytestmark = pytest.mark.usefixtures("one_thread")


def edit_record(run: Path, change) -> None:
    record = json.loads((run / "dynconvert.json").read_text())
    change(record)
    (run / "dynconvert.json").write_text(json.dumps(record))


def refused_fast(run: Path, tmp_path: Path, expect: str) -> float:
    """load_run and ``sample --run`` refuse ``run`` in one line naming ``expect``; returns the
    CPU seconds load_run took."""
    before = files(tmp_path)
    t0 = time.process_time()
    with pytest.raises(DynconvertError) as err:
        load_run(run)
    cpu = time.process_time() - t0
    message = str(err.value)
    assert expect in message and "\n" not in message and len(message) < 600, message
    assert cpu < 1.0, cpu
    line = refused(invoke("sample", "--run", run, "--out", tmp_path / "g.png", "--steps", "1"))
    assert expect in line
    assert files(tmp_path) == before
    return cpu


# --- the timestep convention ----------------------------------------------------------------


def _plan(**values):
    return lambda record: record["plan"].update(values)


def _config(**values):
    return lambda record: record["config"].update(values)


CONVENTIONS = {
    "class labels read as t": (_plan(timestep_arg="y"), "argument 'y'"),
    "the input read as t": (_plan(timestep_arg="x"), "argument 'x'"),
    "an argument it lacks": (_plan(timestep_arg="sigma"), "argument 'sigma'"),
    "t x 1000": (_plan(timestep_scale=1000.0), "t x 1000"),
    "reversed": (_plan(timestep_reverse=True), "reversed"),
    "the config's scale": (_config(timestep_scale=0.5), "t x 0.5"),
    "the config's direction": (_config(timestep_reverse=True), "reversed"),
    "the config's argument": (_config(timestep_arg="y"), "argument 't'"),
}


@pytest.mark.parametrize("name", list(CONVENTIONS))
def test_a_record_with_another_timestep_convention_is_refused(name, saved, tmp_path):  # noqa: F811
    run = copy(saved, tmp_path)
    change, expect = CONVENTIONS[name]
    edit_record(run, change)
    refused_fast(run, tmp_path, expect)


def test_a_convention_set_at_convert_loads_when_stated_again(tmp_path):
    cfg = dynconvert.ConvertConfig(timestep_scale=2.0, timestep_reverse=True)
    model = dynconvert.convert(tiny_dit(), 0.5, config=cfg, seed=0)
    dynconvert.save(model, tmp_path / "m")
    with pytest.raises(RecordError, match="timestep_scale= and timestep_reverse= to load"):
        dynconvert.load(tmp_path / "m")
    with pytest.raises(RecordError, match="passed to load"):
        dynconvert.load(tmp_path / "m", timestep_scale=2.0, timestep_reverse=False)
    loaded = dynconvert.load(tmp_path / "m", timestep_scale=2.0, timestep_reverse=True)
    inputs = tiny_dit().example_inputs(batch_size=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs), model.eval()(*inputs))


class NoiseNet(torch.nn.Module):
    """Another codebase's model: its own names, a timestep argument called ``noise_sigma``."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(1, 32)
        self.qkv = torch.nn.Linear(32, 96)
        self.proj = torch.nn.Linear(32, 32)
        self.up = torch.nn.Linear(32, 64)
        self.down = torch.nn.Linear(64, 32)

    def forward(self, tokens, noise_sigma):
        h = tokens + self.embed(noise_sigma[:, None, None].float())
        b, n, _ = h.shape
        q, k, v = self.qkv(h).reshape(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1) @ v
        h = h + self.proj(att.transpose(1, 2).reshape(b, n, 32))
        return h + self.down(torch.relu(self.up(h)))


@pytest.mark.parametrize("scale, loads", [(1.0, True), (1000.0, True), (7.0, False)])
def test_a_class_without_a_known_convention_loads_only_an_inferred_one(scale, loads, tmp_path):
    torch.manual_seed(0)
    inputs = (torch.randn(2, 6, 32), torch.tensor([0.25, 0.5]))
    model = dynconvert.convert(NoiseNet(), 0.5, example_inputs=inputs, seed=0)
    assert dynconvert.get_state(model).plan.timestep_scale == 1000.0  # sigma, inferred
    dynconvert.save(model, tmp_path / "m")
    edit_record(tmp_path / "m", _plan(timestep_scale=scale))
    if loads:
        dynconvert.load(tmp_path / "m", NoiseNet())
    else:
        with pytest.raises(RecordError, match="t x 7, but NoiseNet takes DDPM"):
            dynconvert.load(tmp_path / "m", NoiseNet())
