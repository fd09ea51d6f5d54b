"""Model adapters: auto selection by class, how each family is called, label policies, and short
calibrations of converted diffusers DiT and PixArt models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import dynconvert
from dynconvert.calibration import CalibrationConfig, calibrate
from dynconvert.calibration.adapters import (
    LabelPolicy,
    drop_labels,
    generic_adapter,
    resolve_labels,
    select_adapter,
)
from dynconvert.errors import ConfigError, DataError
from dynconvert.testing import tiny_diffusers_dit, tiny_dit, tiny_pixart, tiny_uvit

pytestmark = pytest.mark.usefixtures("one_thread")


class Eps(nn.Module):
    """A toy eps model with diffusers-style keyword names."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, sample, timestep, class_labels=None):
        return (
            self.conv(sample)
            + timestep.float().reshape(-1, 1, 1, 1) * 0
            + (class_labels is not None),
        )


@pytest.mark.slow  # builds several diffusers classes (3-4 s)
def test_auto_selection_by_class():
    assert select_adapter(tiny_dit()).name == "dit"
    assert select_adapter(tiny_uvit()).name == "uvit"
    assert select_adapter(tiny_diffusers_dit()).name == "diffusers_dit"
    assert select_adapter(tiny_pixart()).name == "pixart"
    assert select_adapter(Eps()).name == "generic"
    assert select_adapter(tiny_dit(), "generic").name == "generic"  # overridable


def test_generic_adapter_guesses_and_maps_names():
    model = Eps()
    ad = select_adapter(model)
    assert ad.extra["kwargs"] == {"x": "sample", "t": "timestep", "y": "class_labels"}
    x, t = torch.randn(2, 4, 2, 2), torch.tensor([1, 2])
    out = ad(model, x, t, {"x": x, "y": torch.tensor([0, 1])})
    assert torch.allclose(out, model.conv(x) + 1)  # tuple output -> first tensor; labels passed
    custom = generic_adapter(model, {"x": "sample", "t": "timestep", "y": None})
    assert torch.allclose(custom(model, x, t, {"x": x}), model.conv(x))

    class Odd(nn.Module):
        def forward(self, inp, noise_level):
            return inp

    with pytest.raises(ConfigError, match="adapter_args"):
        select_adapter(Odd())
    odd = select_adapter(Odd(), "generic", {"x": "inp", "t": "noise_level"})
    assert torch.equal(odd(Odd(), x, t, {"x": x}), x)


@pytest.mark.slow  # 4-5 s; the short calibrations of both classes run in the default set
def test_diffusers_dit_and_pixart_calls_return_learned_sigma():
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    dit = tiny_diffusers_dit()
    out = select_adapter(dit)(dit, x, t, {"x": x, "y": torch.tensor([1, 2])})
    assert out.shape == (2, 8, 8, 8)
    pix = tiny_pixart()
    batch = {"x": x, "cond": torch.randn(2, 5, 12), "cond_mask": torch.ones(2, 5, dtype=torch.long)}
    assert select_adapter(pix)(pix, x, t, batch).shape == (2, 8, 8, 8)
    with pytest.raises(DataError, match="cond"):
        select_adapter(pix)(pix, x, t, {"x": x})


def test_label_policies():
    cfg = CalibrationConfig(target=0.5)
    dit = tiny_dit()
    assert resolve_labels(dit, select_adapter(dit), cfg) == LabelPolicy(10, 10, 0.1, True)
    ddit = tiny_diffusers_dit()
    assert resolve_labels(ddit, select_adapter(ddit), cfg) == LabelPolicy(10, 10, 0.1, True)
    uvit = tiny_uvit()  # 11 labels, no known null label: no dropout unless configured
    assert resolve_labels(uvit, select_adapter(uvit), cfg) == LabelPolicy(11, None, 0.0, True)
    over = CalibrationConfig(target=0.5, null_label=10, label_dropout=0.1)
    assert resolve_labels(uvit, select_adapter(uvit), over) == LabelPolicy(10, 10, 0.1, True)
    uncond = tiny_uvit(num_classes=-1)
    assert not resolve_labels(uncond, select_adapter(uncond), cfg).uses_labels
    with pytest.raises(ConfigError, match="null_label"):
        resolve_labels(
            Eps(), select_adapter(Eps()), CalibrationConfig(target=0.5, label_dropout=0.1)
        )
    torch.manual_seed(0)
    y = drop_labels(torch.zeros(4000, dtype=torch.long), LabelPolicy(10, 10, 0.25))
    assert set(y.unique().tolist()) == {0, 10}
    assert abs((y == 10).float().mean().item() - 0.25) < 0.03


@pytest.mark.parametrize("builder", [tiny_diffusers_dit, tiny_pixart])
def test_short_calibration_of_diffusers_models(builder):
    model = dynconvert.convert(builder(), budget=0.5)
    g = torch.Generator().manual_seed(0)
    data = {"x": torch.randn(16, 4, 8, 8, generator=g)}
    if builder is tiny_pixart:
        data["cond"] = torch.randn(16, 5, 12, generator=g)
        data["cond_mask"] = torch.ones(16, 5, dtype=torch.long)
    else:
        data["y"] = torch.randint(0, 10, (16,), generator=g)
    result = calibrate(model, data, CalibrationConfig(target=0.5, steps=3, batch_size=8, lr=1e-3))
    assert len(result.losses) == 3 and all(math.isfinite(v) for v in result.losses)
    assert result.last_terms["vb"] > 0  # learned sigma: the VB term is on
