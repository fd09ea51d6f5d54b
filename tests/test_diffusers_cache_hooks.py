"""diffusers' cache hooks on converted transformers, as a contract (issue 25, item 3).

The training-free caches of ``diffusers.hooks`` (first-block cache, TaylorSeer, pyramid attention
broadcast, MagCache) hook a converted model the way they hook the original: on tiny DiT, PixArt,
SD3 and Flux transformers, driven over a few timesteps as a denoising loop drives them (one cache
context, state reset between runs as diffusers' own tests do),

- they run and really cache (the original's outputs change under the cache);
- on the converted model with every unit on (``routing(model, "full")``) they give the
  original's cached outputs (1e-5);
- with routing on (half the heads, groups and tokens off, a different set at every timestep,
  the fast path) they give finite outputs.

Flux goes through ``enable_cache`` (its class has diffusers' ``CacheMixin``); the others have no
``enable_cache``, so the hook's own ``apply_*`` function is called, which is what
``enable_cache`` dispatches to.
"""

from __future__ import annotations

import contextlib
import copy

import diffusers.hooks as hooks
import pytest
import torch
from diffusers.hooks import HookRegistry
from diffusers.models.cache_utils import CacheMixin

import dynconvert
from dynconvert.testing import randomize_routing
from dynconvert.testing.zoo import ZOO

FAMILIES = ("diffusers-dit", "pixart", "sd3", "flux")
TIMESTEPS = (900, 600, 300)  # one denoising run: a cache context of three calls
_NOW = {"t": 0}  # the loop's current timestep, for pyramid attention broadcast's callback

# The cache's own limits, on the original model as much as on a converted one (diffusers 0.42):
# SD3's last block returns encoder_hidden_states=None, which the first-block cache subtracts.
ORIGINAL_FAILS = {("first_block", "sd3"): TypeError}


def _configs() -> dict:
    """Cache name -> a fresh config (hooks keep per-config state) that caches within 3 calls."""
    made = {
        "first_block": lambda: hooks.FirstBlockCacheConfig(threshold=10.0),
        "taylorseer": lambda: hooks.TaylorSeerCacheConfig(
            cache_interval=2,
            disable_cache_before_step=1,
            taylor_factors_dtype=torch.float32,
            # the first dual-stream block's attention, every single-stream one (Flux): DiT and
            # PixArt name theirs attn1/attn2, which the default patterns miss, and SD3's last
            # block returns None, which TaylorSeer cannot difference
            cache_identifiers=[
                r"transformer_blocks\.0\.attn1?",
                r"single_transformer_blocks\.\d+\.attn",
            ],
        ),  # fmt: skip
        "pyramid_attention_broadcast": lambda: hooks.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(0, 1000),
            current_timestep_callback=lambda: _NOW["t"],
        ),
    }
    if hasattr(hooks, "MagCacheConfig"):  # newer diffusers only
        made["mag"] = lambda: hooks.MagCacheConfig(
            threshold=10.0, num_inference_steps=len(TIMESTEPS), retention_ratio=0.0,
            max_skip_steps=3, mag_ratios=[1.0] * len(TIMESTEPS),
        )  # fmt: skip
    return made


APPLY = {
    "first_block": "apply_first_block_cache",
    "taylorseer": "apply_taylorseer_cache",
    "pyramid_attention_broadcast": "apply_pyramid_attention_broadcast",
    "mag": "apply_mag_cache",
}


@pytest.fixture(scope="module")
def models():
    """Family -> (original, its inputs, converted copy with routing randomised per timestep,
    the original's outputs without a cache)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and robust under load
    out = {}
    for name in FAMILIES:
        entry = ZOO[name]
        original = entry.build(0)
        inputs = entry.inputs(original, batch=1)
        converted = dynconvert.convert(copy.deepcopy(original), 0.5, example_inputs=inputs)
        randomize_routing(converted, keep=0.5, example_inputs=inputs)
        out[name] = (original, inputs, converted, _denoise(original, inputs, cached=False))
    yield out
    torch.set_num_threads(threads)


def _cached(model: torch.nn.Module, cache: str) -> torch.nn.Module:
    """A copy of ``model`` with the cache on (``enable_cache`` where the class has it)."""
    model = copy.deepcopy(model)
    config = _configs()[cache]()
    if isinstance(model, CacheMixin):
        model.enable_cache(config)
    else:
        getattr(hooks, APPLY[cache])(model, config)
    return model


def _denoise(
    model: torch.nn.Module, inputs: dict, cached: bool = True, timesteps: tuple = TIMESTEPS
) -> list[torch.Tensor]:
    """The model's outputs over ``timesteps`` (the same batch at one timestep per call, the
    latents scaled a little per step), in one cache context; the hooks' state is reset first."""
    if cached:
        HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)
    context = (
        CacheMixin.cache_context(model, "cond") if cached else contextlib.nullcontext()
    )  # the class's own method where it has one; the same function for the others
    outs = []
    scale = 1000.0 if inputs["timestep"].max() > 1.5 else 1.0  # Flux takes t in [0, 1]
    with torch.no_grad(), context:
        for i, t in enumerate(timesteps):
            _NOW["t"] = t
            step = dict(inputs, hidden_states=inputs["hidden_states"] * (1.0 - 0.05 * i))
            step["timestep"] = torch.full_like(inputs["timestep"], t * scale / 1000.0)
            out = model(**step)
            outs.append(out.sample if hasattr(out, "sample") else out[0])
    return outs


def _check_contract(models: dict, cache: str) -> None:
    for name, (original, inputs, converted, plain) in models.items():
        failure = ORIGINAL_FAILS.get((cache, name))
        if failure is not None:  # a limit of the cache itself: it fails on the original too
            with pytest.raises(failure):
                _denoise(_cached(original, cache), inputs)
            continue
        reference = _denoise(_cached(original, cache), inputs)
        assert any(not torch.allclose(a, b) for a, b in zip(reference, plain)), (
            name,
            "no cache hit",
        )
        dynamic = _cached(converted, cache)
        with dynconvert.routing(dynamic, "full"):
            full = _denoise(dynamic, inputs)
        for step, (a, b) in enumerate(zip(full, reference)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"{name}, call {step}")
        with dynconvert.routing(dynamic, "eval", execution="fast"):
            routed = _denoise(dynamic, inputs)
        assert all(torch.isfinite(o).all() for o in routed), name
        assert any(not torch.allclose(a, b) for a, b in zip(routed, full)), (name, "routing off")


def test_first_block_cache(models):
    _check_contract(models, "first_block")


def test_taylorseer_cache(models):
    _check_contract(models, "taylorseer")


def test_pyramid_attention_broadcast(models):
    _check_contract(models, "pyramid_attention_broadcast")


def test_mag_cache(models):
    if "mag" not in _configs():
        pytest.skip("this diffusers has no MagCacheConfig")
    _check_contract(models, "mag")


def _single_block_heads(model: torch.nn.Module, inputs: dict, t: int) -> int:
    """Heads the first single-stream block of a converted Flux routes at timestep ``t``."""
    bank = dynconvert.get_state(model)
    site = next(s for s in bank.plan.sites if s.name.startswith("single_transformer_blocks"))
    with torch.no_grad(), dynconvert.routing(model, "eval", execution="fast"):
        model(**dict(inputs, timestep=torch.full_like(inputs["timestep"], t / 1000.0)))
    mask = bank.records[site.index].get("width")
    return site.heads if mask is None else int(mask[0].sum())


def test_a_reused_attention_output_keeps_the_heads_it_was_computed_with(models):
    """Flux's single blocks feed the attention output (not yet projected) to an out-projection
    shared with the MLP. When pyramid attention broadcast hands back an output computed at a
    timestep that routed other heads, the fast path's out-projection takes the columns of the
    heads that output holds (it failed with a shape error before)."""
    _, inputs, converted, _ = models["flux"]
    heads = {t: _single_block_heads(converted, inputs, t) for t in range(50, 1000, 100)}
    computed = next(t for t in heads if heads[t] != heads[50])  # two timesteps routing different
    reused = 50  # numbers of heads: the first call computes, the second reuses its output
    model = _cached(converted, "pyramid_attention_broadcast")
    plain = copy.deepcopy(converted)
    with dynconvert.routing(model, "eval", execution="fast"):
        outs = _denoise(model, inputs, timesteps=(computed, reused))
    with dynconvert.routing(plain, "eval", execution="fast"):
        uncached = _denoise(plain, inputs, cached=False, timesteps=(computed, reused))
    assert all(torch.isfinite(o).all() for o in outs)
    torch.testing.assert_close(outs[0], uncached[0], atol=1e-5, rtol=0)  # computed
    assert not torch.allclose(outs[1], uncached[1])  # reused: the broadcast attention output
