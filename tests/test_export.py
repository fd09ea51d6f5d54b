"""dynconvert.export: programs per width pattern that reproduce the planned path with torch alone.

Every check of an export runs the folder in a subprocess where ``import dynconvert`` fails
(tests/exported_runner.py) over the whole schedule, against the planned path run eagerly here.
The default suite exports the tiny DiT to pt2 (one program per pattern, token gather at a
capacity that overflows); the slow set adds AOTInductor, ONNX, the digits run folder through the
CLI (and a DDIM run from the export), and tiny PixArt, SD3 and Flux.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dynconvert
from dynconvert.deploy.program import main_output
from dynconvert.deploy.schedule import inputs_at, with_t
from dynconvert.runtime.planned.controls import (
    configure_planned,
    set_token_capacity,
    token_overflow,
)
from dynconvert.runtime.routing import routing
from dynconvert.runtime.state import get_state
from dynconvert.testing import randomize_routing, tiny_dit

RUNNER = Path(__file__).with_name("exported_runner.py")
TOL = {"pt2": 1e-5, "aoti": 1e-4, "onnx": 1e-4}


def references(model, timesteps, batches, example_inputs=None):
    """[(call, planned output)] over the schedule and batches, and the overflow they counted."""
    name = get_state(model).plan.timestep_arg
    cases = []
    model.eval()
    with routing(model, "eval", "planned"), torch.no_grad():
        token_overflow(model)
        for b in batches:
            named = inputs_at(model, b, example_inputs)
            for t in timesteps:
                call = with_t(named, name, t)
                cases.append((call, main_output(model(**call)).clone()))
        overflow = token_overflow(model)
    return cases, (overflow.dropped, overflow.wanted)


def run_standalone(folder, cases, tmp_path):
    """Run the export in a subprocess with dynconvert blocked; its result dict."""
    torch.save(cases, tmp_path / "cases.pt")
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(RUNNER), str(folder), str(tmp_path / "cases.pt"), str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dynconvert_blocked"] and result["modules"] == []
    return result


def check_export(model, tmp_path, fmt="pt2", timesteps=(999.0, 998.0, 500.0, 499.0), batch=2,
                 example_inputs=None, check=True):  # fmt: skip
    """Export, then compare the standalone folder with the planned path over the schedule."""
    batches = [batch] if isinstance(batch, int) else list(batch)
    cases, overflow = references(model, list(timesteps), batches, example_inputs)
    result = dynconvert.export(model, tmp_path / "export", format=fmt, timesteps=list(timesteps),
                               batch=batch, example_inputs=example_inputs, check=check)  # fmt: skip
    standalone = run_standalone(tmp_path / "export", cases, tmp_path)
    assert standalone["max_diff"] <= TOL[fmt], standalone["diffs"]
    assert standalone["overflow"] == list(overflow)
    assert "not in the exported schedule" in standalone["refused"]
    return result, standalone


def tiny_routed(capacity=None, vary_with_t=True):
    model = dynconvert.convert(tiny_dit(), 0.5)
    randomize_routing(model, 0.5, tokens=0.5, vary_with_t=vary_with_t)
    configure_planned(model, min_gather_rows=0)  # the tiny model's 32 rows are gathered too
    if capacity is not None:
        set_token_capacity(model, capacity)
    return model.eval()


def test_pt2_reproduces_the_planned_path_without_dynconvert(tmp_path):
    # One width pattern at every t; capacities of 0.25 (below the keep rate: tokens overflow)
    # from t = 750 on and 0.5 below: two patterns, two programs, each for two timesteps.
    model = tiny_routed(vary_with_t=False)
    set_token_capacity(model, torch.where(torch.arange(1000) >= 750, 0.25, 0.5))
    # check=False: the subprocess below is the check (the default suite pays for one)
    result, standalone = check_export(model, tmp_path, check=False)
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert result.programs == 2 and result.files == 2
    assert sorted(manifest["schedule"]) == [
        [499.0, "p1"],
        [500.0, "p1"],
        [998.0, "p0"],
        [999.0, "p0"],
    ]
    assert standalone["overflow"][0] > 0  # the capacity dropped tokens, as the planned path does
    caps = [set(p["capacities"].values()) for p in manifest["programs"].values()]
    assert caps == [{0.25}, {0.5}]
    assert (
        manifest["programs"]["p0"]["flops_ratio"]["2"]
        < manifest["programs"]["p1"]["flops_ratio"]["2"]
        < 1
    )
    # the weights once: the folder is the weights file plus the graphs and small files
    assert result.folder_bytes <= 1.1 * (result.weights_bytes + result.graph_bytes)
    assert not list(tmp_path.glob(".export.*"))  # no temporary folder left behind


def test_bad_requests_are_refused_before_any_work(tmp_path):
    model = tiny_routed()
    with pytest.raises(dynconvert.ExportError, match="format"):
        dynconvert.export(model, tmp_path / "a", format="tflite")
    with pytest.raises(dynconvert.ExportError, match="batch"):
        dynconvert.export(model, tmp_path / "a", batch=0)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(dynconvert.OutputExistsError, match="another"):
        dynconvert.export(model, tmp_path / "taken", overwrite=True)
    with pytest.raises(dynconvert.NotConvertedError):
        dynconvert.export(tiny_dit(), tmp_path / "a")
    with pytest.raises(dynconvert.ExportError, match="batch 2, not 3"):
        dynconvert.export(model, tmp_path / "a", batch=3, example_inputs=model.example_inputs(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
