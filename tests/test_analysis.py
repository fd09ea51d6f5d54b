"""Analysis of models not in the registry, the traps of docs/architecture.md, the fx fallback."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynconvert
from dynconvert.config import ConvertConfig
from dynconvert.testing import TINY_BUILDERS, randomize_routing


class ToyAttention(nn.Module):
    """Self-attention written by hand, with options for the traps of docs/architecture.md."""

    def __init__(self, dim, heads, trap=None):
        super().__init__()
        self.n_heads, self.trap = heads, trap
        kv_heads = 1 if trap == "gqa" else heads
        self.hd = dim // heads
        self.wq = nn.Linear(dim, dim)
        self.wk = nn.Linear(dim, kv_heads * self.hd)
        self.wv = nn.Linear(dim, kv_heads * self.hd)
        self.wo = nn.Linear(dim, dim)
        self.qnorm = trap == "qknorm_all"  # inline, over all heads: no module to cut after

    def forward(self, x):
        b, n, c = x.shape
        q = self.wq(x)
        if self.qnorm:
            q = F.layer_norm(q, (c,))
        q = q.view(b, n, self.n_heads, self.hd).transpose(1, 2)
        k = self.wk(x).view(b, n, -1, self.hd).transpose(1, 2)
        v = self.wv(x).view(b, n, -1, self.hd).transpose(1, 2)
        if self.trap == "rope_per_head":  # a rotary table that differs per head
            ang = (
                torch.arange(n, dtype=x.dtype)[None, :, None]
                * torch.arange(1.0, self.n_heads + 1)[:, None, None]
            )
            q = q * torch.cos(ang / 10.0) + q.flip(-1) * torch.sin(ang / 10.0)
        o = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.trap == "gqa")
        if self.trap == "reshape_with_c":
            return self.wo(o.transpose(1, 2).reshape(b, n, c))
        return self.wo(o.transpose(1, 2).reshape(b, n, -1))


class ToyBlock(nn.Module):
    def __init__(self, dim, heads, trap=None):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = ToyAttention(dim, heads, trap)
        self.w1, self.w3, self.w2 = (
            nn.Linear(dim, 2 * dim),
            nn.Linear(dim, 2 * dim),
            nn.Linear(2 * dim, dim),
        )
        self.post = nn.LayerNorm(dim) if trap == "norm_after_mlp" else None

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        m = self.w2(F.silu(self.w1(h)) * self.w3(h))  # SwiGLU with two input projections
        return x + (self.post(m) if self.post is not None else m)


class ToyDiT(nn.Module):
    """A DiT-like model nobody wrote a registry entry for."""

    def __init__(self, dim=32, heads=4, depth=2, trap=None):
        super().__init__()
        self.inp = nn.Linear(4, dim)
        self.blocks = nn.ModuleList([ToyBlock(dim, heads, trap) for _ in range(depth)])
        self.out = nn.Linear(dim, 4)

    def forward(self, x, time):
        h = self.inp(x) + torch.sin(time[:, None, None] / 100.0)
        for blk in self.blocks:
            h = blk(h)
        return self.out(h)


def toy_inputs(batch=2):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 16, 4, generator=g), torch.tensor([100.0, 800.0][:batch]))


def test_generic_model_sites_found_and_fast_path_verified():
    torch.manual_seed(0)
    model, inputs = ToyDiT().eval(), toy_inputs()
    reference = model(*inputs)
    dynconvert.convert(model, 0.5, example_inputs=inputs)
    plan = dynconvert.get_state(model).plan
    assert plan.timestep_arg == "time"
    assert [s.name for s in plan.attention] == ["blocks.0.attn", "blocks.1.attn"]
    assert all(a.head_attrs == {"n_heads": 1} and a.fast for a in plan.attention)
    assert all("verified" in a.fast_reason for a in plan.attention)
    mlp = plan.mlp[0]
    assert mlp.gated and mlp.fc1 == ["blocks.0.w1", "blocks.0.w3"] and mlp.groups == 4 and mlp.token
    torch.testing.assert_close(model(*inputs), reference, atol=1e-5, rtol=0)
    randomize_routing(model, keep=0.5, example_inputs=inputs)
    with dynconvert.routing(model, "eval", "masked"):
        masked = model(*inputs)
    torch.testing.assert_close(model(*inputs), masked, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("trap", "reason"),
    [
        ("gqa", "one key/value unit for all 4 query heads"),  # 2 or more: routed (test_patterns)
        ("qknorm_all", "qk-norm across all heads"),
        ("rope_per_head", "differs per head"),
    ],
)
def test_attention_traps_are_refused_with_a_reason(trap, reason):
    torch.manual_seed(0)
    model = ToyDiT(trap=trap).eval()
    inputs = toy_inputs()
    reference = model(*inputs)
    plan = dynconvert.analyze(model, inputs)
    assert plan.attention == []
    skipped = [s for s in plan.skipped if s.kind == "attention"]
    assert len(skipped) == 2 and all(reason in s.reason for s in skipped), skipped
    # The block still has attention, refused or not: its MLP is a transformer MLP and converts.
    assert [m.name for m in plan.mlp] == ["blocks.0", "blocks.1"]
    dynconvert.convert(model, 0.8, example_inputs=inputs)
    torch.testing.assert_close(model(*inputs), reference, atol=1e-5, rtol=0)


def test_norm_after_mlp_rules_out_token_routing():
    torch.manual_seed(0)
    plan = dynconvert.analyze(ToyDiT(trap="norm_after_mlp").eval(), toy_inputs())
    assert len(plan.mlp) == 2
    assert all(not m.token and "layer_norm" in m.token_reason for m in plan.mlp)
    assert all(m.width for m in plan.mlp)


def test_reshape_with_input_width_is_not_converted_after_the_check():
    torch.manual_seed(0)
    model, inputs = ToyDiT(trap="reshape_with_c").eval(), toy_inputs()
    reference = model(*inputs)
    dynconvert.convert(model, 0.5, example_inputs=inputs)
    plan = dynconvert.get_state(model).plan
    # The sliced path differs (the module reshapes with its input width): routing these heads
    # would save nothing, so they are left out, with the reason; the MLPs stay converted.
    assert plan.attention == [] and [m.index for m in plan.mlp] == [0, 1]
    skipped = [s for s in plan.skipped if s.kind == "attention"]
    assert len(skipped) == 2 and all("did not reproduce" in s.reason for s in skipped)
    torch.testing.assert_close(model(*inputs), reference, atol=1e-5, rtol=0)
    randomize_routing(model, keep=0.5, example_inputs=inputs)
    with dynconvert.routing(model, "eval", "masked"):
        masked = model(*inputs)
    torch.testing.assert_close(model(*inputs), masked)  # eval runs masked for these sites


def test_timm_scale_norm_before_out_projection_is_refused():
    from timm.models.vision_transformer import Attention

    class Blk(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention(32, 4, scale_norm=True, norm_layer=nn.LayerNorm)

        def forward(self, x, t):
            return x + self.attn(x + t[:, None, None])

    plan = dynconvert.analyze(Blk().eval(), (torch.randn(2, 8, 32), torch.tensor([1.0, 2.0])))
    assert plan.attention == [] and "norm over all heads" in plan.skipped[0].reason


@pytest.mark.parametrize("name", [pytest.param("dit", marks=pytest.mark.slow), "uvit"])
def test_fx_fallback_finds_the_same_plan(name):
    model = TINY_BUILDERS[name]()
    by_export = dynconvert.analyze(model)
    by_fx = dynconvert.analyze(model, config=ConvertConfig(capture="fx"))
    assert by_export.capture == "torch.export" and by_fx.capture == "torch.fx"

    def key(p):
        return [
            (
                s.name,
                type(s).__name__,
                s.units,
                [m.parts for m in s.in_maps],
                s.out_map.parts,
                getattr(s, "token", None),
            )
            for s in p.sites
        ]

    assert key(by_fx) == key(by_export)
    assert by_fx.static_macs == by_export.static_macs
    assert "traced" in by_fx.coverage


def test_fx_fallback_converts_and_runs():
    model = TINY_BUILDERS["uvit"]()
    inputs = model.example_inputs(batch_size=2)
    reference = model(*inputs)
    dynconvert.convert(model, 0.5, config=ConvertConfig(capture="fx"))
    torch.testing.assert_close(model(*inputs), reference, atol=1e-5, rtol=0)


def test_filter_fn_and_exclude_leave_sites_out():
    model = TINY_BUILDERS["dit"]()
    plan = dynconvert.analyze(model, filter_fn=lambda m, name: not name.startswith("blocks.1"))
    assert [s.name for s in plan.sites] == ["blocks.0.attn", "blocks.0.mlp"]
    assert {s.reason for s in plan.skipped} == {"excluded by filter_fn"}
    plan = dynconvert.analyze(model, config=ConvertConfig(exclude=[r"blocks\.0\.mlp"]))
    assert "blocks.0.mlp" not in [s.name for s in plan.sites]


def test_mlp_groups_configurable_and_always_on_by_importance():
    model = TINY_BUILDERS["dit"]()
    with torch.no_grad():  # make head 1 of block 0 clearly the most important
        model.blocks[0].attn.proj.weight[:, 16:] *= 10
    dynconvert.convert(model, 0.5, config=ConvertConfig(mlp_groups=8))
    bank = dynconvert.get_state(model)
    assert bank.plan.mlp[0].groups == 8 and bank.width["1"].out_features == 8
    assert int(bank.always_on[0]) == 1
    assert math.isclose(bank.plan.attention[0].macs(), bank.plan.attention[1].macs())


def test_importance_is_pluggable_and_magnitude_is_the_weight_norm():
    from dynconvert.analysis.importance import magnitude, unit_weights

    model = TINY_BUILDERS["dit"]()
    modules = dict(model.named_modules())
    for site in dynconvert.analyze(model).sites:
        linears = {m.linear: modules[m.linear] for m in [*site.in_maps, site.out_map]}
        norms = torch.stack([w.double().pow(2).sum().sqrt() for w in unit_weights(site, linears)])
        torch.testing.assert_close(magnitude(site, linears), norms, rtol=1e-5, atol=0)

    def last_unit(site, linears):
        return torch.arange(site.in_maps[0].units, dtype=torch.float32)

    dynconvert.convert(model, 0.5, config=ConvertConfig(importance=last_unit))
    bank = dynconvert.get_state(model)
    assert bank.always_on.tolist() == [s.units - 1 for s in bank.plan.sites]


class _ViewedAttention(nn.Module):
    """Attention whose output is ``view``ed after the transpose: legal because the kernel returns
    (B, H, N, d) laid out as (B, N, H, d) when q, k, v come from one permuted qkv."""

    def __init__(self, width: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_width = n_heads, width // n_heads
        self.to_qkv, self.proj_out = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.to_qkv(x).reshape(b, n, 3, self.n_heads, self.head_width)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj_out(out.transpose(1, 2).view(b, n, -1))


class _ViewedNet(nn.Module):
    def __init__(self, width: int = 32, n_heads: int = 4):
        super().__init__()
        self.width = width
        self.t_proj = nn.Linear(width, width)
        self.norms = nn.ModuleList([nn.LayerNorm(width), nn.LayerNorm(width)])
        self.attn = _ViewedAttention(width, n_heads)
        self.ff = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        half = self.width // 2
        freqs = torch.exp(-math.log(1e4) * torch.arange(half, dtype=torch.float32) / half)
        ang = timestep.float()[:, None] * freqs
        c = self.t_proj(torch.cat([ang.cos(), ang.sin()], -1))[:, None]
        x = hidden_states + self.attn(self.norms[0](hidden_states) + c)
        return x + self.ff(self.norms[1](x))


def test_an_output_viewed_after_its_transpose_converts():
    # The replay on index tensors laid them out plainly, and view refused (issue 23, item 7).
    model = _ViewedNet().eval()
    inputs = {"hidden_states": torch.randn(2, 16, 32), "timestep": torch.tensor([100.0, 800.0])}
    with torch.no_grad():
        reference = model(**inputs)
    dynconvert.convert(model, 0.6, example_inputs=inputs)
    assert [a.name for a in dynconvert.get_state(model).plan.attention if a.fast] == ["attn"]
    randomize_routing(model, keep=0.5, example_inputs=inputs)
    with torch.no_grad():
        with dynconvert.routing(model, "full"):
            torch.testing.assert_close(model(**inputs), reference, atol=0, rtol=0)
        with dynconvert.routing(model, "eval", "masked"):
            masked = model(**inputs)
        with dynconvert.routing(model, "eval", "fast"):
            torch.testing.assert_close(model(**inputs), masked, atol=1e-5, rtol=1e-5)
        assert float(dynconvert.last_flops_ratio(model).min()) < 1.0  # heads really sliced
