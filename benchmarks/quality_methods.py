"""The quality study's methods as models: what each one converts, freezes and trains.

Part of ``benchmarks/quality_digits.py`` (the study runner; its docstring lists the methods):
the method names, the routing flags of each routed method, the conversion and calibration with
the benchmark recipe's settings, static pruning's choice of units, and the post-calibration
step that fits the routers' thresholds to the evaluation's sampler.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

import dynconvert
from dynconvert.analysis.importance import magnitude
from dynconvert.demo.models import demo_spec
from dynconvert.flops import routed_ratio
from dynconvert.models import build_model
from dynconvert.recipes import load_recipe
from dynconvert.sampling.budget import match_sampling_budget

METHODS = (
    "original",
    "fine-tuned",
    "fewer-steps",
    "dynamic",
    "width-only",
    "tokens-only",
    "static-pruning",
    "cache",
    "dynamic+cache",
    "lora",
)
ROW_KEYS = (
    "method",
    "target_flops",
    "flops_ratio",
    "seed",
    "steps",
    "samples",
    "accuracy",
    "frechet_distance",
)
TRAINED = (
    "fine-tuned", "dynamic", "width-only", "tokens-only", "static-pruning", "dynamic+cache", "lora",
)  # fmt: skip
ROUTED = {
    "dynamic": dict(attention_width=True, mlp_width=True, token_routing=True),
    "width-only": dict(attention_width=True, mlp_width=True, token_routing=False),
    # tokens-only: width routers fixed at every unit on (convert with mlp_width=False fails on
    # the digits DiT at this commit: IndexError in dynamic.unit_of_index), same cost.
    "tokens-only": dict(attention_width=True, mlp_width=True, token_routing=True),
    # lora: routed as dynamic; calibration trains a LoRA adapter and the routers, not the weights
    "lora": dict(attention_width=True, mlp_width=True, token_routing=True),
}
_FROZEN_LOGIT = 1e4  # a router logit no Gumbel noise can flip, with exactly zero gradient
EVAL_SEED = 1234  # the initial noise of every evaluation (the same for every method)


_BENCH = {"name": "digits"}  # the benchmark of this process (set by run_row from its settings)


def _recipe():
    return load_recipe(_BENCH["name"])


def _calibration(
    target: float, seed: int, settings: dict[str, Any]
) -> dynconvert.CalibrationConfig:
    cfg = _recipe().calibration_config(target)
    data = {**cfg.__dict__, "seed": seed, "steps": settings["calibration_steps"],
            "batch_size": settings["batch_size"], "output_dir": None, "resume": False}  # fmt: skip
    if settings["calibration_steps"] < cfg.steps:  # a shorter run: scale the schedule with it
        k = settings["calibration_steps"] / cfg.steps
        for key in ("lambda_hold_steps", "warmup_steps", "complete_model_steps"):
            data[key] = max(0, int(round(getattr(cfg, key) * k)))
    return dynconvert.CalibrationConfig(**data)


def _convert(target: float, **flags: bool) -> nn.Module:
    cfg = _recipe().convert_config()
    cfg = dynconvert.ConvertConfig(**{**cfg.__dict__, **flags})
    return dynconvert.convert(build_model(_BENCH["name"]), target, config=cfg)


def _freeze_width(
    model: nn.Module, keep: dict[int, torch.Tensor], token_routers_train: bool = False
) -> None:
    """Fix every width router to the units in ``keep`` (bool per unit), for every timestep,
    and take the router parameters out of training (the token routers' too, unless
    ``token_routers_train``)."""
    bank = dynconvert.get_state(model)
    with torch.no_grad():
        for key, router in bank.width.items():
            router.weight.zero_()
            on = keep[int(key)]
            router.bias.copy_(torch.where(on, _FROZEN_LOGIT, -_FROZEN_LOGIT))
    for p in [*bank.t_embed.parameters(), *bank.width.parameters()]:
        p.requires_grad_(False)
    if not token_routers_train:
        for p in bank.token.parameters():
            p.requires_grad_(False)


def static_keep(model: nn.Module, target: float) -> dict[int, torch.Tensor]:
    """The units static pruning keeps: per site the top ``round(w * units)`` by magnitude, with
    one fraction ``w`` for every site chosen so the FLOPs ratio is as close to ``target`` as the
    rounding allows."""
    bank = dynconvert.get_state(model)
    plan, r = bank.plan, bank.config.token_reduction
    sites = [s for s in plan.sites if s.units > 1]

    def kept(w: float) -> dict[int, int]:
        return {s.index: max(1, min(s.units, round(w * s.units))) for s in sites}

    def ratio(w: float) -> float:
        return float(
            routed_ratio(
                plan, r, {i: k / s.units for (i, k), s in zip(kept(w).items(), sites, strict=True)}
            )
        )

    best = min((abs(ratio(w / 64) - target), w / 64) for w in range(1, 65))[1]
    out = {}
    for s in sites:
        linears = {m.linear: model.get_submodule(m.linear) for m in [*s.in_maps, s.out_map]}
        order = torch.as_tensor(magnitude(s, linears)).argsort(descending=True)
        on = torch.zeros(s.units, dtype=torch.bool)
        on[order[: kept(best)[s.index]]] = True
        out[s.index] = on
    return out


def build_trained(
    method: str, target: float, seed: int, settings: dict[str, Any]
) -> tuple[nn.Module, float]:
    """Convert (or prepare) and train one model; returns it and its calibration seconds."""
    torch.manual_seed(seed)
    if method == "fine-tuned":
        model = _convert(1.0, token_routing=False)
        bank = dynconvert.get_state(model)
        _freeze_width(
            model,
            {int(k): torch.ones(r.out_features, dtype=torch.bool) for k, r in bank.width.items()},
        )
        cal_target = 1.0
    elif method == "static-pruning":
        model = _convert(target, token_routing=False)
        _freeze_width(model, static_keep(model, target))
        cal_target = target
    else:
        model = _convert(target, **ROUTED[method])
        cal_target = target
        if method == "tokens-only":
            bank = dynconvert.get_state(model)
            keep = {
                int(k): torch.ones(r.out_features, dtype=torch.bool) for k, r in bank.width.items()
            }
            _freeze_width(model, keep, token_routers_train=True)
    t0 = time.perf_counter()
    cfg = _calibration(cal_target, seed, settings)
    if method == "lora":  # the recipe's settings, trainable="lora" (rank 16, merged at the end)
        cfg = dynconvert.CalibrationConfig(**{**cfg.__dict__, "trainable": "lora"})
    dynconvert.calibrate(model, _BENCH["name"], cfg)
    return model.eval(), time.perf_counter() - t0


def match_budget(model: nn.Module, target: float, settings: dict[str, Any]) -> dict[str, Any]:
    """Shift the router thresholds so the evaluation's sampler spends ``target`` (held-out noise:
    seed EVAL_SEED + 1, a tenth of the evaluation's samples, at least 20)."""
    sampling = demo_spec(_BENCH["name"]).sampling
    n = max(20, settings["samples"] // 10)
    match = match_sampling_budget(
        model, target, labels=torch.arange(10).repeat_interleave(n // 10),
        steps=settings["sample_steps"], cfg_scale=sampling["cfg_scale"],
        scheduler=sampling["scheduler"], seed=EVAL_SEED + 1, clip_sample=sampling["clip_sample"],
    )  # fmt: skip
    return match.to_dict()
