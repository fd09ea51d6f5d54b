"""Bad input: one clear error naming the fix, and the model left exactly as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynconvert
from dynconvert.inputs import find_timestep_arg
from dynconvert.runtime.dynamic import DynamicLinear
from dynconvert.testing import tiny_dit


def _unchanged(model, before):
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not dynconvert.is_converted(model)
    assert not any(isinstance(m, DynamicLinear) for m in model.modules())
    assert not hasattr(model, "dynconvert")


@pytest.mark.parametrize("budget", [0, 0.0, -0.5, 1.5, "abc", None, True, float("nan")])
def test_budget_out_of_range(budget):
    model = tiny_dit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(dynconvert.BudgetError, match=r"\(0, 1\]"):
        dynconvert.convert(model, budget)
    _unchanged(model, before)


def test_budget_below_the_reachable_minimum_names_it():
    model = tiny_dit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        dynconvert.BudgetError, match=r"minimum this model can reach \((0\.\d+)\)"
    ) as info:
        dynconvert.convert(model, 0.01)
    assert "at least" in str(info.value)
    _unchanged(model, before)


def test_model_without_sites():
    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(4, 4)

        def forward(self, x, t):
            return self.conv(x) + self.fc(x.mean((2, 3)))[:, :, None, None] * t[:, None, None, None]

    model = ConvNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(dynconvert.NoSitesError, match="dynconvert inspect"):
        dynconvert.convert(model, 0.5, example_inputs=(torch.randn(1, 4, 8, 8), torch.ones(1)))
    _unchanged(model, before)


def test_example_inputs_that_do_not_run_the_model():
    model = tiny_dit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = (torch.randn(1, 3, 8, 8), torch.ones(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(
        dynconvert.ExampleInputsError, match="do not run DiT.*exactly as you would call"
    ):
        dynconvert.convert(model, 0.5, example_inputs=bad)
    _unchanged(model, before)
    with pytest.raises(dynconvert.ExampleInputsError, match="tuple of positional"):
        dynconvert.convert(model, 0.5, example_inputs=42)


def test_model_that_cannot_make_inputs_asks_for_them():
    class NoInputs(nn.Module):
        def forward(self, x, t):
            return x

    with pytest.raises(dynconvert.ExampleInputsError, match="pass example_inputs"):
        dynconvert.convert(NoInputs(), 0.5)


def test_converting_twice():
    model = dynconvert.convert(tiny_dit(), 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(dynconvert.AlreadyConvertedError, match="revert"):
        dynconvert.convert(model, 0.5)
    with pytest.raises(dynconvert.AlreadyConvertedError, match="revert"):
        dynconvert.analyze(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_missing_timestep_argument():
    class NoTime(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(dynconvert.TimestepError, match="timestep_arg"):
        dynconvert.convert(NoTime(), 0.5, example_inputs=(torch.randn(1, 2, 4),))


def test_a_prefixed_timestep_name_is_taken_only_when_it_is_one_and_not_x_t():
    def model_with(forward):
        m = nn.Module()
        m.forward = forward
        return m

    assert (
        find_timestep_arg(model_with(lambda tokens, decoder_noise_time: None))
        == "decoder_noise_time"
    )
    for forward in (lambda x_t, noise_level: None, lambda x, a_time, b_time: None):
        with pytest.raises(dynconvert.TimestepError, match="timestep_arg"):
            find_timestep_arg(model_with(forward))


def test_not_converted_and_bad_mode():
    with pytest.raises(dynconvert.NotConvertedError, match="convert"):
        dynconvert.get_state(tiny_dit())
    model = dynconvert.convert(tiny_dit(), 0.5)
    with pytest.raises(dynconvert.ConfigError, match="train, eval, full"):
        dynconvert.set_routing(model, "fast")


def test_unknown_config_key_lists_valid_ones():
    with pytest.raises(
        dynconvert.ConfigError, match="unknown convert config key.*valid keys: .*tau"
    ):
        dynconvert.ConvertConfig.from_dict({"tauu": 1.0})
    with pytest.raises(dynconvert.ConfigError, match="capture"):
        dynconvert.ConvertConfig(capture="magic")
