"""The reliability catalogue, third pass (issue 23): cases a second attacker tried after the
first two files were written, one class at a time.

A folder that asks for more model than its weights hold (a record's preset arguments, a
config.json, a run.json source) is refused before anything is allocated; a plan whose unit maps
or head-count attributes do not fit the model is refused before any index is listed; a record
whose width masks or FLOPs ratios are not what its routers give (weights swapped with their
sha256 updated, masks edited, NaN ratios) is refused; a checkpoint with NaN or infinite state is
refused on resume; YAML shapes the first rounds did not try stay one short refusal. Every file
is crafted here.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from test_reliability_records import (
    _set,
    copy,
    edit,
    refused_everywhere,
    rewrite_weights,
    saved,  # noqa: F401 (the module fixture: a converted tiny DiT saved, with run.json)
)

from dynconvert.calibration.checkpoint import check_training_payload
from dynconvert.errors import CheckpointError, ConfigError, RecordError
from dynconvert.io.limits import parse_json
from dynconvert.recipes import load_recipe
from dynconvert.runs import load_run

pytestmark = pytest.mark.usefixtures("one_thread")


def refused_fast(run, expect: str) -> None:
    """load_run refuses the folder with ``expect`` in one short line, well under a second."""
    start = time.perf_counter()
    with pytest.raises(RecordError) as err:
        load_run(run)
    assert expect in str(err.value) and len(str(err.value)) < 600
    assert time.perf_counter() - start < 5  # about 0.05 s; generous for a shared machine


# --- a folder cannot ask for more model than its weights hold ---------------------------------

SOURCE = {"name": "dit-tiny", "kind": "preset", "target": "dit-tiny", "weights": "random",
          "checkpoint": None, "seed": 0, "repo": None}  # fmt: skip
SIZES = {
    "preset hidden_size 2**20": ("preset_kwargs", {"hidden_size": 2**20}),  # 4 TB asked
    "preset depth 10**6": ("preset_kwargs", {"depth": 10**6}),  # minutes of building
    "run.json source hidden_size 2**20": ("source", {"hidden_size": 2**20}),
    "run.json source depth 10**6": ("source", {"depth": 10**6}),
}


@pytest.mark.parametrize("name", list(SIZES))
def test_a_model_larger_than_its_weights_is_refused_unbuilt(name, saved, tmp_path):  # noqa: F811
    where, kwargs = SIZES[name]
    run = copy(saved, tmp_path)
    if where == "preset_kwargs":
        edit(run / "dynconvert.json", preset_kwargs=kwargs)
    else:
        edit(run / "dynconvert.json", preset=None)
        edit(run / "run.json", source={**SOURCE, "model_kwargs": kwargs})
    refused_fast(run, "more parameters than its weights files hold")


# --- the plan must fit the model -------------------------------------------------------------


def _site0(change):
    def apply(record):
        change(record["plan"]["attention"][0])

    return apply


def _map0(**fields):
    return _site0(lambda site: site["in_maps"][0].update(fields))


PLANS = {
    "negative part base": (_map0(parts=[[-16, 16, 16], [32, 16, 16], [64, 16, 16]]), "not fit"),
    "10**9 indices": (_map0(parts=[[0, 16, 10**9]]), "do not fit"),
    "10**7 units": (_map0(units=10**7), "do not fit"),
    "explicit not lists": (_map0(explicit=[[-1, 0], [1, 2]]), "do not fit"),
    "keep -1": (_map0(keep=[-1]), "do not fit"),
    "head_attrs forward": (_site0(lambda s: s["head_attrs"].update(forward=1)), "lowers"),
    "head_attrs __class__": (_site0(lambda s: s["head_attrs"].update(__class__=1)), "lowers"),
    "head_attrs training": (_site0(lambda s: s["head_attrs"].update(training=1)), "lowers"),
    "head_attrs wrong count": (_site0(lambda s: s["head_attrs"].update(num_heads=2)), "lowers"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(PLANS))
def test_a_plan_that_does_not_fit_its_model_is_refused(name, saved, tmp_path):  # noqa: F811
    change, expect = PLANS[name]
    run = copy(saved, tmp_path)
    record = json.loads((run / "dynconvert.json").read_text())
    change(record)
    (run / "dynconvert.json").write_text(json.dumps(record))
    refused_fast(run, expect)


# --- what the record shows is what the routers give ------------------------------------------


def _record(**fields):
    return lambda run: edit(run / "dynconvert.json", **fields)


TABLES = {
    # Other routers, the sha256 and size updated with them: the masks are no longer theirs.
    "routers swapped, sha256 updated": (
        lambda run: rewrite_weights(run, _set("dynconvert.width.0.bias", lambda v: -v)),
        "width masks for site 0",
    ),
    "masks edited": (_record(width_masks={str(i): [[0, 999, "01"]] for i in range(4)}), "masks"),
    "mean ratio NaN": (_record(mean_flops_ratio=float("nan")), "mean_flops_ratio"),
    "mean ratio a string": (_record(mean_flops_ratio="0.1"), "mean_flops_ratio"),
    "ratio per t short": (_record(flops_ratio_per_t=[0.5]), "flops_ratio_per_t"),
    "ratio per t infinite": (_record(flops_ratio_per_t=[float("inf")] * 1000), "flops_ratio"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(TABLES))
def test_a_record_that_is_not_its_routers_is_refused(name, saved, tmp_path):  # noqa: F811
    change, expect = TABLES[name]
    run = copy(saved, tmp_path)
    change(run)
    if name == "routers swapped, sha256 updated":  # and through the CLI: nothing written
        refused_everywhere(run, tmp_path, expect)
    else:
        refused_fast(run, expect)


# --- checkpoints ---------------------------------------------------------------------------


def _payload():
    weight = torch.ones(2, 3)
    return {
        "step": 2, "model": {"dynconvert.width.0.weight": weight.clone()},
        "ema": {"decay": 0.99, "warmup": True, "num_updates": 2,
                "shadow": {"dynconvert.width.0.weight": weight.clone()}},
        "optimizer": {"param_groups": [{"params": [0]}],
                      "state": {0: {"step": torch.tensor(2.0), "exp_avg": weight.clone()}}},
        "rng": [], "counters": {}, "history": {"loss": [float("nan")]}, "config": {},
    }  # fmt: skip


def _fill(*path):
    def change(payload):
        *parents, last = path
        for key in parents:
            payload = payload[key]
        payload[last] = payload[last].clone().fill_(float("nan"))

    return change


CHECKPOINTS = {
    "NaN EMA router": _fill("ema", "shadow", "dynconvert.width.0.weight"),
    "NaN model router": _fill("model", "dynconvert.width.0.weight"),
    "NaN optimizer moment": _fill("optimizer", "state", 0, "exp_avg"),
    "NaN EMA decay": lambda p: p["ema"].update(decay=float("nan")),
    "EMA decay 2": lambda p: p["ema"].update(decay=2.0),
    "EMA num_updates -5": lambda p: p["ema"].update(num_updates=-5),
}


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_a_checkpoint_with_non_finite_state_is_refused(name):
    check_training_payload(_payload(), "step-0000002.pt")  # a NaN in the history is only shown
    payload = _payload()
    CHECKPOINTS[name](payload)
    with pytest.raises(CheckpointError, match="delete it to resume from the previous one") as err:
        check_training_payload(payload, "step-0000002.pt")
    assert len(str(err.value)) < 300


# --- JSON and YAML shapes the first rounds did not try ---------------------------------------

JSON = {  # 64 MB of "[0,0,..." took 19 s and 1.2 GB to refuse after parsing; now 0.3 s
    "600,000 zeros": lambda: b"[" + b"0," * 600_000 + b"0]",
    "600,000 empty lists": lambda: b"[" + b"[]," * 600_000 + b"[]]",
    "600,000 repeated keys": lambda: b"{" + b'"a":0,' * 600_000 + b'"a":0}',  # one key parsed
}


@pytest.mark.parametrize("name", list(JSON))
def test_a_flat_json_bomb_is_refused_before_it_is_parsed(name):
    start = time.perf_counter()
    with pytest.raises(RecordError, match="more than 500000 values"):
        parse_json(JSON[name](), "dynconvert.json", RecordError)
    assert time.perf_counter() - start < 5  # counted in C before parsing


# --- YAML shapes the first rounds did not try ------------------------------------------------

MERGE = "".join(
    f"  a{i}: &a{i} {{<<: [*a{i - 1}], x{i}: [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]}}\n"
    for i in range(1, 12)
)
YAML = {
    "merge-key bomb": ("model_kwargs:\n  a0: &a0 {k0: 1, k1: 2}\n" + MERGE, "values"),
    "python tag": ("model: !!python/object/apply:os.system ['touch RAN']\n", "not valid YAML"),
    "unhashable key": ("model_kwargs: {? [a, b] : 1}\n", "not valid YAML"),
    "two documents": ("model: dit-tiny\n---\nname: y\n", "not valid YAML"),
    "NaN target": ("model: dit-tiny\ntarget_flops: .nan\n", "target_flops"),
    "a date for a name": ("model: 2001-12-14\n", "model must be a string"),
    "hex integer of 60 digits": ("calibration: {steps: 0x" + "f" * 60 + "}\n", "digits"),
    "2,000 anchors": ("model_kwargs: [" + ",".join(f"&a{i} 1" for i in range(2000)) + "]\n", ""),
}


@pytest.mark.parametrize("name", list(YAML))
def test_yaml_of_other_shapes_is_one_short_refusal(name, tmp_path, monkeypatch):
    text, expect = YAML[name]
    (tmp_path / "mine.yaml").write_text("name: x\n" + text)
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_recipe(tmp_path / "mine.yaml")
    assert time.perf_counter() - start < 5  # at most 0.65 s median measured at load 21
    assert expect in str(err.value) and len(str(err.value)) < 400
    assert not (tmp_path / "RAN").exists()
