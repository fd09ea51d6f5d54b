"""LoRA adapters on converted models are routed with the Linears they wrap (issue 21).

What must hold, for every site kind of ``dynconvert.testing`` (attention: fused and separate
projections, joint two-stream, parallel single-stream, GQA, gated; MLPs: plain, gated (SwiGLU),
shared by two streams, convolutional): at full routing a converted model with a LoRA computes the
original with the same LoRA; under random routing fast == masked == planned; merging the LoRA
(``fuse_lora``) then routing equals routing the unmerged LoRA, with the slice caches refreshed;
adapters attached before convert route the same as after; revert keeps them. Adapter kinds that
are not routed are refused, each by name.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dynconvert
from dynconvert.inputs import default_inputs, with_timestep
from dynconvert.runtime.planned.controls import (
    configure_planned,
    set_token_capacity,
    token_overflow,
)
from dynconvert.testing import PATTERN_MODELS, call, randomize_routing, tiny_dit

peft = pytest.importorskip("peft")

TOL = 1e-5


def _close(a, b, tol=TOL):
    """Max abs difference within ``tol`` of the reference's scale (fp32)."""
    a, b = a.detach(), b.detach()
    scale = float(b.abs().max()) or 1.0
    assert float((a - b).abs().max()) <= tol * scale, float((a - b).abs().max()) / scale


def lora_targets(model):
    """The routed modules of a converted model that peft can wrap: Linears and pointwise convs."""
    plan = dynconvert.get_state(model).plan
    modules = dict(model.named_modules())
    names = {m.linear for s in plan.sites for m in s.maps()}
    names |= {n for s in plan.mlp for n in [*s.fc1, s.fc2]}
    keep = []
    for n in sorted(names):
        mod = peft_base(modules[n])
        if isinstance(mod, nn.Linear) and hasattr(mod, "in_features"):  # not hand-written ones
            keep.append(n)
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d)) and mod.groups == 1:
            keep.append(n)
    return keep


def peft_base(module):
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def with_lora(model, targets, seed=0, name="default", r=2, **config):
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, **config
    )
    return peft.inject_adapter_in_model(cfg, model, adapter_name=name)


def run(model, inputs, execution=None, mode="eval"):
    with torch.no_grad(), dynconvert.routing(model, mode, execution):
        return call(model, inputs)


def check_routed_lora(build, budget=0.85):
    """The invariants of the module docstring on one pattern model."""
    original, inputs = build()
    converted = dynconvert.convert(copy.deepcopy(original), budget, example_inputs=inputs)
    targets = lora_targets(converted)
    assert targets
    with_lora(converted, targets)
    with_lora(original, targets)
    original.load_state_dict(peft.get_peft_model_state_dict(converted), strict=False)
    with torch.no_grad():
        reference = call(original, inputs)
    _close(run(converted, inputs, mode="full"), reference)  # full routing == original + LoRA
    _close(run(converted, inputs, "masked"), reference)  # a fresh conversion routes every unit
    randomize_routing(converted, keep=0.5, seed=1, example_inputs=inputs)
    configure_planned(converted, min_gather_rows=0, max_gather_fraction=1.0)
    out = {e: run(converted, inputs, e) for e in ("masked", "fast", "planned")}
    _close(out["fast"], out["masked"])
    _close(out["planned"], out["masked"])
    layers = [m for m in converted.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    for m in layers:
        m.enable_adapters(False)
    plain = run(converted, inputs, "masked")
    assert float((plain - out["masked"]).abs().max()) > 1e-3  # the adapters do something
    for m in layers:
        m.enable_adapters(True)
        m.merge()  # fuse_lora: into the base weights (after the caches were filled above)
    for e in ("fast", "planned", "masked"):
        _close(run(converted, inputs, e), out["masked"])
    for m in layers:
        m.unmerge()
    for e in ("fast", "planned"):
        _close(run(converted, inputs, e), out["masked"])
    return converted, inputs


def _dit():
    model = tiny_dit()
    return model, with_timestep(model, default_inputs(model, 2), [400, 900])


SITE_KINDS = {
    "dit": _dit,  # fused qkv, plain MLP with token routing, two timesteps in the batch
    "mmdit": PATTERN_MODELS["mmdit"],  # joint attention, parallel single block, per-stream MLPs
    "gated-gqa": PATTERN_MODELS["gated-gqa"],  # grouped kv heads, per-channel output gate
    "conv-mlp": PATTERN_MODELS["conv-mlp"],  # pointwise convs routed, depthwise left out
}
# video-own-projections: its projections are the model's own classes, which peft cannot wrap.
SLOW_KINDS = sorted(set(PATTERN_MODELS) - set(SITE_KINDS) - {"video-own-projections"})
DEFAULT_KINDS = ["dit"]  # 3 s of CPU; each other kind takes 4 to 8 s, so they run in the slow set


@pytest.mark.parametrize(
    "name",
    [
        *DEFAULT_KINDS,
        *(
            pytest.param(n, marks=pytest.mark.slow)
            for n in [*SITE_KINDS, *SLOW_KINDS]
            if n not in DEFAULT_KINDS
        ),
    ],
)
def test_a_routed_lora_keeps_the_invariants(name):
    check_routed_lora(SITE_KINDS.get(name) or PATTERN_MODELS[name])


@pytest.fixture(scope="module")
def dit():
    """A converted tiny DiT with random routing, its inputs, and its LoRA targets."""
    model, inputs = _dit()
    dynconvert.convert(model, 0.5, example_inputs=inputs)
    randomize_routing(model, keep=0.5, seed=1, example_inputs=inputs)
    configure_planned(model, min_gather_rows=0, max_gather_fraction=1.0)
    return model, inputs, lora_targets(model)


@pytest.mark.slow  # 2 s of CPU
def test_adapters_attached_before_convert_route_as_after_and_revert_keeps_them(dit):
    routed, inputs, targets = dit
    routed = with_lora(copy.deepcopy(routed), targets)
    before = with_lora(tiny_dit(), targets)
    before.load_state_dict(peft.get_peft_model_state_dict(routed), strict=False)
    expected = call(before, inputs)
    dynconvert.convert(before, 0.5, example_inputs=inputs)  # the LoRA is lifted, then adopted
    assert type(before.blocks[0].attn.qkv).__name__ == "RoutedLinear"
    _close(run(before, inputs, mode="full"), expected)
    before.load_state_dict(routed.state_dict())  # same routers
    for e in ("fast", "masked"):
        _close(run(before, inputs, e), run(routed, inputs, "masked"))
    dynconvert.revert(before)
    assert type(before.blocks[0].attn.qkv) is peft.tuners.lora.Linear
    assert type(before.blocks[0].attn.qkv.base_layer) is nn.Linear
    with torch.no_grad():
        _close(call(before, inputs), expected)


def test_two_adapters_with_weights_scale_and_switch_without_stale_slices(dit):
    model, inputs, targets = dit
    model = copy.deepcopy(model)
    with_lora(model, targets, seed=1, name="a")
    with_lora(model, targets, seed=2, name="b")
    layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]

    def set_adapters(names, weights):
        for m in layers:
            m.set_adapter(names)
            for n, w in zip(names, weights):
                m.set_scale(n, w)

    results = {}
    for names, weights in ((["a"], [1.0]), (["a", "b"], [0.5, 1.5]), (["b"], [0.3])):
        set_adapters(names, weights)
        out = {e: run(model, inputs, e) for e in ("masked", "fast", "planned")}
        _close(out["fast"], out["masked"])
        _close(out["planned"], out["masked"])
        results[tuple(names)] = out["masked"]
    # Each setting gives its own output: nothing was kept from the one before.
    keys = list(results)
    assert all(
        float((results[a] - results[b]).abs().max()) > 1e-3 for a in keys for b in keys if a < b
    )
    for m in layers:
        m.delete_adapter("b")
    set_adapters(["a"], [1.0])
    for e in ("fast", "planned"):
        _close(run(model, inputs, e), results[("a",)])


@pytest.mark.slow  # 2 s of CPU
def test_dora_is_routed_on_linears(dit):
    model, inputs, targets = dit
    model = copy.deepcopy(model)
    with_lora(model, targets, use_dora=True)
    assert any(len(m.lora_magnitude_vector) for m in model.modules() if hasattr(m, "lora_A"))
    original = with_lora(tiny_dit(), targets, use_dora=True)
    original.load_state_dict(peft.get_peft_model_state_dict(model), strict=False)
    with torch.no_grad():
        _close(run(model, inputs, mode="full"), call(original, inputs))
    masked = run(model, inputs, "masked")
    for e in ("fast", "planned"):
        _close(run(model, inputs, e), masked)
    for m in model.modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            m.merge()
    for e in ("fast", "planned", "masked"):
        _close(run(model, inputs, e), masked)


def test_adapter_kinds_that_are_not_routed_are_refused_by_name(dit):
    model, inputs, targets = dit
    model = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(dynconvert.LoraNotRoutedError, match="peft ia3 adapter.*Nothing was"):
        peft.inject_adapter_in_model(
            peft.IA3Config(target_modules=targets[:1], feedforward_modules=[]), model
        )
    assert model.state_dict().keys() == before.keys()
    with_lora(model, targets)
    with pytest.raises(dynconvert.LoraNotRoutedError, match="adapter_names"):
        model.blocks[0].attn.qkv(torch.zeros(1, 3, 64), adapter_names=["default"])
    # A LoRA variant that is not routed (activated LoRA), added beside the routed one.
    with pytest.raises(dynconvert.LoraNotRoutedError, match="ALoraLinearVariant.*not added"):
        with_lora(model, targets[:1], name="alora", alora_invocation_tokens=[1])
    assert all("alora" not in m.lora_A for m in model.modules() if hasattr(m, "lora_A"))
    # fan_in_fan_out: peft sets it False on an nn.Linear; a layer that has it is still refused.
    wrapper = model.get_submodule(targets[0])
    wrapper.fan_in_fan_out = True
    with pytest.raises(dynconvert.LoraNotRoutedError, match="fan_in_fan_out"):
        wrapper.update_layer("ffo", 2, 2, peft.LoraConfig(r=2, lora_alpha=2))
    wrapper.fan_in_fan_out = False
    # Any other module in a routed Linear's place.
    with pytest.raises(dynconvert.LoraNotRoutedError, match="nn.modules.linear.Linear would"):
        model.blocks[0].attn.proj = nn.Linear(64, 64)


@pytest.mark.slow  # 2 s of CPU
def test_lora_on_a_depthwise_convolution_and_dora_on_a_pointwise_one_are_refused():
    model, inputs = PATTERN_MODELS["conv-mlp"]()
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise  # peft asks for a rank that its groups divide
    name = next(n for n, m in model.named_modules() if m is depthwise[0])
    with_lora(model, [name], r=depthwise[0].groups)
    with pytest.raises(dynconvert.LoraNotRoutedError, match="depthwise convolution"):
        dynconvert.convert(model, 0.85, example_inputs=inputs)
    assert not dynconvert.is_converted(model)
    assert not any(type(m).__name__.startswith("Dynamic") for m in model.modules())
    # DoRA on a routed pointwise convolution (its norm is per output channel of a kernel).
    model, inputs = PATTERN_MODELS["conv-mlp"]()
    dynconvert.convert(model, 0.85, example_inputs=inputs)
    pointwise = [n for n in lora_targets(model) if isinstance(model.get_submodule(n), nn.Conv2d)]
    with pytest.raises(dynconvert.LoraNotRoutedError, match="DoRA on a convolution"):
        with_lora(model, pointwise[:1], use_dora=True)


@pytest.mark.slow  # 7 to 9 s of CPU each
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_diffusers_adapter_api_on_a_converted_transformer_keeps_the_invariants(family, tmp_path):
    from dynconvert.testing.zoo import ZOO

    entry = ZOO[family]
    original = entry.build(0).eval()
    inputs = entry.inputs(original, 2)
    converted = dynconvert.convert(copy.deepcopy(original), 0.5, example_inputs=inputs)
    randomize_routing(converted, keep=0.5, seed=1, example_inputs=inputs)
    configure_planned(converted, min_gather_rows=0, max_gather_fraction=1.0)
    # The adapters change what reaches the token routers: a capacity that fits any of them.
    set_token_capacity(converted, 0.97)

    def check():
        with torch.no_grad():
            _close(run(converted, inputs, mode="full"), call(original, inputs))
        masked = run(converted, inputs, "masked")
        for e in ("fast", "planned"):
            _close(run(converted, inputs, e), masked)
        assert token_overflow(converted).dropped == 0
        return masked

    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "proj_mlp", "proj_out"]
    for seed, name in ((1, "a"), (2, "b")):  # written by the original, loaded by both
        torch.manual_seed(seed)
        config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
        original.add_adapter(config, adapter_name=name)
        original.save_lora_adapter(tmp_path / name, adapter_name=name)
        converted.load_lora_adapter(
            tmp_path / name, prefix=None, adapter_name=name, use_safetensors=True
        )
        assert any(type(m).__name__ == "RoutedLinear" for m in converted.modules())
        check()
    for model in (original, converted):
        model.set_adapters(["a", "b"], weights=[0.7, 1.3])
    both = check()
    for model in (original, converted):
        model.fuse_lora(lora_scale=0.5)
    check()
    for model in (original, converted):
        model.unfuse_lora()
        model.set_adapters(["a", "b"], weights=[0.7, 1.3])  # fuse_lora(lora_scale) rescaled them
    _close(check(), both)
    for model in (original, converted):
        model.delete_adapters("a")
    check()
