"""The reliability catalogue, second round (issue 23): what a file says.

No code from files: a record, run.json or config.json that names a module (one shipped in the
folder, or any installed one) imports nothing. Bounded parsing: records, run.json, config.json,
recipes and ``--set`` past their limits (size, depth, values with YAML aliases expanded, string
length, integer digits, UTF-8) are refused with one short line. Honest numbers: weights that
would route wrongly or are not the recorded ones are refused, a model comes back in its saved
dtype, and ``inspect --run`` counts what the loaded model executes. Every file is crafted here.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_reliability import TINY, files, invoke, refused

import dynconvert
from dynconvert.errors import ConfigError, RecordError
from dynconvert.io.files import file_digest
from dynconvert.io.restore import names_class
from dynconvert.io.weights import write_safetensors
from dynconvert.recipes import apply_overrides, load_recipe
from dynconvert.runs import load_run
from dynconvert.testing import tiny_dit

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A converted tiny DiT saved with dynconvert.save, and a run.json as convert writes it."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("records") / "saved"
    dynconvert.save(dynconvert.convert(tiny_dit(), 0.5, seed=0), folder)
    source = {"name": "dit-tiny", "kind": "preset", "target": "dit-tiny", "weights": "random",
              "checkpoint": None, "model_kwargs": {}, "seed": 0, "repo": None}  # fmt: skip
    run = {"format": "dynconvert-run", "version": 1, "status": "finished", "source": source}
    (folder / "run.json").write_text(json.dumps(run))
    return folder


def copy(saved: Path, tmp_path: Path) -> Path:
    return shutil.copytree(saved, tmp_path / "run")


def edit(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def refused_everywhere(run: Path, tmp_path: Path, expect: str) -> str:
    """load and ``sample --run`` refuse the folder with ``expect``; nothing written."""
    before = files(tmp_path)
    with pytest.raises(RecordError) as err:
        load_run(run)
    assert expect in str(err.value) and len(str(err.value)) < 600
    line = refused(invoke("sample", "--run", run, "--out", tmp_path / "g.png", "--steps", "1"))
    assert expect in line and len(line) < 600
    assert files(tmp_path) == before
    return line


# --- nothing named by a file is imported ---------------------------------------------------

PAYLOAD = "import pathlib; pathlib.Path(__file__).with_name('RAN').touch()\nclass Model: pass\n"


@pytest.mark.parametrize(
    "model_class",
    ["payload.Model", "this.Model", "diffusers.DiffusionPipeline", "diffusers.utils.logging.x"],
)
def test_a_record_naming_a_module_imports_nothing(model_class, saved, tmp_path, monkeypatch):
    run = copy(saved, tmp_path)
    (run / "payload.py").write_text(PAYLOAD)
    (run / "config.json").write_text("{}")  # the diffusers route, which reads the class name
    edit(run / "dynconvert.json", model_class=model_class, preset=None)
    (run / "run.json").unlink()
    monkeypatch.chdir(run)  # the folder is on sys.path ('' first) as for `python -m ...` there
    monkeypatch.syspath_prepend(str(run))
    module = model_class.split(".")[0]
    was_imported = module in sys.modules
    refused_everywhere(run, tmp_path, "imports no class a file names")
    with pytest.raises(RecordError, match="but base_model is"):
        dynconvert.load(run, tiny_dit())
    assert not (run / "RAN").exists()
    assert was_imported or module == "diffusers" or module not in sys.modules


SOURCES = {
    "pipeline class": {"kind": "diffusers", "target": "DiffusionPipeline"},
    "dotted target": {"kind": "diffusers", "target": "models.DiTTransformer2DModel"},
    "unknown kind": {"kind": "module", "target": "payload"},
    "unknown test model": {"kind": "testing", "target": "payload"},
    "extra field": {"importer": "payload"},
}


@pytest.mark.parametrize("name", list(SOURCES))
def test_a_run_source_naming_a_class_is_checked_against_the_allow_list(name, saved, tmp_path):
    run = copy(saved, tmp_path)
    source = {**json.loads((run / "run.json").read_text())["source"], **SOURCES[name]}
    edit(run / "run.json", source=source)
    edit(run / "dynconvert.json", preset=None)  # the source rebuilds the base
    refused_everywhere(run, tmp_path, "model source")


def test_a_record_may_name_a_moved_class_only_by_a_known_path():
    from dynconvert.models.dit import DiT
    from dynconvert.testing.patterns import RotaryDiT

    assert names_class("dynconvert.models.patterns.RotaryDiT", RotaryDiT)  # MOVED table
    assert names_class("dynconvert.testing.patterns.RotaryDiT", RotaryDiT)  # re-exported
    for path in ("dynconvert.testing.patterns.DiT", "payload.DiT", "dynconvert.nowhere.DiT"):
        assert not names_class(path, DiT)
    assert "dynconvert.nowhere" not in sys.modules


# --- bounded parsing -----------------------------------------------------------------------

RECORD_BYTES = {
    "nested 100,000 deep": b"[" * 100_000 + b"]" * 100_000,
    "a 5000-digit integer": b'{"format": "dynconvert", "format_version": ' + b"9" * 5000 + b"}",
    "not UTF-8": b'{"format": "dynconvert\xff\xfe"}',
    "a 2 MB string": b'{"format": "dynconvert", "x": "' + b"x" * (2 << 20) + b'"}',
    "not JSON": b'{"format": ',
}
RECORD_EXPECT = ["nested", "digits", "UTF-8", "string of", "not valid JSON"]


CASES = [(f, name) for f in ("dynconvert.json", "run.json") for name in RECORD_BYTES]
CASES.append(("config.json", "nested 100,000 deep"))  # the same reader: one case (diffusers)


@pytest.mark.parametrize("file, name", CASES)
def test_crafted_json_is_refused_in_one_short_line(file, name, saved, tmp_path):
    run = copy(saved, tmp_path)
    if file == "config.json":
        edit(run / "dynconvert.json", preset=None, model_class="diffusers.DiTTransformer2DModel")
        (run / "run.json").unlink()
    (run / file).write_bytes(RECORD_BYTES[name])
    expect = RECORD_EXPECT[list(RECORD_BYTES).index(name)]
    refused_everywhere(run, tmp_path, expect)


def test_a_record_larger_than_its_limit_is_refused_before_it_is_read(saved, tmp_path):
    run = copy(saved, tmp_path)
    with open(run / "dynconvert.json", "r+b") as f:
        f.truncate(100 << 20)  # 100 MB (sparse): refused by its size, never read
    with pytest.raises(RecordError, match="larger than"):
        load_run(run)
    line = refused(invoke("sample", "--run", run, "--out", tmp_path / "g.png", "--steps", "1"))
    assert "larger than" in line and not (tmp_path / "g.png").exists()


ALIASES = "[" + ", ".join(f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9))
SET_VALUES = {
    "alias bomb": (f"model_kwargs={{a0: &a0 [1], x: {ALIASES}]}}", "more than 2000 values"),
    "alias in itself": ("model_kwargs={a: &a [1, *a]}", "alias inside"),
    "nested 200 deep": ("model_kwargs={x: " + "[" * 200 + "]" * 200 + "}", "nested"),
    "5000-digit integer": ("calibration.steps=" + "9" * 5000, "digits"),
    "100 KB value": ("report.bench=" + "x" * 100_000, "characters long"),
    "key 100 levels deep": ("model_kwargs." + ".".join(["a"] * 100) + "=1", "dotted name"),
}


@pytest.mark.parametrize("name", list(SET_VALUES))
def test_crafted_set_items_are_refused_in_one_short_line(name, tmp_path):
    item, expect = SET_VALUES[name]
    line = refused(invoke("convert", *TINY, "--steps", "1", "--set", item, "--out", tmp_path / "r"))
    assert expect in line and len(line) < 400
    assert files(tmp_path) == {}


RECIPES = {
    "not UTF-8": (b"name: x\nmodel: dit-tiny\xff\n", "utf-8"),
    "alias bomb": (f"name: x\nmodel_kwargs: {{a0: &a0 [1], x: {ALIASES}]}}\n".encode(), "values"),
    "100 KB": (b"name: x\ndescription: " + b"x" * 100_000 + b"\n", "larger than"),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_crafted_recipe_files_are_refused_in_one_short_line(name, tmp_path):
    data, expect = RECIPES[name]
    (tmp_path / "mine.yaml").write_bytes(data)
    before = files(tmp_path)
    result = invoke("convert", *TINY, "--recipe", tmp_path / "mine.yaml", "--out", tmp_path / "r")
    line = refused(result)
    assert expect in line and len(line) < 400
    assert files(tmp_path) == before


def test_a_recipe_that_is_a_pipe_is_refused_at_once(tmp_path):
    os.mkfifo(tmp_path / "mine.yaml")
    with pytest.raises(ConfigError):  # not a regular file: refused, never waited on
        load_recipe(tmp_path / "mine.yaml")


def test_api_overrides_are_bounded_and_messages_cut():
    deep: list = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(ConfigError, match="nested"):
        apply_overrides({"name": "x"}, {"model_kwargs": {"x": deep}})
    with pytest.raises(ConfigError) as err:
        load_recipe("digits", {"calibration.steps": "9" * 10**6})
    assert len(str(err.value)) < 300
    with pytest.raises(ConfigError, match="at most 1000"):
        apply_overrides({"name": "x"}, ["cpu_threads=1"] * 1001)


# --- honest numbers ------------------------------------------------------------------------


def rewrite_weights(run: Path, change) -> None:
    """Change the weights and keep the record's size and sha256 in step with them."""
    state = {k: v.clone() for k, v in load_file(str(run / "model.safetensors")).items()}
    change(state)
    with open(run / "model.safetensors", "wb") as f:
        write_safetensors(f, state)
    size, digest = file_digest(run / "model.safetensors")
    record = json.loads((run / "dynconvert.json").read_text())
    record["weights"].update(bytes=size, sha256={"model.safetensors": digest})
    (run / "dynconvert.json").write_text(json.dumps(record))


def _set(key: str, value_of):
    return lambda state: state.__setitem__(key, value_of(state[key]))


ROUTER = "dynconvert.width.0.weight"
WEIGHTS = {
    "NaN router": (_set(ROUTER, lambda v: v.index_fill(1, torch.tensor([0]), float("nan"))), "NaN"),
    "infinite router": (
        _set(ROUTER, lambda v: v.index_fill(0, torch.tensor([1]), float("inf"))), "NaN"
    ),
    "int32 router": (_set(ROUTER, lambda v: v.to(torch.int32)), "torch.int32"),
    "fp16 router, record fp32": (_set(ROUTER, lambda v: v.half()), "record says float32"),
    "int32 model weight": (_set("x_embedder.proj.weight", lambda v: v.to(torch.int32)), "int32"),
    "always_on -1": (_set("dynconvert.always_on", lambda v: v.fill_(-1)), "always-on"),
    "always_on 99": (_set("dynconvert.always_on", lambda v: v.fill_(99)), "always-on"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(WEIGHTS))
def test_weights_that_would_route_wrongly_are_refused(name, saved, tmp_path):
    run = copy(saved, tmp_path)
    change, expect = WEIGHTS[name]
    rewrite_weights(run, change)
    refused_everywhere(run, tmp_path, expect)


def test_the_fingerprint_covers_every_byte_of_every_weights_file(saved, tmp_path):
    run = copy(saved, tmp_path)
    data = bytearray((run / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 1  # a flipped bit mid-file: same size, same first and last MiB
    (run / "model.safetensors").write_bytes(bytes(data))
    refused_everywhere(run, tmp_path, "does not match its record")
    sharded = copy(saved, tmp_path / "sharded")
    state = load_file(str(sharded / "model.safetensors"))
    names = sorted(state)
    shards = {"shard-1.safetensors": names[::2], "shard-2.safetensors": names[1::2]}
    for shard, keys in shards.items():
        with open(sharded / shard, "wb") as f:
            write_safetensors(f, {k: state[k] for k in keys})
    index = {"weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (sharded / "model.safetensors").write_text(json.dumps(index))
    record = json.loads((sharded / "dynconvert.json").read_text())
    listed = ["model.safetensors", *shards]
    digests = {n: file_digest(sharded / n) for n in listed}
    record["weights"] = {"file": listed[0], "bytes": digests[listed[0]][0], "shards": list(shards),
                         "sha256": {n: d for n, (_, d) in digests.items()}}  # fmt: skip
    (sharded / "dynconvert.json").write_text(json.dumps(record))
    inputs = tiny_dit().example_inputs(batch_size=2)
    with torch.no_grad():  # the crafted shards load, and give the saved model's output
        expected = dynconvert.load(saved)(*inputs)
        torch.testing.assert_close(dynconvert.load(sharded)(*inputs), expected, atol=0, rtol=0)
    data = bytearray((sharded / "shard-2.safetensors").read_bytes())
    data[-1] ^= 1
    (sharded / "shard-2.safetensors").write_bytes(bytes(data))
    with pytest.raises(RecordError, match="does not match its record"):
        dynconvert.load(sharded)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_model_comes_back_in_the_dtype_it_was_saved_in(dtype, tmp_path):
    model = dynconvert.convert(tiny_dit().to(dtype), 0.5)
    dynconvert.save(model, tmp_path / "m")
    loaded = dynconvert.load(tmp_path / "m")
    kinds = {(k.startswith("dynconvert."), v.dtype) for k, v in loaded.state_dict().items()
             if v.is_floating_point()}  # fmt: skip
    assert kinds == {(False, dtype), (True, torch.float32)}  # routers compute in float32
    inputs = [a.to(dtype) if a.is_floating_point() else a for a in tiny_dit().example_inputs(2)]
    with torch.no_grad():
        assert loaded(*inputs).dtype == dtype
        torch.testing.assert_close(loaded(*inputs), model.eval()(*inputs), atol=0, rtol=0)


def test_inspect_run_reports_what_the_loaded_model_executes(saved):
    from dynconvert.measure.executed import executed_ratio

    result = invoke("inspect", "--run", saved, "--json")
    assert result.exit_code == 0, result.output
    run = json.loads(result.stdout)["run"]
    assert run["executed_flops_ratio"] == pytest.approx(executed_ratio(dynconvert.load(saved)))
    assert "executed (loaded model)" in invoke("inspect", "--run", saved).stdout


def test_a_format_1_record_still_loads(saved, tmp_path):
    from dynconvert.io.files import open_file
    from dynconvert.io.record import legacy_fingerprint

    run = copy(saved, tmp_path)
    record = json.loads((run / "dynconvert.json").read_text())
    fd = open_file(run / "model.safetensors")
    record["weights"] = {"file": "model.safetensors", "bytes": record["weights"]["bytes"],
                         "fingerprint": legacy_fingerprint(fd)}  # fmt: skip
    os.close(fd)
    del record["dtypes"]
    record["format_version"] = 1
    (run / "dynconvert.json").write_text(json.dumps(record))
    assert dynconvert.is_converted(dynconvert.load(run))
