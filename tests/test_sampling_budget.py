"""Budgets hit at sampling (issue 25, item 1): after the threshold shift, the sampler's calls
spend the target (within 0.01), for token-routed and width-only models, with the width bias
where the token threshold saturates, and per budget for a range model; the run stores it."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import dynconvert
from dynconvert.errors import BudgetError
from dynconvert.flops import last_flops_ratio
from dynconvert.sampling import sample
from dynconvert.sampling.budget import match_budget_grid, match_sampling_budget

pytestmark = pytest.mark.usefixtures("one_thread")


class PatchBlock(nn.Module):
    """A pre-norm transformer block with adaLN shift/scale, attention written out by hand."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.ada = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c).unsqueeze(1).chunk(2, dim=-1)
        b, n, d = x.shape
        h = self.norm1(x) * (1 + scale) + shift
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        w = (q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5).softmax(-1)
        x = x + self.proj((w @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class ToyDiT(nn.Module):
    """A class-conditional pixel DiT: 8x8 one-channel images in 2x2 patches, 2 blocks."""

    def __init__(self, dim: int = 32, classes: int = 4):
        super().__init__()
        self.input_size, self.in_channels, self.num_classes = 8, 1, classes
        self.patch = nn.Conv2d(1, dim, 2, stride=2)
        self.label = nn.Embedding(classes, dim)
        self.time = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(PatchBlock(dim, 4) for _ in range(2))
        self.out = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.time(t.float()[:, None] / 1000) + self.label(y)
        h = self.patch(x).flatten(2).transpose(1, 2)  # (B, 16, D)
        for block in self.blocks:
            h = block(h, c)
        p = self.out(h).transpose(1, 2).reshape(len(x), 4, 4, 4)  # 2x2 pixels per token
        return torch.nn.functional.pixel_shuffle(p, 2)


def _converted(**flags: bool) -> nn.Module:
    torch.manual_seed(0)
    model = ToyDiT().eval()
    inputs = (torch.randn(2, 1, 8, 8), torch.tensor([10, 900]), torch.tensor([0, 1]))
    config = dynconvert.ConvertConfig(token_reduction=4, **flags)  # 8 hidden router units
    model = dynconvert.convert(model, 0.6, example_inputs=inputs, config=config).eval()
    for router in dynconvert.get_state(model).token.values():  # spread logits, as training does
        nn.init.normal_(router.net[0].weight, std=1.0)
        nn.init.normal_(router.net[-1].weight, std=1.0)
    return model


def _sampler_ratio(model: nn.Module, seed: int, n: int = 8) -> float:
    bank, ratios = dynconvert.get_state(model), []

    def probe(done: int, total: int) -> None:
        ratios.append(float(last_flops_ratio(bank).mean()))

    with dynconvert.routing(model, "eval"):
        sample(model, labels=torch.arange(n) % 4, steps=5, seed=seed, cfg_scale=1.0, on_step=probe)
    return sum(ratios) / len(ratios)


def test_token_thresholds_make_the_sampler_spend_the_target():
    model, target = _converted(), 0.7
    labels = torch.arange(8) % 4
    match = match_sampling_budget(model, target, labels=labels, steps=5, seed=1, cfg_scale=1.0)
    assert match.kind == "token" and match.reached and match.rounds >= 1
    assert match.before > target + 0.05  # every token on at first: far over the target
    assert abs(_sampler_ratio(model, seed=1) - target) < 0.01  # the held-out noise
    assert abs(_sampler_ratio(model, seed=7) - target) < 0.03  # other noise: near
    assert json.loads(json.dumps(match.to_dict()))["sampler"]["steps"] == 5


def test_width_thresholds_move_when_no_token_is_routed():
    model = _converted(token_routing=False)
    match = match_sampling_budget(
        model, 0.7, labels=torch.arange(8) % 4, steps=5, seed=1, cfg_scale=1.0
    )
    assert match.kind == "width" and match.shift < 0
    assert abs(_sampler_ratio(model, seed=1) - match.after) < 1e-6
    assert match.after < match.before


def _narrow(model: nn.Module) -> nn.Module:
    """Width routers that switch off every unit but the always-on one: with every token kept
    the model then spends far less than the original, and high targets need the width."""
    with torch.no_grad():
        for router in dynconvert.get_state(model).width.values():
            router.bias.fill_(-1.0)
    return model


def test_width_bias_moves_when_the_token_threshold_saturates():
    model = _narrow(_converted())  # every token kept still spends less than 0.8
    match = match_sampling_budget(
        model, 0.8, labels=torch.arange(8) % 4, steps=5, seed=1, cfg_scale=1.0
    )
    assert match.kind == "token+width" and match.reached and match.width_shift > 0
    assert abs(_sampler_ratio(model, seed=1) - 0.8) < 0.01


def test_a_range_model_spends_each_budget_at_sampling(tmp_path):
    torch.manual_seed(0)
    inputs = (torch.randn(2, 1, 8, 8), torch.tensor([10, 900]), torch.tensor([0, 1]))
    config = dynconvert.ConvertConfig(token_reduction=4)
    model = dynconvert.convert(ToyDiT().eval(), (0.5, 1.0), example_inputs=inputs, config=config)
    for router in dynconvert.get_state(model).token.values():
        nn.init.normal_(router.net[0].weight, std=1.0)
        nn.init.normal_(router.net[-1].weight, std=1.0)
    grid = match_budget_grid(model.eval(), labels=torch.arange(8) % 4, steps=5, cfg_scale=1.0)
    assert grid.reached and [m.budget for m in grid.matches] == [0.5, 0.6, 0.7, 0.8, 0.9]
    shifts = [m.shift for m in grid.matches]
    assert shifts == sorted(shifts) and all(m.kind == "token" for m in grid.matches)
    for b, tol in ((0.5, 0.01), (0.8, 0.01), (0.55, 0.03), (0.83, 0.03), (1.0, 0.0)):
        with dynconvert.budget(model, b):
            assert abs(_sampler_ratio(model, seed=1) - b) <= tol, b
    dynconvert.save(model, tmp_path / "m")
    loaded = dynconvert.load(tmp_path / "m", base_model=ToyDiT()).eval()
    with dynconvert.budget(loaded, 0.55):
        assert abs(_sampler_ratio(loaded, seed=1) - 0.55) <= 0.03
    dynconvert.set_budget(model, 0.55)  # between two grid budgets: the grid fit is the way
    with pytest.raises(BudgetError, match="match_budget_grid"):
        match_sampling_budget(model, 0.55, labels=torch.arange(4), steps=2)
