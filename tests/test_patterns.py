"""Patterns of today's diffusion transformers, on small models nobody registered (issue 9).

Each pattern model converts with its sites found from the graph, and keeps the three
invariants: a fresh conversion computes the original; the fast path equals the masked path
under random routing; the executed MACs equal the analytic count.
"""

import pytest
import torch

import dynconvert
from dynconvert.flops import measure_macs
from dynconvert.testing import PATTERN_MODELS, randomize_routing

EXPECTED = {  # name -> (attention sites, MLP sites, streams of the first attention)
    "rotary-rotate-half": (2, 2, 1),
    "rotary-interleaved": (2, 2, 1),
    "rotary-complex": (2, 2, 1),
    "rotary-table-manual": (2, 2, 1),
    "rotary-matrix": (2, 2, 1),
    "qknorm-all-heads": (2, 2, 1),
    "gqa-repeat-kv": (2, 2, 1),
    "gqa-enable-gqa": (2, 2, 1),
    "gated-gqa": (2, 2, 1),
    "gated-per-head": (2, 2, 1),
    "conv-mlp": (2, 2, 1),
    "sana-like": (2, 2, 1),
    "mmdit": (3, 5, 2),
    "mmdit-shared-mlp": (3, 3, 2),
    "fused-parallel": (3, 4, 2),
    "video": (2, 2, 1),
    "video-own-projections": (2, 2, 1),
    "kv-conv-norm": (2, 2, 1),
    "kv-uniform": (2, 2, 1),
    "kv-nearest": (2, 2, 1),
    "kv-pool": (2, 2, 1),
    "kv-reduce-input": (2, 2, 1),
    "rotary-wide-table": (2, 2, 1),
    "rotary-wide-table-norm-all": (2, 2, 1),
    "folded-heads": (2, 2, 1),
    "folded-heads-key-first": (2, 2, 1),
    "context-kv": (2, 2, 2),
    "kernel": (2, 2, 1),
}


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# Variants whose path another default test already walks (same finder, same runtime): their
# invariant runs are slow tests, to keep the default suite under three minutes.
SLOW_VARIANTS = {
    "kv-nearest", "kv-pool", "rotary-wide-table-norm-all", "folded-heads-key-first",
    "gqa-enable-gqa", "gated-gqa", "mmdit-shared-mlp", "video-own-projections", "kv-reduce-input",
    "conv-mlp", "rotary-table-manual",
}  # fmt: skip


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if n in SLOW_VARIANTS else n
        for n in sorted(EXPECTED)
    ],
)
def test_pattern_model_converts_and_keeps_the_invariants(name):
    model, inputs = PATTERN_MODELS[name]()
    reference = model(**inputs)
    dynconvert.convert(model, 0.85, example_inputs=inputs)
    plan = dynconvert.get_state(model).plan
    n_attn, n_mlp, streams = EXPECTED[name]
    assert (len(plan.attention), len(plan.mlp)) == (n_attn, n_mlp), plan.skipped
    if n_attn:
        assert 1 + len(plan.attention[0].streams) == streams
    assert _rel(model(**inputs), reference) < 1e-5  # fresh conversion == original
    randomize_routing(model, keep=0.5, example_inputs=inputs)
    with dynconvert.routing(model, "eval", "masked"):
        masked = model(**inputs)
    assert _rel(model(**inputs), masked) < 1e-5  # fast path == masked path
    assert all(s.fast for s in plan.sites), [(s.name, s.fast_reason) for s in plan.sites]
    # Executed == analytic with the whole batch at one timestep (as pipelines call it).
    one_t = {**inputs, "timestep": torch.full_like(inputs["timestep"], 700.0)}
    report = dynconvert.count_flops(model, one_t)
    executed = measure_macs(model, one_t) / report.static_macs
    assert report.ratio < 0.95
    assert abs(executed - report.ratio) <= 0.02 * report.ratio, (executed, report.ratio)


def test_qk_norm_across_all_heads_gives_an_exact_partial_site():
    model, inputs = PATTERN_MODELS["qknorm-all-heads"]()
    plan = dynconvert.analyze(model, inputs)
    site = plan.attention[0]
    # q and k (and their norms) run in full; the norms' outputs are cut to the active heads.
    assert site.unsliced == ["layers.0.attn.to_k", "layers.0.attn.to_q"]
    assert sorted(m.linear for m in site.cut_maps) == [
        "layers.0.attn.k_norm",
        "layers.0.attn.q_norm",
    ]
    assert [m.linear for m in site.in_maps] == ["layers.0.attn.to_v"]
    # Only the unsliced projections are counted as fixed: the rest scales with the heads.
    full = dynconvert.flops.site_cost(site, width=1.0)
    none = dynconvert.flops.site_cost(site, width=0.0)
    assert none.dynamic == site.fixed_macs() == 2 * 16 * 32 * 32 and full.dynamic == site.macs()


def test_joint_and_parallel_sites_route_every_stream_and_keep_the_mlp_columns():
    model, inputs = PATTERN_MODELS["mmdit"]()
    plan = dynconvert.analyze(model, inputs)
    joint = plan.attention[0]
    assert {m.linear for m in joint.in_maps} == {
        f"joint.0.attn.{p}{r}" for p in ("", "txt_") for r in "qkv"
    }
    assert {m.linear for m in joint.out_maps} == {"joint.0.attn.o", "joint.0.attn.txt_o"}
    single = plan.attention[2]
    assert single.name == "single.0" and single.out == "single.0.out"
    # The fused out-projection reads concat(attention 32, MLP hidden 64): the MLP columns stay.
    assert single.out_map.keep == list(range(32, 96))
    # ... and its MLP owns those: channel groups of mlp_in's rows and of out's columns 32..95,
    # no token routing (the projection also carries the attention's update).
    mlp = next(m for m in plan.mlp if m.name == "single.0")
    assert (mlp.fc1, mlp.fc2, mlp.fc2_offset, mlp.width, mlp.token) == (
        ["single.0.mlp_in"],
        "single.0.out",
        32,
        True,
        False,
    )
    assert mlp.out_map.indices(0) == list(
        range(32, 32 + 64 // mlp.groups)
    ) and mlp.out_map.keep == list(range(32))
    assert sum(s.macs() for s in plan.sites) + plan.other_macs / plan.batch == pytest.approx(
        plan.static_macs / plan.batch
    )


def test_video_rows_map_to_their_sample_and_linear_subclasses_stay_themselves():
    from dynconvert.testing.patterns import CustomLinear

    model, inputs = PATTERN_MODELS["video"]()
    plan = dynconvert.analyze(model, inputs)
    assert [s.fold for s in plan.sites] == [3, 3, 8, 8]  # 3 frames, then 8 tokens per sample
    dynconvert.convert(model, 0.85, example_inputs=inputs)
    qkv = model.blocks[0].spatial.qkv
    assert isinstance(qkv, CustomLinear) and qkv.tag == "custom"
    dynconvert.revert(model)
    assert type(qkv) is CustomLinear


def test_timestep_convention_is_inferred_stated_and_a_wrong_guess_is_visible():
    from dynconvert.testing.zoo import ZOO

    # DDPM scale by default, said so in the plan.
    model, inputs = PATTERN_MODELS["rotary-rotate-half"]()
    plan = dynconvert.analyze(model, inputs)
    assert (plan.timestep_scale, plan.timestep_reverse) == (1.0, False)
    assert "DDPM" in plan.timestep_convention
    # Example timesteps that are fractions in [0, 1]: sigma, read x 1000.
    sigma_inputs = {**inputs, "timestep": torch.tensor([0.25, 0.8])}
    plan = dynconvert.analyze(model, sigma_inputs)
    assert plan.timestep_scale == 1000.0 and "inferred from the example" in plan.timestep_convention
    # A class whose pipelines pass sigma: known, whatever the example inputs hold.
    flux = ZOO["flux"].build(0)
    plan = dynconvert.analyze(flux, ZOO["flux"].inputs(flux))
    assert plan.timestep_scale == 1000.0 and "Flux" in plan.timestep_convention
    # The user's setting wins.
    cfg = dynconvert.ConvertConfig(timestep_scale=2.0, timestep_reverse=True)
    plan = dynconvert.analyze(model, inputs, config=cfg)
    assert (plan.timestep_scale, plan.timestep_reverse) == (2.0, True)
    # Converted on DDPM's scale, then called with sigmas: one warning naming the fix.
    dynconvert.convert(model, 0.85, example_inputs=inputs)
    with pytest.warns(UserWarning, match="timestep_scale"):
        model(**sigma_inputs)


class EinsumAttention(torch.nn.Module):
    """Attention written with einsum, in another codebase's style."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.h, self.qkv, self.o = heads, torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, -1).permute(2, 0, 3, 1, 4)
        w = torch.einsum("bhid,bhjd->bhij", q, k).mul(0.5).softmax(-1)
        return self.o(torch.einsum("bhij,bhjd->bhid", w, v).transpose(1, 2).reshape(b, n, -1))


class ConvBlock(torch.nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.conv = torch.nn.Conv1d(dim, dim, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x.transpose(1, 2)).transpose(1, 2)


class Stack(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.blocks = torch.nn.ModuleList([block() for _ in range(2)])

    def forward(self, x, timestep):
        for b in self.blocks:
            x = x + b(x)
        return x


def test_einsum_attention_converts_and_nothing_found_says_why_per_block():
    inputs = (
        torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(0)),
        torch.tensor([500.0, 500.0]),
    )
    torch.manual_seed(0)
    model = Stack(EinsumAttention).eval()
    reference = model(*inputs)
    dynconvert.convert(model, 0.7, example_inputs=inputs)
    assert [s.name for s in dynconvert.get_state(model).plan.attention] == ["blocks.0", "blocks.1"]
    assert _rel(model(*inputs), reference) < 1e-5
    randomize_routing(model, keep=0.5, example_inputs=inputs)
    with dynconvert.routing(model, "eval", "masked"):
        masked = model(*inputs)
    assert _rel(model(*inputs), masked) < 1e-5
    # Blocks with no attention and no MLP: the plan says, per block, what it saw.
    plan = dynconvert.analyze(Stack(ConvBlock).eval(), inputs)
    assert [s.name for s in plan.skipped] == ["blocks.0", "blocks.1"]
    assert all("no attention call" in s.reason and "0 Linears" in s.reason for s in plan.skipped)


def test_an_mlp_shared_by_two_streams_is_routed_over_both_calls():
    model, inputs = PATTERN_MODELS["mmdit-shared-mlp"]()
    plan = dynconvert.analyze(model, inputs)
    shared = [s for s in plan.mlp if s.name.endswith(".ff")]
    assert len(shared) == 2, plan.skipped
    for s in shared:
        # Sliced SwiGLU halves: one fused projection, gated; 16 image + 6 text tokens.
        assert (s.calls, s.tokens, s.gated, s.fc1) == (2, 22, True, [s.name + ".proj_in"])
        assert s.width and s.token, s.token_reason  # x + g * ff(x) holds in both streams
    model2, _ = PATTERN_MODELS["mmdit-shared-mlp"]()
    dynconvert.convert(model2, 0.85, example_inputs=inputs)
    randomize_routing(model2, keep=0.5, example_inputs=inputs)
    bank = dynconvert.get_state(model2)
    index = next(s.index for s in bank.plan.mlp if s.name.endswith(".ff"))
    for execution in ("fast", "masked", "planned"):
        with torch.no_grad(), dynconvert.routing(model2, "eval", execution):
            model2(**inputs)
        rec = bank.records[index]
        # Both calls counted: 16 image + 6 text tokens, one token mask over both, per sample.
        assert rec["n"] == 22 and tuple(rec["tokens"].shape) == (2, 22), execution
        if execution == "planned":
            assert 0 < rec["executed_tokens"] <= 1
    with torch.no_grad(), dynconvert.routing(model2, "eval", "fast"):
        fast = model2(**inputs)
    with torch.no_grad(), dynconvert.routing(model2, "eval", "planned"):
        planned = model2(**inputs)
    assert _rel(planned, fast) < 1e-5  # capacities from randomize_routing suffice


@pytest.mark.parametrize("name", ["gqa-repeat-kv", "gqa-enable-gqa"])
def test_grouped_query_attention_routes_key_value_groups(name):
    model, inputs = PATTERN_MODELS[name]()
    site = dynconvert.analyze(model, inputs).attention[0]
    # 4 query heads of 8 channels, 2 key/value heads: a unit is one kv head + 2 query heads.
    assert (site.heads, site.kv_heads, site.units, site.group) == (4, 2, 2, 2)
    rows = {m.linear.rsplit(".", 1)[-1]: [m.indices(u) for u in range(2)] for m in site.in_maps}
    assert rows["wq"] == [list(range(0, 16)), list(range(16, 32))]
    assert rows["wk"] == rows["wv"] == [list(range(0, 8)), list(range(8, 16))]
    assert [site.out_map.indices(u) for u in range(2)] == [list(range(0, 16)), list(range(16, 32))]
    assert site.head_attrs == {"n_heads": 2, "n_kv_heads": 1}


@pytest.mark.parametrize(("name", "per_unit"), [("gated-gqa", 16), ("gated-per-head", 1)])
def test_an_output_gate_is_sliced_with_its_heads(name, per_unit):
    model, inputs = PATTERN_MODELS[name]()
    site = dynconvert.analyze(model, inputs).attention[0]
    gate = next(m for m in site.in_maps if m.linear.endswith("to_gate"))
    assert site.gate == gate.linear and site.gate_in == 32
    # Per channel with 2 key/value groups: 16 rows a unit; per head (4 heads): 1 row a unit.
    assert [gate.indices(u) for u in range(site.units)] == [
        list(range(u * per_unit, (u + 1) * per_unit)) for u in range(site.units)
    ]


def test_hand_written_projections_are_routed_saved_and_restored(tmp_path):
    from dynconvert.testing.patterns import Dense, ScaledDense, video_dit

    model, inputs = video_dit(linear=Dense)
    reference = model(**inputs)
    dynconvert.convert(model, 0.85, example_inputs=inputs)
    qkv = model.blocks[0].spatial.qkv
    assert isinstance(qkv, Dense) and "in_features=32, out_features=96" in repr(qkv)
    randomize_routing(model, keep=0.5, example_inputs=inputs)
    routed = model(**inputs)
    dynconvert.save(model, tmp_path / "run")
    loaded = dynconvert.load(tmp_path / "run", video_dit(linear=Dense)[0])
    assert _rel(loaded(**inputs), routed) < 1e-6
    dynconvert.revert(model)
    assert type(model.blocks[0].spatial.qkv) is Dense
    assert _rel(model(**inputs), reference) < 1e-6
    # A projection that computes more than F.linear on its weight is left alone, with a reason.
    scaled, inputs = video_dit(linear=ScaledDense)
    plan = dynconvert.analyze(scaled, inputs)
    assert not plan.attention and not plan.mlp
    assert any("not an nn.Linear" in s.reason for s in plan.skipped), plan.skipped


class _MaskedAttention(torch.nn.Module):
    """Self-attention with a padding mask repeated per head: inside, with its own head count
    (as diffusers' prepare_attention_mask does), or given ready-made by the caller."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, x, keep, mask=None):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if mask is None:
            mask = keep[:, None, None, :].expand(b, self.heads, n, n)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(o.transpose(1, 2).reshape(b, n, -1))


class _MaskedBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _MaskedAttention()
        self.ff = torch.nn.Sequential(
            torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32)
        )

    def forward(self, h, keep, mask):
        h = h + self.attn(h, keep, mask)
        return h + self.ff(h)


class _MaskedDiT(torch.nn.Module):
    def __init__(self, outside: bool):
        super().__init__()
        self.outside = outside
        self.t = torch.nn.Linear(1, 32)
        self.blocks = torch.nn.ModuleList([_MaskedBlock() for _ in range(2)])

    def forward(self, hidden_states, timestep, keep):
        h = hidden_states + self.t(timestep[:, None, None] / 1000)
        b, n, _ = h.shape
        mask = keep[:, None, None, :].expand(b, 4, n, n) if self.outside else None
        for blk in self.blocks:
            h = blk(h, keep, mask)
        return h


@pytest.mark.parametrize("outside", [False, True])
def test_a_mask_given_per_head_is_checked_at_convert(outside):
    torch.manual_seed(0)
    model = _MaskedDiT(outside).eval()
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[0, 6:] = False
    inputs = {
        "hidden_states": torch.randn(2, 8, 32),
        "timestep": torch.tensor([100.0, 700.0]),
        "keep": keep,
    }
    reference = model(**inputs)
    dynconvert.convert(model, 0.9, example_inputs=inputs)
    plan = dynconvert.get_state(model).plan
    assert _rel(model(**inputs), reference) < 1e-5
    if outside:  # built with every head outside the module: the sliced call cannot take it
        assert not plan.attention and len(plan.mlp) == 2
        assert all("did not reproduce" in s.reason for s in plan.skipped if s.kind == "attention")
    else:  # built inside with the lowered head count: converted and sliced
        assert len(plan.attention) == 2 and all(s.fast for s in plan.attention)
        randomize_routing(model, keep=0.5, example_inputs=inputs)
        with dynconvert.routing(model, "eval", "masked"):
            masked = model(**inputs)
        assert _rel(model(**inputs), masked) < 1e-5


def test_a_convolutional_mlp_routes_its_channel_groups():
    model, inputs = PATTERN_MODELS["conv-mlp"]()
    site = dynconvert.analyze(model, inputs).mlp[0]
    # 1x1 conv to 2 x 64 channels, a 3x3 depthwise conv over all of them, chunk, 1x1 conv back.
    assert site.conv and site.gated and (site.hidden, site.groups, site.tokens) == (64, 4, 16)
    assert site.fc1 == ["layers.0.ff.inverted"] and site.fc2 == "layers.0.ff.point"
    assert [m.linear for m in site.mid_maps] == ["layers.0.ff.depth"] and site.mid_taps == 9
    assert site.mid_maps[0].indices(1) == [*range(16, 32), *range(80, 96)]  # value and gate rows
    assert site.width and not site.token and "neighbouring tokens" in site.token_reason
    reference = model(**inputs)
    dynconvert.convert(model, 0.85, example_inputs=inputs)
    randomize_routing(model, keep=0.5, example_inputs=inputs)
    with dynconvert.routing(model, "eval", "planned"):
        planned = model(**inputs)
    with dynconvert.routing(model, "eval", "fast"):
        fast = model(**inputs)
    assert _rel(planned, fast) < 1e-5
    dynconvert.revert(model)
    assert type(model.layers[0].ff.depth) is torch.nn.Conv2d
    assert _rel(model(**inputs), reference) < 1e-6


def test_linear_attention_is_a_site_counted_linearly_in_tokens():
    model, inputs = PATTERN_MODELS["sana-like"]()
    site = dynconvert.analyze(model, inputs).attention[0]
    # 4 heads of 8 channels; (v + ones row) @ k then @ q: 2 * H * (d + 1) * d * N per sample.
    assert (site.heads, site.head_dim, site.v_head_dim) == (4, 8, 8)
    assert site.linear_macs == 2 * 4 * 9 * 8 * 16 and site.fast_reason == "unverified"
    assert site.macs(seen={site.q: 32, site.k: 32, site.v: 32, site.out: 32}) - site.macs() == (
        3 * 32 * 32 * 16 + 32 * 32 * 16 + 2 * 4 * 9 * 8 * 16
    )  # twice the tokens: projections and the linear attention double


def test_halves_sliced_at_a_fixed_width_are_checked_and_dropped():
    from dynconvert.testing.patterns import SlicedSwiGLU

    class FixedHalves(SlicedSwiGLU):  # h[..., :self.hidden]: a sliced fc1 would not halve
        def forward(self, x):
            h = self.proj_in(x)
            hidden = self.proj_out.in_features
            return self.proj_out(torch.nn.functional.silu(h[..., :hidden]) * h[..., hidden:])

    model, inputs = PATTERN_MODELS["mmdit-shared-mlp"]()
    for blk in model.joint:
        blk.ff.__class__ = FixedHalves
    reference = model(**inputs)
    dynconvert.convert(model, 0.9, example_inputs=inputs)
    plan = dynconvert.get_state(model).plan
    assert not [s for s in plan.mlp if s.name.endswith(".ff")]
    assert sum("splits the hidden channels at fixed sizes" in s.reason for s in plan.skipped) == 2
    assert _rel(model(**inputs), reference) < 1e-5
    randomize_routing(model, keep=0.5, example_inputs=inputs)
    with dynconvert.routing(model, "eval", "masked"):
        masked = model(**inputs)
    assert _rel(model(**inputs), masked) < 1e-5


def test_a_gate_read_outside_the_attention_is_not_sliced():
    from dynconvert.testing.patterns import GroupedQueryAttention

    class LeakyGate(GroupedQueryAttention):  # the gate's logits also feed the residual
        def forward(self, x, pos):
            b, n, _ = x.shape
            q, k, v = (
                w(x).view(b, n, -1, self.head_dim).transpose(1, 2)
                for w in (self.wq, self.wk, self.wv)
            )
            o = (
                torch.nn.functional.scaled_dot_product_attention(q, k, v)
                .transpose(1, 2)
                .reshape(b, n, -1)
            )
            logits = self.to_gate(x)
            return self.wo(o * torch.sigmoid(logits)) + 0.1 * logits

    model, inputs = PATTERN_MODELS["gated-per-head"]()
    for layer in model.layers:
        layer.attn.gate = "channel"
        layer.attn.to_gate = torch.nn.Linear(32, 32)
        layer.attn.__class__ = LeakyGate
    plan = dynconvert.analyze(model, inputs)
    assert not plan.attention
    assert all(
        "lies between the attention" in s.reason for s in plan.skipped if s.kind == "attention"
    )


def test_a_gate_computed_on_a_token_grid_is_found():
    from dynconvert.testing.patterns import GroupedQueryAttention

    class GridGate(GroupedQueryAttention):  # the gate Linear runs on (B, 4, 4, D)
        def forward(self, x, pos):
            b, n, _ = x.shape
            q, k, v = (
                w(x).view(b, n, -1, self.head_dim).transpose(1, 2)
                for w in (self.wq, self.wk, self.wv)
            )
            o = (
                torch.nn.functional.scaled_dot_product_attention(q, k, v)
                .transpose(1, 2)
                .reshape(b, n, -1)
            )
            gate = self.to_gate(x.view(b, 4, n // 4, -1)).reshape(b, n, -1)
            return self.wo(o * torch.sigmoid(gate))

    model, inputs = PATTERN_MODELS["gated-per-head"]()
    for layer in model.layers:
        layer.attn.to_gate = torch.nn.Linear(32, 32)
        layer.attn.__class__ = GridGate
    plan = dynconvert.analyze(model, inputs)
    assert [s.gate for s in plan.attention] == ["layers.0.attn.to_gate", "layers.1.attn.to_gate"]


def test_a_weight_only_projection_without_a_bias_attribute_is_refused_not_crashed():
    from dynconvert.testing.patterns import video_dit

    class WeightOnly(torch.nn.Module):
        def __init__(self, i, o, bias=True):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(o, i) / i**0.5)

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight)

    model, inputs = video_dit(linear=WeightOnly)
    plan = dynconvert.analyze(model, inputs)
    assert not plan.attention and any("not an nn.Linear" in s.reason for s in plan.skipped)
