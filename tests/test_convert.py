"""convert / revert on every supported family: the converted model starts as the original."""

from __future__ import annotations

import copy

import torch

import dynconvert
from dynconvert.runtime.dynamic import DynamicLinear
from dynconvert.testing import call, randomize_routing


def test_converted_model_computes_the_original(family):
    name, model, inputs = family
    reference = call(model, inputs)
    dynconvert.convert(model, 0.5, example_inputs=inputs)
    # eval, routers all on
    torch.testing.assert_close(call(model, inputs), reference, atol=1e-5, rtol=0)
    with dynconvert.routing(model, "full"):
        torch.testing.assert_close(call(model, inputs), reference, atol=1e-5, rtol=0)
    with dynconvert.routing(model, "train"):  # (model stays in eval: no label dropout)
        torch.manual_seed(1)
        out = call(model, inputs)  # Gumbel noise on bias 15/35 with tau 5: every unit stays on
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)


def test_parameter_names_unchanged_and_original_checkpoint_loads(family):
    name, model, inputs = family
    original = copy.deepcopy(model.state_dict())
    dynconvert.convert(model, 0.5, example_inputs=inputs)
    converted = model.state_dict()
    assert set(original) <= set(converted)
    extra = set(converted) - set(original)
    assert extra and all(k.startswith("dynconvert.") for k in extra)
    result = model.load_state_dict(original, strict=False)
    assert result.unexpected_keys == []
    assert all(k.startswith("dynconvert.") for k in result.missing_keys)
    assert any(isinstance(m, DynamicLinear) for m in model.modules())


def test_revert_gives_back_the_original_modules(family):
    name, model, inputs = family
    reference = call(model, inputs)
    keys = set(model.state_dict())
    dynconvert.convert(model, 0.5, example_inputs=inputs)
    randomize_routing(model, keep=0.5, example_inputs=inputs)
    assert not torch.allclose(call(model, inputs), reference)
    dynconvert.revert(model)
    assert not dynconvert.is_converted(model)
    assert not any(isinstance(m, DynamicLinear) for m in model.modules())
    assert set(model.state_dict()) == keys
    torch.testing.assert_close(call(model, inputs), reference, atol=0, rtol=0)
    dynconvert.convert(model, 0.5, example_inputs=inputs)  # and it converts again
    torch.testing.assert_close(call(model, inputs), reference, atol=1e-5, rtol=0)


def test_routers_read_the_timestep_and_deepcopy_keeps_working(family):
    name, model, inputs = family
    dynconvert.convert(model, 0.5, example_inputs=inputs)
    randomize_routing(model, keep=0.5, example_inputs=inputs)
    ema = copy.deepcopy(model)  # EMA copies must route with their own bank
    torch.testing.assert_close(call(ema, inputs), call(model, inputs))
    bank = dynconvert.get_state(model)
    assert bank.current_call().t is not None and bank.current_call().t.numel() == 3
    assert dynconvert.get_state(ema) is not bank


def test_sites_found_per_family(family):
    name, model, inputs = family
    plan = dynconvert.analyze(model, inputs)
    blocks = {"dit": 2, "uvit": 5, "diffusers-dit": 2, "pixart": 2}[name]
    attn_per_block = 2 if name == "pixart" else 1
    assert len(plan.attention) == blocks * attn_per_block
    assert len(plan.mlp) == blocks
    assert all(m.token for m in plan.mlp), [m.token_reason for m in plan.mlp]
    assert all(m.width and m.groups == 2 for m in plan.mlp)
    if name == "pixart":
        kinds = sorted({a.kind for a in plan.attention})
        assert kinds == ["cross", "self"]
        cross = [a for a in plan.attention if a.kind == "cross"][0]
        assert cross.tokens_kv == 8 and cross.kv_in == 16
        assert [s.name for s in plan.skipped] == ["caption_projection"]


def test_mlp_width_off_routes_tokens_only():
    from dynconvert.testing import tiny_dit

    model = tiny_dit()
    inputs = model.example_inputs(2)
    reference = model(*inputs)
    dynconvert.convert(model, 0.7, config=dynconvert.ConvertConfig(mlp_width=False))
    plan = dynconvert.get_state(model).plan
    assert all(m.units == 1 and m.groups == 1 and m.token and not m.width for m in plan.mlp)
    torch.testing.assert_close(model(*inputs), reference, atol=1e-5, rtol=0)
