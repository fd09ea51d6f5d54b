"""Flux 2's fused input projection (issue 20, item 3): one Linear computes q, k, v of every head
and the MLP's gate and value halves; its rows are routed by the attention and the MLP together,
and the MLP's tokens are routed too."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import dynconvert
from dynconvert.config import ConvertConfig
from dynconvert.flops import measure_macs
from dynconvert.runtime.planned import configure_planned
from dynconvert.testing import PATTERN_MODELS, call, randomize_routing
from dynconvert.testing.patterns import HandRMSNorm, mmdit
from dynconvert.testing.patterns.joint import MMDiT
from dynconvert.testing.zoo import ZOO


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _outputs(model, inputs):
    """Masked, fast and planned outputs under random routing (the planned path gathering)."""
    randomize_routing(model, keep=0.5, example_inputs=inputs)
    configure_planned(model, min_gather_rows=0, max_gather_fraction=1.0)
    return [_run(model, inputs, e) for e in ("masked", "fast", "planned")]


def _run(model, inputs, execution):
    with torch.no_grad(), dynconvert.routing(model, "eval", execution):
        return call(model, inputs)


def _fused_pair(plan):
    attn = next(s for s in plan.attention if "fused_in" in s.parts)
    mlp = next(s for s in plan.mlp if s.fc1 == [attn.parts["fused_in"].linear])
    return attn, mlp


def test_the_fused_rows_belong_to_the_heads_and_the_groups():
    model, inputs = PATTERN_MODELS["fused-parallel"]()
    plan = dynconvert.analyze(model, inputs)
    attn, mlp = _fused_pair(plan)
    part = attn.parts["fused_in"]
    # 4 heads of 8 (q, k, v: 96 rows), then the MLP's gate and value halves (2 x 64 rows).
    assert (part.linear, part.rows, part.others) == ("single.0.linear1", 224, [96, 224])
    heads = {i for u in range(attn.units) for i in attn.in_maps[0].indices(u)}
    groups = {i for u in range(mlp.units) for i in mlp.in_maps[0].indices(u)}
    assert heads == set(range(96)) and groups == set(range(96, 224))
    assert (mlp.fc1_offset, mlp.hidden, mlp.gated, mlp.width_attrs) == (
        96,
        64,
        True,
        ["mlp_hidden_dim"],
    )
    assert mlp.token and mlp.token_reason == ""  # x + g * linear2(cat(attn, mlp)): exact
    assert attn.head_attrs == {"num_heads": 1, "hidden_size": 8}
    # The plan round-trips through its JSON form (the saved record).
    assert dynconvert.plan.Plan.from_dict(plan.to_dict()) == plan


@pytest.mark.slow  # the pattern model walks the same path in the default suite (test_patterns)
def test_diffusers_flux2_keeps_the_three_invariants():
    entry = ZOO["flux2"]
    model = entry.build(0)
    inputs = entry.inputs(model, batch=2)
    reference = call(model, inputs)
    dynconvert.convert(model, 0.6, example_inputs=inputs)
    plan = dynconvert.get_state(model).plan
    attn, mlp = _fused_pair(plan)
    assert attn.fast and mlp.fast and mlp.token and not plan.skipped
    assert _rel(call(model, inputs), reference) < 1e-5  # fresh conversion == original
    masked, fast, planned = _outputs(model, inputs)  # two timesteps: per-sample sub-masks
    assert _rel(fast, masked) < 1e-5 and _rel(planned, masked) < 1e-5
    one_t = {**inputs, "timestep": torch.full_like(inputs["timestep"], 0.7)}
    report = dynconvert.count_flops(model, one_t)
    executed = measure_macs(model, one_t) / report.static_macs
    assert report.ratio < 0.9 and abs(executed - report.ratio) <= 0.02 * report.ratio


MLP_ONLY = ConvertConfig(attention_width=False)  # the MLP alone: q, k, v rows in full
ATTENTION_ONLY = ConvertConfig(mlp_width=False, token_routing=False)  # the heads alone


@pytest.mark.parametrize(
    ("config", "fused"),
    [
        pytest.param(MLP_ONLY, True, id="flux2-mlp-only"),
        pytest.param(ATTENTION_ONLY, True, id="flux2-attention-only", marks=pytest.mark.slow),
        # Flux 1: the MLP's columns of the out-projection kept in the input's order.
        pytest.param(MLP_ONLY, False, id="flux1-mlp-only"),
        pytest.param(ATTENTION_ONLY, False, id="flux1-attention-only", marks=pytest.mark.slow),
    ],
)
def test_one_site_of_a_parallel_block_runs_sliced_alone(config, fused):
    model, inputs = mmdit(joint=1, single=1, fused=fused)
    dynconvert.convert(model, 0.9, example_inputs=inputs, config=config)
    plan = dynconvert.get_state(model).plan
    assert len(plan.sites) == (2 if config.attention_width else 3)  # joint.0 and single.0
    masked, fast, planned = _outputs(model, inputs)
    assert _rel(fast, masked) < 1e-5 and _rel(planned, masked) < 1e-5


@pytest.mark.slow
def test_the_token_router_of_a_fused_mlp_learns_through_the_shared_out_projection():
    model, inputs = PATTERN_MODELS["fused-parallel"]()
    dynconvert.convert(model, 0.5, example_inputs=inputs)
    bank = dynconvert.get_state(model)
    _, mlp = _fused_pair(bank.plan)
    model.train()
    dynconvert.set_routing(model, "train")
    call(model, inputs).square().mean().backward()
    grad = bank.token[str(mlp.index)].net[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0


class _InterleavedBlock(nn.Module):
    """q, then the MLP's rows, then k and v: the heads' rows are not one block."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.proj = nn.Linear(dim, 7 * dim)
        self.q_norm, self.k_norm = HandRMSNorm(dim // heads), HandRMSNorm(dim // heads)
        self.out = nn.Linear(3 * dim, dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # noqa: D102
        q, mlp, k, v = self.proj(x).split([self.dim, 4 * self.dim, self.dim, self.dim], -1)
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        h = mlp.chunk(2, -1)
        o = o.transpose(1, 2).reshape(b, n, -1)
        return x + self.out(torch.cat([o, F.silu(h[0]) * h[1]], -1))


def test_rows_of_no_head_between_the_heads_rows_are_refused_with_the_reason():
    _, inputs = mmdit(joint=1, single=1)
    torch.manual_seed(0)
    model = MMDiT(joint=1, single=1, single_block=_InterleavedBlock).eval()
    plan = dynconvert.analyze(model, inputs)
    reasons = [s.reason for s in plan.skipped if s.name.startswith("single")]
    assert any("not heads between the heads' rows" in r for r in reasons), reasons


class _PromptLoopBlock(nn.Module):
    """Mochi 1's attention, written by hand: each sample attends over its image tokens and the
    prompt tokens its mask keeps (``nonzero``), one sample at a time, padded back."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.qkv_txt = nn.Linear(dim, 3 * dim), nn.Linear(dim, 3 * dim)
        self.proj, self.mlp = nn.Linear(dim, dim), nn.Sequential(nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, txt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        outs = []
        for i in range(x.shape[0]):
            keep = mask[i].nonzero().squeeze(-1)  # the sample's prompt tokens: a size from values
            seq = torch.cat([self.qkv(x[i]), self.qkv_txt(txt[i, keep])], 0)  # (N + L, 3D)
            q, k, v = seq.view(seq.shape[0], 3, self.heads, -1).permute(1, 2, 0, 3)
            o = F.scaled_dot_product_attention(q, k, v).transpose(0, 1).flatten(1)
            outs.append(o[:n])
        x = x + self.proj(torch.stack(outs))
        return x + self.mlp(x).chunk(2, -1)[0]


class _PromptLoopModel(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.embed, self.t_embed = nn.Linear(4, dim), nn.Linear(1, dim)
        self.blocks = nn.ModuleList([_PromptLoopBlock(dim, heads)])
        self.out = nn.Linear(dim, 4)

    def forward(self, hidden_states, encoder_hidden_states, timestep, encoder_attention_mask):
        x = self.embed(hidden_states) + self.t_embed(timestep[:, None, None].float())
        for blk in self.blocks:
            x = blk(x, encoder_hidden_states, encoder_attention_mask)
        return self.out(x)


def test_an_attention_over_each_samples_prompt_tokens_is_refused_naming_the_op():
    torch.manual_seed(0)
    model = _PromptLoopModel().eval()
    g = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(2, 6, 4, generator=g),
        "encoder_hidden_states": torch.randn(2, 5, 16, generator=g),
        "timestep": torch.tensor([10.0, 500.0]),
        "encoder_attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool(),
    }
    plan = dynconvert.analyze(model, inputs)
    assert not plan.attention
    reasons = [s.reason for s in plan.skipped if s.name == "blocks.0"]
    assert reasons and "`nonzero` in blocks.0 (_PromptLoopBlock)" in reasons[0], plan.skipped
    assert "depends on the input's values" in reasons[0]
