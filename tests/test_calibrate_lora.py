"""Calibration with ``trainable="lora"`` (issue 21, item 3): base weights frozen, one LoRA
adapter on the routed Linears and the routers trained, the EMA and AdamW over those only; at
the end the adapter merged (the default) or kept as a peft file; TD-LoRA gates; exact resume."""

from __future__ import annotations

import sys

import pytest
import torch

import dynconvert
from dynconvert.calibration import CalibrationConfig, calibrate
from dynconvert.calibration.checkpoint import list_checkpoints, load_checkpoint
from dynconvert.calibration.trainable import routed_targets
from dynconvert.errors import ConfigError
from dynconvert.recipes import load_recipe
from dynconvert.runtime.lora import is_lora
from dynconvert.testing import tiny_dit

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")


def converted():
    return dynconvert.convert(tiny_dit(seed=0), budget=0.5)


def latents(n: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(n, 4, 8, 8, generator=g), "y": torch.randint(0, 10, (n,), generator=g)}


def quick(**overrides) -> CalibrationConfig:
    base = dict(
        target=0.5, steps=3, batch_size=8, lambda_hold_steps=0, warmup_steps=0, seed=0,
        trainable="lora", lora_rank=4, lr=1e-2, ema_decay=0.5, capacity_points=0,
    )  # fmt: skip
    return CalibrationConfig(**{**base, **overrides})


def outputs(model, execution="masked"):
    g = torch.Generator().manual_seed(1)
    x, t, y = (
        torch.randn(4, 4, 8, 8, generator=g),
        torch.tensor([0, 300, 600, 999]),
        torch.arange(4),
    )
    with torch.no_grad(), dynconvert.routing(model, "eval", execution):
        return model(x, t, y)


def plain_name(key: str) -> str:
    return key.replace(".base_layer", "")


def test_lora_calibration_trains_the_adapter_and_routers_then_merges(tmp_path, monkeypatch):
    model = converted()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = quick(output_dir=str(tmp_path / "run"))
    result = calibrate(model, latents(), cfg)
    raw = result.train_state_dict
    lora = [k for k in raw if ".lora_" in k]
    assert lora and any(k.endswith("lora_B.dynconvert.weight") and v.abs().max() > 0
                        for k, v in raw.items() if k in lora)  # fmt: skip
    for key, value in raw.items():  # the base weights did not move while training
        if ".lora_" not in key and not key.startswith("dynconvert."):
            assert torch.equal(value, before[plain_name(key)]), key
    assert any(not torch.equal(raw[k], before[k]) for k in before if k.startswith("dynconvert."))
    # The EMA and the optimiser hold the adapter and the routers, nothing else.
    payload = load_checkpoint(list_checkpoints(tmp_path / "run")[-1][1])
    shadow = payload["ema"]["shadow"]
    routers = {f"dynconvert.{n}" for n, _ in dynconvert.get_state(model).named_parameters()}
    assert set(shadow) == set(lora) | routers
    assert result.trainable_params == sum(v.numel() for v in shadow.values())
    assert len(payload["optimizer"]["state"]) == len(shadow)
    assert result.trainable_params < result.total_params
    # Merged: no peft layer left, base weights changed by the adapter, same outputs as kept.
    merged = result.model
    assert not any(is_lora(m) for m in merged.modules()) and not hasattr(merged, "peft_config")
    assert set(merged.state_dict()) == set(before)
    assert not torch.equal(merged.state_dict()["blocks.0.attn.qkv.weight"],
                           before["blocks.0.attn.qkv.weight"])  # fmt: skip
    kept = calibrate(converted(), latents(), quick(lora_save="adapter")).model
    assert sum(is_lora(m) for m in kept.modules()) == len(routed_targets(merged))
    for execution in ("masked", "fast"):
        a, b = outputs(merged, execution), outputs(kept, execution)
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), float((a - b).abs().max())
    # The merged model is saved and loaded without peft.
    dynconvert.save(merged, tmp_path / "merged")
    for name in [m for m in sys.modules if m == "peft" or m.startswith("peft.")]:
        monkeypatch.setitem(sys.modules, name, None)
    loaded = dynconvert.load(tmp_path / "merged")
    assert torch.equal(outputs(loaded), outputs(merged))


def test_td_lora_gates_scale_the_adapter_per_timestep_and_are_saved(tmp_path):
    result = calibrate(converted(), latents(), quick(td_lora=True, lora_save="adapter"))
    model = result.model
    gates = dynconvert.get_state(model).lora_gates
    assert len(gates) == len(routed_targets(model))
    assert any(float(g.weight.abs().max()) > 0 for g in gates.values())  # trained
    dynconvert.save(model, tmp_path / "m")
    assert (tmp_path / "m" / "adapter_model.safetensors").is_file()
    loaded = dynconvert.load(tmp_path / "m")
    assert torch.equal(outputs(loaded), outputs(model))
    with_gates = outputs(model)
    for g in gates.values():
        torch.nn.init.zeros_(g.weight)
        torch.nn.init.zeros_(g.bias)
    assert float((outputs(model) - with_gates).abs().max()) > 1e-6  # the gates do something


@pytest.mark.slow  # 2 s; test_calibrate_loop's resume test is slow too
def test_lora_calibration_resumes_exactly(tmp_path):
    opts = dict(steps=4, checkpoint_every=2, td_lora=True, lora_save="adapter")
    full = calibrate(converted(), latents(), quick(output_dir=str(tmp_path / "a"), **opts))
    calibrate(converted(), latents(), quick(output_dir=str(tmp_path / "b"), **{**opts, "steps": 2}))
    resumed = calibrate(
        converted(), latents(), quick(output_dir=str(tmp_path / "b"), resume=True, **opts)
    )
    assert resumed.resumed_from.name == "step-0000002.pt"
    assert resumed.losses == full.losses
    for key, value in full.train_state_dict.items():
        assert torch.equal(resumed.train_state_dict[key], value), key


def test_lora_settings_are_checked():
    with pytest.raises(ConfigError, match="lora_save='adapter'"):
        quick(td_lora=True)
    with pytest.raises(ConfigError, match="apply to trainable='lora'"):
        quick(trainable="all", lora_save="adapter")
    with pytest.raises(ConfigError, match="lora_save must be one of merge, adapter"):
        quick(lora_save="fused")
    with pytest.raises(ConfigError, match="lora_targets is empty"):
        quick(lora_targets=[])
    with pytest.raises(ConfigError, match="lora_targets"):
        calibrate(converted(), latents(), quick(lora_targets=["no_such_module"]))
    recipe = load_recipe("digits", ["calibration.trainable=lora"])
    assert recipe.calibration_config(0.5).trainable == "lora"


@pytest.mark.parametrize("td_lora", [False, True])
def test_the_memory_plan_counts_the_adapter_attach_lora_adds(td_lora):
    from dynconvert.calibration.memory import TRAINABLE_MODES, MemorySettings, estimate
    from dynconvert.calibration.memory_facts import model_facts
    from dynconvert.calibration.trainable import adapter_numel, attach_lora
    from dynconvert.runtime.state import get_state

    model = converted()
    cfg = quick(td_lora=td_lora, lora_save="adapter" if td_lora else "merge")
    counted = adapter_numel(model, cfg)
    before = sum(p.numel() for p in model.parameters())
    attach_lora(model, cfg)
    assert sum(p.numel() for p in model.parameters()) - before == counted
    facts = model_facts(model, get_state(model).plan, adapter_numel=counted)
    lora = TRAINABLE_MODES["lora"]
    assert not lora.weights_train and lora.trainable(facts) == facts.router_numel + counted
    est = estimate(facts, MemorySettings(8, device="cuda", trainable="lora"))
    assert est.terms["gradients"] == (facts.router_numel + counted) * facts.param_size
