"""Records saved by an older release still load (issue 19: the plan version and its migration).

``tests/fixtures/plan_v2/`` holds converted models saved by dynconvert at plan version 2 (before
attention sites were split into a core and optional parts), one per attention form: a gate with
grouped-query attention, key/value compression with a norm across all heads (a partial site), a
rotary table handed in per head, linear attention, joint attention streams with a parallel
block, and the built-in DiT. Each folder was written by ``make_fixture.py`` (beside the folders)
with that release; ``reference.safetensors`` holds its example inputs and the output the saved
model gave for them. The weights are stored in float16 to keep the folders small.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import dynconvert
from dynconvert.io.save import load
from dynconvert.plan import PLAN_VERSION, Plan
from dynconvert.testing import PATTERN_MODELS, mmdit, tiny_dit

FIXTURES = Path(__file__).parent / "fixtures" / "plan_v2"


def _one_layer(name: str) -> tuple[nn.Module, dict[str, Any]]:
    """A pattern model cut to its first block (a smaller fixture, the same attention form)."""
    model, inputs = PATTERN_MODELS[name]()
    model.layers = model.layers[:1]
    return model, inputs


def _dit() -> tuple[nn.Module, dict[str, Any]]:
    model = tiny_dit(depth=1)
    x, t, y = model.example_inputs(2)
    return model, {"x": x, "t": t, "y": y}


# fixture folder -> the forms its attention sites take once migrated (all sites alike)
FORMS = {
    "dit": [],
    "gate-gqa": ["gate"],
    "kv-partial": ["kv_compression", "partial"],
    "table-partial": ["partial", "table"],
    "linear": ["linear"],
    "streams": [],
}

# fixture folder -> a freshly built original model and its example inputs
BUILDERS = {
    "dit": _dit,
    "gate-gqa": lambda: _one_layer("gated-gqa"),
    "kv-partial": lambda: _one_layer("kv-conv-norm"),
    "table-partial": lambda: _one_layer("rotary-wide-table-norm-all"),
    "linear": lambda: _one_layer("sana-like"),
    "streams": lambda: mmdit(joint=1, single=1),
}


def load_fixture(name: str) -> nn.Module:
    """The saved model: the DiT rebuilt from its preset (in the saved float16), the others
    loaded into a freshly built float32 original."""
    return load(FIXTURES / name, None if name == "dit" else BUILDERS[name]()[0])


def run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's output, floating inputs cast to the dtype of its weights."""
    dtype = next(model.parameters()).dtype
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        return model(**cast)


def _reference(name: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    tensors = load_file(str(FIXTURES / name / "reference.safetensors"))
    inputs = {k.removeprefix("input."): v for k, v in tensors.items() if k.startswith("input.")}
    return inputs, tensors["output"]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_a_record_saved_at_plan_version_2_loads_and_computes_what_it_did(name):
    record = json.loads((FIXTURES / name / "dynconvert.json").read_text())
    assert record["plan"]["version"] == 2
    model = load_fixture(name)
    inputs, expected = _reference(name)
    torch.testing.assert_close(run(model, inputs), expected)
    bank = dynconvert.get_state(model)
    assert any(not bool(t.all()) for t in bank.width_table().values())  # some units are off
    plan = bank.plan
    assert plan.version == PLAN_VERSION
    assert Plan.from_dict(record["plan"]) == plan
    assert Plan.from_dict(plan.to_dict()) == plan
    assert all(sorted(s.parts) == FORMS[name] for s in plan.attention), plan.attention
    # The costs the accountant reads are those the saved plan described.
    old = record["plan"]
    assert plan.other_macs == old["other_macs"] and plan.static_macs == old["static_macs"]
    for site, saved in zip(plan.attention, old["attention"]):
        for name in ("gate", "gate_in", "gate_rows", "kv_stride", "linear_macs", "unsliced"):
            assert getattr(site, name) == saved[name]  # the version-2 names still read
