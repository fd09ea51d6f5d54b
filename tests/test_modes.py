"""Execution modes are registered objects: the bank resolves the name once per call, the runtimes
ask the mode what it means, and a mode registered from outside runs without editing them."""

from __future__ import annotations

import pytest
import torch

import dynconvert
from dynconvert.config import ConvertConfig
from dynconvert.errors import ConfigError
from dynconvert.runtime.modes import (
    EXECUTION_MODES,
    ExecutionMode,
    FastExecution,
    execution_mode,
    execution_names,
    register_execution_mode,
)
from dynconvert.testing import randomize_routing, tiny_dit


@pytest.fixture(scope="module")
def routed():
    torch.manual_seed(0)
    model = dynconvert.convert(tiny_dit(), 0.5).eval()
    randomize_routing(model, keep=0.5, vary_with_t=False)
    return model, model.example_inputs(2)


def _out(model, inputs, execution):
    with torch.no_grad(), dynconvert.routing(model, "eval", execution):
        return model(*inputs)


def test_the_built_in_modes_and_what_they_mean():
    assert execution_names() == ("fast", "masked", "planned", "auto")
    flags = {n: (m.sliced, m.gathers_tokens, m.static_shapes) for n, m in EXECUTION_MODES.items()}
    assert flags["masked"] == (False, False, False)
    assert flags["fast"] == (True, True, False)
    assert flags["planned"] == (True, True, True)
    assert execution_mode("auto").resolve("cuda").name == "planned"
    assert execution_mode("auto").resolve("cpu").name == "fast"
    assert execution_mode("fast").resolve("cuda").name == "fast"


def test_an_unknown_name_is_refused_everywhere_with_the_valid_ones(routed):
    model, _ = routed
    bank = dynconvert.get_state(model)
    with pytest.raises(ConfigError, match="fast, masked, planned, auto; got 'quick'"):
        dynconvert.set_routing(model, "eval", execution="quick")
    with pytest.raises(ConfigError, match="got 'quick'"):
        bank.execution = "quick"
    assert bank.execution == "fast"  # nothing changed by the refused calls
    with pytest.raises(ConfigError, match="already registered"):
        register_execution_mode(type("Again", (ExecutionMode,), {"name": "fast"}))


def test_the_call_runs_the_resolved_mode(routed):
    model, inputs = routed
    bank = dynconvert.get_state(model)
    seen = {}
    for name in ("masked", "fast", "planned", "auto"):
        _out(model, inputs, name)
        seen[name] = bank.execution_now.name
    assert seen == {"masked": "masked", "fast": "fast", "planned": "planned", "auto": "fast"}
    with torch.no_grad(), dynconvert.routing(model, "full"):
        model(*inputs)
    assert bank.execution_now.name == "masked"  # full width outside evaluation


def test_fast_path_off_keeps_every_mode_masked():
    torch.manual_seed(0)
    model = dynconvert.convert(tiny_dit(), 0.5, config=ConvertConfig(fast_path=False)).eval()
    randomize_routing(model, keep=0.5, vary_with_t=False)
    bank = dynconvert.get_state(model)
    _out(model, model.example_inputs(2), "planned")
    assert bank.execution_now.name == "masked" and not bank.planned_now
    assert bank.slice_bytes == 0


def test_a_registered_mode_runs_without_editing_the_runtimes(routed):
    model, inputs = routed
    bank = dynconvert.get_state(model)
    asked = []

    @register_execution_mode
    class CountingFast(FastExecution):
        name, summary = "counting-fast", "the fast path, counting its decisions"

        def decision(self, bank, runtime, device):
            asked.append(runtime.site.index)
            return super().decision(bank, runtime, device)

    try:
        got = _out(model, inputs, "counting-fast")
        assert torch.allclose(got, _out(model, inputs, "masked"), atol=1e-5)
        assert sorted(set(asked)) == [s.index for s in bank.plan.sites]  # every site asked it
    finally:
        del EXECUTION_MODES["counting-fast"]
