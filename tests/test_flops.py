"""FLOPs: analytic counts against PyTorch's counter, and DiT-XL/2 against the published figures."""

from __future__ import annotations

import pytest
import torch

import dynconvert
from dynconvert.flops import count_flops, measure_macs
from dynconvert.models import build_model
from dynconvert.testing import call, randomize_routing


def test_static_total_matches_flop_counter(family):
    name, model, inputs = family
    report = count_flops(model, inputs)
    measured = measure_macs(model, inputs)
    assert report.ratio == 1.0
    assert report.static_macs == pytest.approx(measured, rel=0.01)
    dynconvert.convert(model, 0.5, example_inputs=inputs)
    assert count_flops(model, inputs).static_macs == pytest.approx(report.static_macs, rel=1e-9)


def test_executed_flops_of_fast_path_equal_analytic(family):
    name, model, inputs = family
    dynconvert.convert(model, 0.5, example_inputs=inputs)
    randomize_routing(model, keep=0.5, tokens=0.6, vary_with_t=False, example_inputs=inputs)
    call(model, inputs)  # warm the per-timestep width table (width routers run once per t)
    report = count_flops(model, inputs)
    executed = measure_macs(model, inputs)
    assert 0.2 < report.ratio < 0.9
    assert executed == pytest.approx(report.dynamic_macs, rel=0.02)
    assert report.blocks_ratio < report.ratio or report.other_macs == 0


def test_flops_ratio_in_training_matches_report():
    from dynconvert.testing import tiny_dit

    model = tiny_dit()
    inputs = model.example_inputs(batch_size=2)
    dynconvert.convert(model, 0.5, example_inputs=inputs)
    randomize_routing(model, keep=0.5, example_inputs=inputs)
    report = count_flops(model, inputs)
    ratio = dynconvert.last_flops_ratio(model)
    torch.testing.assert_close(
        ratio.double(),
        torch.tensor(report.per_sample_ratio, dtype=torch.float64),
        rtol=1e-5,
        atol=0,
    )


def test_count_flops_at_another_resolution():
    from dynconvert.testing import tiny_diffusers_dit

    model = tiny_diffusers_dit()
    dynconvert.convert(model, 0.5)
    big = {
        "hidden_states": torch.randn(1, 4, 16, 16),
        "timestep": torch.tensor([10]),
        "class_labels": torch.tensor([1]),
    }
    report = count_flops(model, big)
    assert report.sites[0].static_macs > 3 * dynconvert.get_state(model).plan.attention[0].macs()
    assert report.static_macs == pytest.approx(measure_macs(model, big), rel=0.01)


@pytest.mark.slow  # 4 s (DiT-XL/2); the formula is checked on the small models by default
def test_dit_xl_256_matches_published_macs():
    with torch.device("meta"):
        model = build_model("DiT-XL/2")
    report = count_flops(model, model.example_inputs(batch_size=1))
    assert report.static_macs_per_sample == pytest.approx(118.69e9, rel=0.002)
    attn, mlp = report.sites[0], report.sites[1]
    assert attn.kind == "attention" and mlp.kind == "mlp"
    assert round(attn.static_macs / 1e9, 3) == 1.510
    assert round(mlp.static_macs / 1e9, 3) == 2.718
    assert len(report.sites) == 56
    assert report.blocks_static_macs == pytest.approx(28 * (attn.static_macs + mlp.static_macs))


def test_static_total_matches_fvcore_plus_attention_matmuls():
    """docs/architecture.md: fvcore counts projections and MLPs but not the attention matmuls."""
    from fvcore.nn import FlopCountAnalysis

    from dynconvert.testing import tiny_dit

    model = tiny_dit()
    inputs = model.example_inputs(batch_size=2)
    fa = FlopCountAnalysis(model, inputs)
    fa.unsupported_ops_warnings(False)
    fa.uncalled_modules_warnings(False)
    by_op = fa.by_operator()
    assert "scaled_dot_product_attention" not in by_op  # what fvcore misses
    # Not "layer_norm" (DiT's convention counts no norms) nor "einsum" (DiT's unpatchify is a
    # permutation written as an einsum, which fvcore counts as multiplies).
    matmuls = sum(v for k, v in by_op.items() if k in ("linear", "addmm", "matmul", "bmm", "conv"))
    plan = dynconvert.analyze(model, inputs)
    attention = (
        sum(
            a.tokens_q * a.tokens_kv * a.heads * (a.head_dim + a.v_head_dim) for a in plan.attention
        )
        * 2
    )
    assert count_flops(model, inputs).static_macs == pytest.approx(matmuls + attention, rel=1e-6)
