"""dynconvert.export: programs per width pattern that reproduce the planned path with torch alone.

Every check of an export runs the folder's own loader (tests/exported_runner.py) over the whole
schedule against the planned path run eagerly here; the slow ones in a subprocess where
``import dynconvert`` fails.
The default suite exports the tiny DiT to pt2 (one program per pattern, token gather at a
capacity that overflows) and runs the folder's own loader in this process (a fresh interpreter
importing torch costs more than the export) and holds run_exported.py to the standard library and
torch by reading its imports; the slow set runs the same tiny DiT export in the subprocess, adds
AOTInductor, ONNX, the digits run folder through the CLI (and a DDIM run from the export), and
tiny PixArt, SD3 and Flux.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from exported_runner import check as check_in_process

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
                 example_inputs=None, check=True, isolated=True):  # fmt: skip
    """Export, then compare the standalone folder with the planned path over the schedule
    (in a subprocess where dynconvert cannot be imported, unless ``isolated=False``)."""
    batches = [batch] if isinstance(batch, int) else list(batch)
    cases, overflow = references(model, list(timesteps), batches, example_inputs)
    result = dynconvert.export(model, tmp_path / "export", format=fmt, timesteps=list(timesteps),
                               batch=batch, example_inputs=example_inputs, check=check)  # fmt: skip
    if isolated:
        standalone = run_standalone(tmp_path / "export", cases, tmp_path)
    else:
        standalone = check_in_process(tmp_path / "export", cases)
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


def test_pt2_reproduces_the_planned_path(tmp_path):
    # One width pattern at every t and a capacity of 0.25 of the rows, below the keep rate:
    # one program for both timesteps, its token gather drops tokens as the planned path does.
    model = tiny_routed(capacity=0.25, vary_with_t=False)
    # check=False: the folder's loader below is the check (the default suite pays for one);
    # the same export without dynconvert importable: test_tiny_dit_token_gather_standalone
    result, standalone = check_export(model, tmp_path, timesteps=(999.0, 500.0), check=False,
                                      isolated=False)  # fmt: skip
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert result.programs == 1 and manifest["schedule"] == [[999.0, "p0"], [500.0, "p0"]]
    assert standalone["overflow"][0] > 0  # dropped by the capacity, counted as an output
    assert set(manifest["programs"]["p0"]["capacities"].values()) == {0.25}
    assert 0 < manifest["programs"]["p0"]["flops_ratio"]["2"] < 1
    assert manifest["inputs"]["timestep"] == ["t"] and manifest["shapes"] == {
        "2": [[2, 4, 8, 8], [2], [2]]
    }
    # the weights once: the folder is the weights file plus the graphs and small files
    assert result.folder_bytes <= 1.1 * (result.weights_bytes + result.graph_bytes)
    assert not list(tmp_path.glob(".export.*"))  # no temporary folder left behind


def test_the_loader_imports_only_the_standard_library_and_torch():
    # what makes the subprocess checks of the slow set pass, read here without running them
    from dynconvert.deploy import run_exported

    def roots(nodes):
        names = set()
        for node in nodes:
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
        return names - sys.stdlib_module_names

    tree = ast.parse(Path(run_exported.__file__).read_text())
    assert roots(tree.body) == {"torch"}  # at import: torch alone
    # onnxruntime (ONNX programs) and diffusers (the pipeline wrapper) when they are used
    assert roots(ast.walk(tree)) == {"torch", "onnxruntime", "diffusers"}


def test_timesteps_are_grouped_by_the_planners_patterns():
    from dynconvert.deploy.schedule import group_patterns
    from dynconvert.deploy.signature import bind

    model = tiny_routed(vary_with_t=False)  # one width pattern; capacities change at t = 750
    set_token_capacity(model, torch.where(torch.arange(1000) >= 750, 0.25, 0.5))
    with routing(model, "eval", "planned"):
        groups = group_patterns(model, bind(model, model.example_inputs(2), {}), "t",
                                [999.0, 500.0, 998.0, 499.0])  # fmt: skip
    assert groups == [[999.0, 998.0], [500.0, 499.0]]


def test_bad_requests_are_refused_before_any_work(tmp_path):
    model = tiny_routed()
    with pytest.raises(dynconvert.ExportError, match="format"):
        dynconvert.export(model, tmp_path / "a", format="tflite")
    with pytest.raises(dynconvert.ExportError, match="batch"):
        dynconvert.export(model, tmp_path / "a", batch=0)
    with pytest.raises(dynconvert.ExportError, match="timesteps"):
        dynconvert.export(model, tmp_path / "a", timesteps=[])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(dynconvert.OutputExistsError, match="another"):
        dynconvert.export(model, tmp_path / "taken", overwrite=True)
    with pytest.raises(dynconvert.NotConvertedError):
        dynconvert.export(tiny_dit(), tmp_path / "a")
    with pytest.raises(dynconvert.ExportError, match="batch 2, not 3"):
        dynconvert.export(model, tmp_path / "a", batch=3, example_inputs=model.example_inputs(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_the_commands_default_batch_is_the_one_sample_calls_with():
    # the slow digits test walks it end to end; its import broke once when runs/ moved it
    from dynconvert.cli.commands_export import default_batch
    from dynconvert.models import build_model

    assert default_batch(build_model("digits")) == 20  # 10 classes, with guidance


def test_the_command_refuses_with_one_line(tmp_path):
    from typer.testing import CliRunner

    from dynconvert.cli.app import make_app

    app, out = make_app(), str(tmp_path / "out")
    for args, message in [
        (["export", str(tmp_path), "--out", out, "--format", "tflite"], "--format must be one of"),
        (["export", str(tmp_path / "nope"), "--out", out], "no such run folder"),
        (["export", str(tmp_path), "--out", out, "--batch", "2,x"], "--batch takes"),
    ]:
        done = CliRunner().invoke(app, args)
        assert done.exit_code == 1 and message in done.output, done.output
        assert len(done.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# -- slow: AOTInductor, ONNX, every model kind, the run folder through the CLI, a pipeline ------


def zoo_model(name):
    """(converted model with random routing, example inputs as a function of the batch, the
    timesteps to export in the model's convention)."""
    from dynconvert.models import build_model
    from dynconvert.testing import tiny_pixart
    from dynconvert.testing.zoo import ZOO

    ddpm = (999.0, 998.0, 500.0, 499.0)
    if name == "digits":
        model, inputs, ts = build_model("digits").eval(), None, ddpm
    elif name == "pixart":
        model, inputs, ts = tiny_pixart(), None, ddpm
    else:  # SD3 takes t in 0..1000 as its pipeline passes it, Flux sigma in [0, 1]
        entry = ZOO[name]
        model = entry.build(0)
        ts = ddpm if name == "sd3" else (0.999, 0.998, 0.5, 0.499)

        def inputs(b, model=model, entry=entry):
            return entry.inputs(model, batch=b)

    model = dynconvert.convert(model, 0.5, example_inputs=inputs(2) if inputs else None)
    randomize_routing(model, 0.5, example_inputs=inputs(2) if inputs else None)
    configure_planned(model, min_gather_rows=0)
    return model.eval(), inputs, ts


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, fmt",
    [("digits", "pt2"), ("digits", "aoti"), ("digits", "onnx"), ("pixart", "pt2"),
     ("pixart", "aoti"), ("sd3", "pt2"), ("sd3", "aoti"), ("flux", "pt2"), ("flux", "aoti")],
)  # fmt: skip
def test_every_model_kind_reproduces_the_planned_path(tmp_path, name, fmt):
    model, inputs, ts = zoo_model(name)
    ts = ts if fmt == "pt2" else ts[:2]  # a compile per program: two timesteps are enough
    result, _ = check_export(model, tmp_path, fmt, timesteps=ts, example_inputs=inputs)
    assert result.max_abs_diff <= TOL[fmt] and result.programs >= 1
    assert result.folder_bytes <= 1.1 * (result.weights_bytes + result.graph_bytes)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pt2", "aoti", "onnx"])
def test_tiny_dit_token_gather_standalone(tmp_path, fmt):
    model = tiny_routed(vary_with_t=False)
    set_token_capacity(model, 0.25)  # gathered, with overflow counted as an output
    _, standalone = check_export(model, tmp_path, fmt, timesteps=(999.0, 500.0), batch=[2, 3])
    assert standalone["overflow"][0] > 0


@pytest.mark.slow
def test_digits_run_exports_and_samples_the_same_images_without_dynconvert(tmp_path):
    from typer.testing import CliRunner

    from dynconvert.cli.app import make_app
    from dynconvert.runs import load_run
    from dynconvert.sampling import sample

    run, out = tmp_path / "run", tmp_path / "export"
    sets = ["calibration.steps=12", "calibration.lambda_hold_steps=0", "calibration.warmup_steps=6",
            "report.bench=false", "evaluate.kind=none", "samples.grid=false"]  # fmt: skip
    app = make_app()
    sets = [a for s in sets for a in ("--set", s)]
    done = CliRunner().invoke(app, ["convert", "--model", "digits", "--target-flops", "0.5",
                                    "--out", str(run), *sets])  # fmt: skip
    assert done.exit_code == 0, done.output
    done = CliRunner().invoke(
        app, ["export", str(run), "--out", str(out), "--steps", "10", "--json"]
    )
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout[done.stdout.index("{") :])
    assert report["batches"] == [20] and report["load_s"] > 0 and report["export_s"] > 0
    assert report["folder_bytes"] <= 1.1 * (report["weights_bytes"] + report["graph_bytes"])
    script = Path(__file__).parents[1] / "examples" / "sample_exported.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(out), "--out", str(tmp_path / "s.pt"), "--steps", "10",
         "--block-dynconvert"], capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, _ = load_run(run)
    kwargs = dict(labels=list(range(10)), steps=10, cfg_scale=1.5, seed=0, clip_sample=True)
    with routing(model, None, execution="planned"):
        planned = sample(model, **kwargs)
    exported = torch.load(tmp_path / "s.pt")
    assert (exported - planned).abs().max() <= 1e-5
    # and what `dynconvert sample` draws (the fast path on the CPU): no token over capacity
    assert "tokens over capacity 0/" in proc.stdout, proc.stdout
    assert (exported - sample(model, **kwargs)).abs().max() <= 1e-5


@pytest.mark.slow
def test_export_is_the_transformer_of_a_diffusers_pipeline(tmp_path):
    from diffusers import DDIMScheduler, DiTPipeline
    from test_pipelines import _sample, _tiny_vae

    from dynconvert.deploy import DiffusersTransformer, load_exported
    from dynconvert.testing import tiny_diffusers_dit

    model = dynconvert.convert(tiny_diffusers_dit(), 0.5)
    randomize_routing(model, keep=0.5)
    sched = DDIMScheduler()
    sched.set_timesteps(3)
    dynconvert.export(model, tmp_path / "export", timesteps=sched.timesteps.tolist(), batch=2)
    dynconvert.set_routing(model, None, execution="planned")
    vae = _tiny_vae()
    reference = _sample(DiTPipeline(transformer=model, vae=vae, scheduler=DDIMScheduler()))
    wrapped = DiffusersTransformer(load_exported(tmp_path / "export"))
    got = _sample(DiTPipeline(transformer=wrapped, vae=vae, scheduler=DDIMScheduler()))
    assert abs(got - reference).max() <= 1e-5
