"""Key/value compression and rotary tables over the whole width (issue 9, point 5 and point 1).

The three invariants of every pattern model run in test_patterns.py (these models are in
PATTERN_MODELS); here: what each form makes of a site, and its refusals.
"""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor

import dynconvert
from dynconvert.config import ConvertConfig
from dynconvert.flops import measure_macs, site_cost
from dynconvert.inputs import default_inputs, with_timestep
from dynconvert.plan import Plan
from dynconvert.testing import PATTERN_MODELS, randomize_routing, tiny_pixart
from dynconvert.testing.attention_forms import (
    ContextKVAttention,
    KVCompressAttention,
    WideRotaryAttention,
    compressed_kv_dit,
)
from dynconvert.testing.patterns import rope_tables


@pytest.mark.parametrize("name", ["kv-uniform", "kv-nearest", "kv-pool"])
def test_keys_and_values_resampled_per_channel_keep_a_whole_site(name):
    model, inputs = PATTERN_MODELS[name]()
    plan = dynconvert.analyze(model, inputs)
    site = plan.attention[0]
    # The fused qkv is sliced as usual: downsampling acts on every channel on its own.
    assert [m.linear for m in site.in_maps] == ["layers.0.attn.qkv"] and not site.unsliced
    # The projection runs on 16 tokens, the attention sees 4 keys (2x2 per side).
    assert (site.tokens_q, site.tokens_kv, site.kv_stride) == (16, 16, 4)
    qkv, out, attn = 16 * 32 * 96, 16 * 32 * 32, 16 * 4 * 4 * (8 + 8)
    assert site.macs() == qkv + out + attn


def test_compression_by_a_depthwise_conv_and_a_norm_over_all_heads_is_cut_after_the_norm():
    model, inputs = PATTERN_MODELS["kv-conv-norm"]()
    site = dynconvert.analyze(model, inputs).attention[0]
    # k and v run in full through the (shared) conv and LayerNorm; the norm's output, in both
    # of its calls, is cut to the active heads; q and the out-projection are sliced.
    assert site.unsliced == ["layers.0.attn.to_k", "layers.0.attn.to_v"]
    assert [m.linear for m in site.cut_maps] == ["layers.0.attn.norm"]
    assert [m.linear for m in site.in_maps] == ["layers.0.attn.to_q"]
    assert site.kv_stride == 4
    # What no routing saves: the k and v projections over all 16 tokens.
    assert site.fixed_macs() == 2 * 16 * 32 * 32
    assert site_cost(site, width=0.0).dynamic == site.fixed_macs()


def test_a_fused_projection_that_reaches_the_attention_around_the_cut_is_refused():
    model, inputs = compressed_kv_dit("conv", fused=True)  # PixArt-Sigma's own layout
    plan = dynconvert.analyze(model, inputs)
    assert not plan.attention
    reason = next(s.reason for s in plan.skipped if s.name == "layers.0.attn")
    assert "layers.0.attn.qkv reaches the attention both through layers.0.attn.norm" in reason


def test_a_depthwise_conv_with_nothing_to_cut_after_it_is_refused_with_its_reason():
    model, inputs = compressed_kv_dit("conv", fused=False)
    for layer in model.layers:
        layer.attn.norm = torch.nn.Identity()  # the conv's output goes straight to the heads
    plan = dynconvert.analyze(model, inputs)
    reason = next(s.reason for s in plan.skipped if s.name == "layers.0.attn")
    assert "depthwise convolution" in reason and "no module after it" in reason


def test_a_cut_site_runs_one_head_per_attention_as_the_masked_path_does():
    model, inputs = PATTERN_MODELS["kv-conv-norm"]()
    reference = model(**inputs)
    dynconvert.convert(model, 0.6, example_inputs=inputs)
    plan = dynconvert.get_state(model).plan
    assert len(plan.attention) == 2 and all(s.fast for s in plan.attention)
    assert torch.allclose(model(**inputs), reference, atol=1e-6)
    # Exactly one head of four on at every t: the cut keeps that head's columns of the norm.
    randomize_routing(model, keep=0.25, vary_with_t=False, example_inputs=inputs)
    fast = model(**inputs)
    with dynconvert.routing(model, "eval", "masked"):
        masked = model(**inputs)
    assert torch.allclose(fast, masked, atol=1e-5)
    assert not torch.allclose(fast, reference, atol=1e-3)  # heads really were dropped


@pytest.mark.parametrize("name", ["rotary-wide-table", "rotary-wide-table-norm-all"])
def test_a_rotary_table_over_the_whole_width_is_cut_with_the_heads(name):
    model, inputs = PATTERN_MODELS[name]()
    plan = dynconvert.analyze(model, inputs)
    site = plan.attention[0]
    # The tables come in as the attention's second argument, a (cos, sin) pair of (B, N, C);
    # head h owns columns 8h .. 8h + 7 of each.
    assert [(t.path, t.dim) for t in site.table_args] == [("[0][1][0]", -1), ("[0][1][1]", -1)]
    assert site.table_args[0].map.indices(1) == list(range(8, 16))
    if name == "rotary-wide-table":  # q and k sliced, tables cut to match
        assert {m.linear for m in site.in_maps} == {f"layers.0.attn.to_{x}" for x in "qkv"}
    else:  # q and k normalised over all heads: cut after the norms, then the tables
        assert [m.linear for m in site.cut_maps] == ["layers.0.attn.norm_q", "layers.0.attn.norm_k"]
    assert Plan.from_dict(plan.to_dict()) == plan  # saved records carry the tables


def test_a_table_computed_inside_the_attention_or_without_export_is_refused_with_its_reason():
    model, inputs = PATTERN_MODELS["rotary-wide-table"]()
    plan = dynconvert.analyze(model, inputs, ConvertConfig(capture="fx"))
    reason = next(s.reason for s in plan.skipped if s.name == "layers.0.attn")
    assert "not captured whole by torch.export" in reason

    class OwnTables(WideRotaryAttention):  # builds its (per-head) table itself
        def forward(self, x, rope):
            cos, sin = rope_tables(x.shape[1], x.shape[2])
            return super().forward(x, (cos, sin))

    for layer in model.layers:
        layer.attn = OwnTables(32, 4, None)
    plan = dynconvert.analyze(model, inputs)
    reason = next(s.reason for s in plan.skipped if s.name == "layers.0.attn")
    assert "computed inside the attention module" in reason


@pytest.mark.slow  # 3-4 s; the folded-heads pattern models cover the path in the default run
def test_heads_folded_into_the_batch_by_the_classic_diffusers_processor_convert():
    # AttnProcessor (set_default_attn_processor) folds heads into the batch, (B * H, N, d),
    # and runs baddbmm / softmax / bmm: the fold is seen through, the same sites are found.
    model = tiny_pixart()
    model.set_attn_processor(AttnProcessor())
    args, kwargs = default_inputs(model)
    reference = model(*args, **kwargs)[0]
    dynconvert.convert(model, 0.8, example_inputs=kwargs)
    plan = dynconvert.get_state(model).plan
    assert (len(plan.attention), len(plan.mlp)) == (4, 2), plan.skipped
    assert torch.allclose(model(**kwargs)[0], reference, atol=1e-5)
    randomize_routing(model, keep=0.5)
    with dynconvert.routing(model, "eval", "masked"):
        masked = model(**kwargs)[0]
    assert torch.allclose(model(**kwargs)[0], masked, atol=1e-5)
    one_t = with_timestep(model, kwargs, 700.0)[1]
    report = dynconvert.count_flops(model, one_t)
    assert measure_macs(model, one_t) / report.static_macs == pytest.approx(report.ratio, rel=0.02)


class _FlippedTable(WideRotaryAttention):  # reverses the sin table's columns inside
    def forward(self, x, rope):
        cos, sin = rope
        return super().forward(x, (cos, sin.flip(-1)))


class _PooledEverything(torch.nn.Module):  # q, k and v pooled 2x2, the output upsampled back
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v, self.to_out = (torch.nn.Linear(32, 32) for _ in range(4))

    def forward(self, x, pos):
        b, n, c = x.shape

        def pool(t):
            return F.avg_pool2d(t.transpose(1, 2).reshape(b, c, 4, 4), 2).flatten(2).transpose(1, 2)

        q, k, v = (
            pool(p(x)).unflatten(-1, (4, -1)).transpose(1, 2)
            for p in (self.to_q, self.to_k, self.to_v)
        )
        o = self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        return (
            F.interpolate(o.transpose(1, 2).reshape(b, c, 2, 2), scale_factor=2.0)
            .flatten(2)
            .transpose(1, 2)
        )


class _AdaptivePool(KVCompressAttention):  # PVT-v2's pooling to a fixed grid
    def downsample(self, t):
        b, n, c = t.shape
        grid = F.adaptive_avg_pool2d(t.transpose(1, 2).reshape(b, c, 4, 4), 2)
        return grid.flatten(2).transpose(1, 2)


@pytest.mark.parametrize(
    ("base", "make", "reason"),
    [
        (
            "rotary-wide-table",
            lambda: _FlippedTable(32, 4, None),
            "reordered inside the attention (`flip`",
        ),
        (
            "kv-pool",
            _PooledEverything,
            "the queries are resampled between their projection and the attention",
        ),
        ("kv-pool", lambda: _AdaptivePool(32, 4, "pool", fused=False), "`adaptive_avg_pool2d`"),
    ],
)
def test_what_would_be_cut_or_counted_wrongly_is_refused_with_its_reason(base, make, reason):
    model, inputs = PATTERN_MODELS[base]()
    for layer in model.layers:
        layer.attn = make()
    plan = dynconvert.analyze(model, inputs)
    assert not plan.attention
    assert reason in next(s.reason for s in plan.skipped if s.name == "layers.0.attn")


class _NoSoftmax(torch.nn.Module):  # "attention" without a softmax: no attention call to find
    def __init__(self):
        super().__init__()
        self.to_qkv, self.to_out = torch.nn.Linear(32, 96), torch.nn.Linear(32, 32)

    def forward(self, x, pos):
        q, k, v = F.normalize(self.to_qkv(x), dim=-1).chunk(3, dim=-1)
        return self.to_out((q @ k.transpose(1, 2)) @ v)


def test_a_block_whose_mlp_is_found_but_no_attention_says_why_for_the_attention():
    model, inputs = PATTERN_MODELS["rotary-rotate-half"]()
    for layer in model.layers:
        layer.attn = _NoSoftmax()
    plan = dynconvert.analyze(model, inputs)
    why = {s.name: s.reason for s in plan.skipped}
    assert why["layers.0.ff"] == "not inside a transformer block with attention"
    assert why["layers.0"].startswith("no attention call") and "captured ops" in why["layers.0"]


def test_a_context_of_keys_and_values_only_is_a_stream_without_queries():
    model, inputs = PATTERN_MODELS["context-kv"]()
    site = dynconvert.analyze(model, inputs).attention[0]
    text = site.streams[0]
    assert (site.q, site.out, site.tokens_q, site.tokens_kv) == (
        "layers.0.attn.to_q",
        "layers.0.attn.to_out",
        16,
        16,
    )
    assert (text.q, text.k, text.v, text.out, text.tokens_kv) == (
        "",
        "layers.0.attn.add_k_proj",
        "layers.0.attn.add_v_proj",
        "",
        6,
    )
    # Projections, then 16 queries over 6 + 16 keys.
    proj = 16 * 32 * 32 * 3 + 6 * 12 * 32 * 2 + 16 * 32 * 32
    assert site.macs() == proj + 16 * 22 * 4 * (8 + 8)


class _WideValues(ContextKVAttention):  # the context's values read a wider input than its keys
    def __init__(self):
        super().__init__(32, 4)
        self.add_v_proj = torch.nn.Linear(24, 32)

    def forward(self, x, pos_and_context):
        context = pos_and_context[1]
        q = self.to_q(x)
        k = torch.cat([self.add_k_proj(context), self.to_k(x)], dim=1)
        v = torch.cat([self.add_v_proj(torch.cat([context, context], -1)), self.to_v(x)], dim=1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


def test_values_reading_a_wider_input_than_their_keys_are_counted_at_their_width():
    model, inputs = PATTERN_MODELS["context-kv"]()
    for layer in model.layers:
        layer.attn = _WideValues()
    dynconvert.convert(model, 0.85, example_inputs=inputs)
    site = dynconvert.get_state(model).plan.attention[0]
    assert (site.streams[0].kv_in, site.streams[0].v_in) == (12, 24)
    randomize_routing(model, keep=0.5, example_inputs=inputs)
    one_t = {**inputs, "timestep": torch.full_like(inputs["timestep"], 700.0)}
    report = dynconvert.count_flops(model, one_t)
    assert measure_macs(model, one_t) / report.static_macs == pytest.approx(report.ratio, rel=0.02)


class _NormWithExtras(torch.nn.Module):  # each head's q has 4 more rows, used only by its norm
    def __init__(self):
        super().__init__()
        self.to_q, self.to_kv = torch.nn.Linear(32, 4 * 12), torch.nn.Linear(32, 64)
        self.to_out = torch.nn.Linear(32, 32)

    def forward(self, x, pos):
        q = self.to_q(x).unflatten(-1, (4, 12))
        q = (q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6))[..., :8].transpose(1, 2)
        k, v = (t.unflatten(-1, (4, 8)).transpose(1, 2) for t in self.to_kv(x).chunk(2, -1))
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


def test_rows_that_only_feed_a_norm_are_refused_not_miscounted():
    model, inputs = PATTERN_MODELS["rotary-rotate-half"]()
    for layer in model.layers:
        layer.attn = _NormWithExtras()
    plan = dynconvert.analyze(model, inputs)
    reason = next(s.reason for s in plan.skipped if s.name == "layers.0.attn")
    assert "each head takes 12 rows of layers.0.attn.to_q for its 8 channels" in reason


def test_another_librarys_kernel_is_read_in_its_layout_and_counted():
    # A torch.library custom op taking (B, N, H, d), as flash-attn does: found by its name and
    # shapes, its layout told apart by the replay, its matmuls counted (the graph has none).
    model, inputs = PATTERN_MODELS["kernel"]()
    plan = dynconvert.analyze(model, inputs)
    site = plan.attention[0]
    assert (site.heads, site.head_dim, site.fast_reason) == (4, 8, "unverified")
    assert plan.static_macs == measure_macs(model, inputs)
