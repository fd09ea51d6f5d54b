"""A converted diffusers transformer keeps the contracts diffusers users rely on (issue 12).

Tiny DiT and PixArt configs, routing randomised so that half the heads, groups and tokens are
off, and the whole batch at one timestep, as pipelines call the model.
"""

from __future__ import annotations

import copy
import inspect
import json
import warnings

import pytest
import torch

import dynconvert
from dynconvert.inputs import default_inputs
from dynconvert.testing import call, randomize_routing, tiny_diffusers_dit, tiny_pixart

BUILDERS = {"dit": tiny_diffusers_dit, "pixart": tiny_pixart}
T = 700  # one timestep for the whole batch


def _inputs(model, t=T, batch=2, dtype=torch.float32):
    args, kwargs = default_inputs(model, batch)
    kwargs["timestep"] = torch.full((batch,), t) if isinstance(t, int) else torch.tensor(t)
    cast = {
        k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
        for k, v in kwargs.items()
    }
    return args, cast


@pytest.fixture(scope="module")
def converted():
    models = {}
    for name, build in BUILDERS.items():
        model = dynconvert.convert(build(), 0.5)
        randomize_routing(model, keep=0.5, vary_with_t=False)  # one of the two heads off everywhere
        models[name] = model
    return models


@pytest.fixture(params=sorted(BUILDERS))
def family(request, converted):
    """(name, a fresh copy of the converted model, its inputs); checks a head really is off."""
    model = copy.deepcopy(converted[request.param])
    inputs = _inputs(model)
    with torch.no_grad():
        call(model, inputs)
    widths = [
        r["width"]
        for r in dynconvert.get_state(model).records.values()
        if r.get("width") is not None
    ]
    assert widths and all(not bool(w.all()) for w in widths)
    return request.param, model, inputs


def _static(name, model):
    """The original model with the same weights (routers off)."""
    static = BUILDERS[name]()
    static.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.startswith("dynconvert.")}
    )
    return static


# -- 1. save / load -------------------------------------------------------------------------------
def test_save_pretrained_comes_back_converted(family, tmp_path):
    name, model, inputs = family
    with torch.no_grad():
        expected = call(model, inputs)
    with pytest.warns(UserWarning, match="dynconvert.load"):
        model.save_pretrained(tmp_path)
    loaded = dynconvert.load(tmp_path)  # no base model: rebuilt from config.json
    assert dynconvert.is_converted(loaded) and type(loaded) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(call(loaded, inputs), expected, atol=0, rtol=0)
    # diffusers from_pretrained gives the static weights, and the folder says so.
    static = type(model).from_pretrained(tmp_path)
    assert not dynconvert.is_converted(static)
    assert "dynconvert.load" in json.loads((tmp_path / "config.json").read_text())["_dynconvert"]
    with torch.no_grad(), dynconvert.routing(model, "full"):
        torch.testing.assert_close(call(static, inputs), call(model, inputs), atol=0, rtol=0)


@pytest.mark.parametrize("options", [{"max_shard_size": "20KB"}, {"safe_serialization": False}])
def test_save_pretrained_sharded_or_pickled_comes_back_converted(converted, tmp_path, options):
    model = copy.deepcopy(converted["pixart"])
    inputs = _inputs(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path, **options)
    loaded = dynconvert.load(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(call(loaded, inputs), call(model, inputs), atol=0, rtol=0)


def test_pipeline_save_pretrained_comes_back_converted(converted, tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    model = copy.deepcopy(converted["dit"])
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
    pipe = DiTPipeline(transformer=model, vae=vae, scheduler=DDIMScheduler())
    with pytest.warns(UserWarning, match="dynconvert.load"):
        pipe.save_pretrained(tmp_path)
    loaded = dynconvert.load(tmp_path)  # the pipeline folder: its transformer/ is found
    inputs = _inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(call(loaded, inputs), call(model, inputs), atol=0, rtol=0)
    assert dynconvert.is_converted(dynconvert.load(tmp_path / "transformer"))


def test_pipeline_save_pretrained_passes_its_options_to_a_converted_model(converted, tmp_path):
    # diffusers passes these only to a save method whose signature names them (issue 23).
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    model = copy.deepcopy(converted["dit"])
    assert {"safe_serialization", "variant", "max_shard_size"} <= set(
        inspect.signature(model.save_pretrained).parameters
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
    pipe = DiTPipeline(transformer=model, vae=vae, scheduler=DDIMScheduler())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.save_pretrained(tmp_path, variant="v1", safe_serialization=False)
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.v1.bin").is_file()
    inputs = _inputs(model)
    with torch.no_grad():
        loaded = dynconvert.load(tmp_path / "transformer")
        torch.testing.assert_close(call(loaded, inputs), call(model, inputs), atol=0, rtol=0)


def test_dynconvert_save_opens_with_from_pretrained(converted, tmp_path):
    model = copy.deepcopy(converted["pixart"])
    inputs = _inputs(model)
    dynconvert.save(model, tmp_path)
    static = type(model).from_pretrained(tmp_path)
    assert not dynconvert.is_converted(static)
    assert (
        "from_pretrained gives back the static"
        in json.loads((tmp_path / "config.json").read_text())["_dynconvert"]
    )
    with torch.no_grad(), dynconvert.routing(model, "full"):
        torch.testing.assert_close(call(static, inputs), call(model, inputs), atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(
            call(dynconvert.load(tmp_path), inputs), call(model, inputs), atol=0, rtol=0
        )


def test_revert_takes_the_diffusers_integration_off(converted):
    model = copy.deepcopy(converted["pixart"])
    assert (
        "save_pretrained" in model.__dict__ and "_skip_layerwise_casting_patterns" in model.__dict__
    )
    dynconvert.revert(model)
    assert "save_pretrained" not in model.__dict__
    assert "_skip_layerwise_casting_patterns" not in model.__dict__


# -- 2. gradient checkpointing ---------------------------------------------------------------------
def _grads(model, inputs, checkpointing, twice=False):
    model.zero_grad(set_to_none=True)
    if checkpointing:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    torch.manual_seed(0)
    loss = call(model, inputs).square().mean()
    if twice:  # a second call before backward: the recomputation must route as the first call
        args, kwargs = inputs
        loss = (
            loss
            + call(model, (args, {**kwargs, "timestep": torch.full((2,), 100)})).square().mean()
        )
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("twice", [False, True], ids=["one-call", "two-calls"])
def test_gradient_checkpointing_gives_the_same_gradients(family, twice):
    name, model, inputs = family
    model.train()
    plain = _grads(model, inputs, checkpointing=False, twice=twice)
    checkpointed = _grads(model, inputs, checkpointing=True, twice=twice)
    assert plain.keys() == checkpointed.keys()
    assert any(k.startswith("dynconvert.token") for k in plain)  # the token routers' noise matters
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], atol=1e-6, rtol=1e-5, msg=k)


# -- 3. layerwise casting ------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "compute"), [("dit", torch.float32), ("pixart", torch.bfloat16)])
def test_layerwise_casting(converted, name, compute):
    model = copy.deepcopy(converted[name]).to(compute)
    with torch.no_grad():
        call(model, _inputs(model, dtype=compute))
    original = _static(name, model).to(compute)
    inputs = _inputs(model, dtype=compute)
    masks = {i: r["width"] for i, r in dynconvert.get_state(model).records.items() if "width" in r}
    for m in (model, original):
        m.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute)
    assert model.transformer_blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        fast = call(model, inputs)
        after = {
            i: r["width"] for i, r in dynconvert.get_state(model).records.items() if "width" in r
        }
        with dynconvert.routing(model, "eval", "masked"):
            masked = call(model, inputs)
        with dynconvert.routing(model, "full"):
            full = call(model, inputs)
        reference = call(original, inputs)
    assert fast.dtype == compute
    # Routers keep their dtype (skipped like LoRA layers), so they decide as before casting.
    assert after.keys() == masks.keys()
    assert all(torch.equal(after[i], m) for i, m in masks.items() if m is not None)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[compute]
    torch.testing.assert_close(fast, masked, atol=tol, rtol=tol)
    torch.testing.assert_close(full, reference, atol=0, rtol=0)
    model.train()  # training-mode routing runs under casting too
    call(model, inputs).float().square().mean().backward()
    assert dynconvert.get_state(model).t_embed.mlp[0].weight.grad is not None


def test_routers_stored_in_float8_compute_in_a_compute_dtype(converted):
    """Routers cast to a storage dtype with no casting hook still compute in the input's dtype."""
    model = copy.deepcopy(converted["pixart"])
    inputs = _inputs(model)
    bank = dynconvert.get_state(model)
    bank.to(torch.float8_e4m3fn)
    for m in (model.eval(), model.train()):
        call(m, inputs)  # raised "mat1 and mat2 must have the same dtype" before


# -- 4. fused qkv ------------------------------------------------------------------------------
def _fuse(model, fuse=True):
    """What PixArt's fuse_qkv_projections does (DiT's class lacks it, its Attention has it)."""
    from diffusers.models.attention_processor import (
        Attention,
        AttnProcessor2_0,
        FusedAttnProcessor2_0,
    )

    for m in model.modules():
        if isinstance(m, Attention):
            if fuse:
                m.fuse_projections(fuse=True)
            m.set_processor(FusedAttnProcessor2_0() if fuse else AttnProcessor2_0())


@pytest.mark.parametrize("timesteps", [[T, T], [T, 100]], ids=["one-t", "two-t"])
def test_fused_qkv_equals_unfused(family, timesteps, tmp_path):
    name, model, _ = family
    inputs = _inputs(model, t=timesteps)
    with torch.no_grad():
        unfused = call(model, inputs)
        model.fuse_qkv_projections() if hasattr(model, "fuse_qkv_projections") else _fuse(model)
        fused = call(model, inputs)
        torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-5)
        for execution in ("masked", "planned"):  # the reference, and static shapes per pattern
            with dynconvert.routing(model, "eval", execution):
                torch.testing.assert_close(call(model, inputs), unfused, atol=1e-5, rtol=1e-5)
        model.unfuse_qkv_projections() if hasattr(model, "unfuse_qkv_projections") else _fuse(
            model, False
        )
        torch.testing.assert_close(call(model, inputs), unfused, atol=0, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path)  # saved fused: the fused copies are dropped on load
    with torch.no_grad():
        torch.testing.assert_close(call(dynconvert.load(tmp_path), inputs), unfused, atol=0, rtol=0)
    fused_linear = model.transformer_blocks[0].attn1.to_qkv
    dynconvert.revert(model)
    assert type(fused_linear) is torch.nn.Linear


# -- attention processor swaps -------------------------------------------------------------------
def test_attention_processor_swaps(family):
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    name, model, inputs = family
    with torch.no_grad():
        expected = call(model, inputs)
        for processor in (AttnProcessor(), AttnProcessor2_0()):
            for m in model.modules():  # what set_attn_processor does (DiT's class lacks it)
                if isinstance(m, Attention):
                    m.set_processor(processor)
            torch.testing.assert_close(call(model, inputs), expected, atol=1e-5, rtol=1e-5)


# -- 5. half precision ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_converting_a_half_precision_model(dtype):
    original = tiny_pixart().to(dtype)
    model = dynconvert.convert(copy.deepcopy(original), 0.5)  # example inputs in the model's dtype
    inputs = _inputs(model, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(call(model, inputs), call(original, inputs), atol=0, rtol=0)
        randomize_routing(model, keep=0.5, vary_with_t=False)
        fast = call(model, inputs)
        with dynconvert.routing(model, "eval", "masked"):
            masked = call(model, inputs)
    assert fast.dtype == dtype
    torch.testing.assert_close(fast, masked, atol=2e-2, rtol=2e-2)


# -- deepcopy, batch vs single ---------------------------------------------------------------------
def test_deepcopy_is_independent(converted, tmp_path):
    model = copy.deepcopy(converted["dit"])
    inputs = _inputs(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        expected = call(model, inputs)
        torch.testing.assert_close(call(twin, inputs), expected, atol=0, rtol=0)
        randomize_routing(twin, keep=1.0, vary_with_t=False)  # changes the copy only
        torch.testing.assert_close(call(model, inputs), expected, atol=0, rtol=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            twin.save_pretrained(tmp_path)  # the copy's own save_pretrained saves the copy
        torch.testing.assert_close(
            call(dynconvert.load(tmp_path), inputs), call(twin, inputs), atol=0, rtol=0
        )


def test_batch_equals_single_samples(family):
    name, model, inputs = family
    args, kwargs = inputs

    def sample(i):
        return {k: v[i : i + 1] if torch.is_tensor(v) and v.dim() else v for k, v in kwargs.items()}

    with torch.no_grad():
        batch = call(model, (args, kwargs))
        singles = torch.cat([call(model, (args, sample(i))) for i in range(2)])
    torch.testing.assert_close(batch, singles, atol=1e-5, rtol=1e-5)


# -- 6. LoRA -------------------------------------------------------------------------------------
def _lora_config():
    from peft import LoraConfig

    return LoraConfig(
        r=2,
        lora_alpha=2,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        init_lora_weights=False,
    )


def test_a_lora_on_a_converted_model_is_routed_and_other_adapters_are_refused(family):
    peft = pytest.importorskip("peft")
    name, model, inputs = family
    static = _static(name, model)
    torch.manual_seed(0)
    peft.inject_adapter_in_model(_lora_config(), static)
    torch.manual_seed(0)
    peft.inject_adapter_in_model(_lora_config(), model)  # the same adapter, routed
    assert type(model.transformer_blocks[0].attn1.to_q).__name__ == "RoutedLinear"
    with torch.no_grad():
        with dynconvert.routing(model, "full"):
            torch.testing.assert_close(call(model, inputs), call(static, inputs), atol=1e-5, rtol=0)
        with dynconvert.routing(model, "eval", "masked"):
            masked = call(model, inputs)
        torch.testing.assert_close(call(model, inputs), masked, atol=1e-5, rtol=0)  # fast
    # An adapter that is not a LoRA wraps a routed Linear: refused before it is put in place.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loha = peft.LoHaConfig(r=2, target_modules=["to_q"])
    with pytest.raises(
        dynconvert.LoraNotRoutedError, match="peft loha adapter.*Nothing was replaced"
    ):
        peft.inject_adapter_in_model(loha, model, adapter_name="loha")
    assert model.state_dict().keys() == before.keys()


def test_lora_merged_before_converting_is_routed():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    original = peft.inject_adapter_in_model(_lora_config(), tiny_pixart())  # a LoRA written here
    merged = copy.deepcopy(original)
    for m in list(merged.modules()):
        if isinstance(m, peft.tuners.lora.LoraLayer):
            m.merge()  # the LoRA's update into the base weight
    static = tiny_pixart()
    static.load_state_dict(
        {
            k.replace(".base_layer", ""): v
            for k, v in merged.state_dict().items()
            if "lora_" not in k
        }
    )
    inputs = _inputs(static)
    with torch.no_grad():
        expected = call(original, inputs)  # LoRA applied on the fly
        model = dynconvert.convert(static, 0.5)
        torch.testing.assert_close(call(model, inputs), expected, atol=1e-5, rtol=1e-5)


def test_add_adapter_of_a_converted_model_is_routed():
    from diffusers import DiTTransformer2DModel
    from diffusers.loaders import PeftAdapterMixin

    class LoraDiT(DiTTransformer2DModel, PeftAdapterMixin):
        pass

    model = tiny_diffusers_dit()
    lora_dit = LoraDiT.from_config(model.config)
    lora_dit.load_state_dict(model.state_dict())
    dynconvert.convert(lora_dit, 0.5, example_inputs=_inputs(model))
    lora_dit.add_adapter(_lora_config())
    assert type(lora_dit.transformer_blocks[0].attn1.to_q).__name__ == "RoutedLinear"
    dynconvert.revert(lora_dit)  # the adapter stays, as peft's layer
    assert type(lora_dit.transformer_blocks[0].attn1.to_q).__name__ == "Linear"
    assert "lora_A" in dict(lora_dit.transformer_blocks[0].attn1.to_q.named_children())


# -- torch.compile -------------------------------------------------------------------------------
@pytest.mark.slow
def test_torch_compile_gives_the_eager_output(converted):
    model = copy.deepcopy(converted["pixart"])
    inputs = _inputs(model)
    with torch.no_grad():
        expected = call(model, inputs)
        compiled = torch.compile(model)
        torch.testing.assert_close(call(compiled, inputs), expected, atol=1e-5, rtol=1e-5)
