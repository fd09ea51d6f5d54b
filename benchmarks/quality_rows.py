"""One row of the quality study: build (and train) a method's model, sample it, score it.

Part of ``benchmarks/quality_digits.py``: the evaluation every method shares (the same initial
noise, the demo's classifier accuracy and Frechet distance, the FLOPs ratio the sampler's calls
executed), the routed models' per-timestep profile, and the row a worker process returns.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
from quality_cache import (
    cache_schedule,
    cached_call_ratio,
    cached_step_cost,
    first_block_cache,
)
from quality_methods import _BENCH, EVAL_SEED, ROUTED, _recipe, build_trained, match_budget
from torch import nn

import dynconvert
from dynconvert.demo import metrics
from dynconvert.demo.models import demo_spec
from dynconvert.models import build_model
from dynconvert.sampling import sample


def evaluate(
    model: nn.Module,
    settings: dict[str, Any],
    *,
    steps: int,
    routed: bool,
    rest: Any = None,
    seed: int = EVAL_SEED,
    samples: int | None = None,
) -> dict[str, Any]:
    """Sample ``settings["samples"]`` class-balanced digits and score them.

    Returns accuracy, Frechet distance to all real digits, and the mean FLOPs ratio of the
    sampler's calls when ``routed`` (read from the converted model after each call; a call the
    first-block cache ``rest`` served counts only what ran; ``flops_ratio_cached`` is their mean).
    ``seed`` and ``samples`` replace the evaluation's noise and size (a held-out run).
    """
    per_class = (settings["samples"] if samples is None else samples) // 10
    labels = torch.arange(10).repeat_interleave(per_class)
    sampling = demo_spec(_BENCH["name"]).sampling
    ratios: list[float] = []
    cached: list[float] = []
    probe = None
    if routed:
        bank = dynconvert.get_state(model)

        def probe(done: int, total: int) -> None:
            if rest is not None and rest.last_reused:
                cached.append(cached_call_ratio(model))
                ratios.append(cached[-1])
            else:
                ratios.append(float(dynconvert.last_flops_ratio(bank).mean()))

    context = dynconvert.routing(model, "eval") if routed else contextlib.nullcontext()
    t0 = time.perf_counter()
    with context:
        images = sample(model, labels=labels, steps=steps, cfg_scale=sampling["cfg_scale"],
                        seed=seed, scheduler=sampling["scheduler"],
                        clip_sample=sampling["clip_sample"], on_step=probe,
                        batch_size=50).cpu()  # fmt: skip
    seconds = time.perf_counter() - t0
    bench = _BENCH["name"]
    fd = metrics.frechet_from_features(metrics.features(images, benchmark=bench), _real_features())
    return {
        "accuracy": float(metrics.classifier_accuracy(images, labels, bench)),
        "frechet_distance": float(fd),
        "flops_ratio": (sum(ratios) / len(ratios)) if ratios else None,
        "flops_ratio_cached": (sum(cached) / len(cached)) if cached else None,
        "sample_seconds": round(seconds, 1),
    }


def _real_features() -> torch.Tensor:
    bench = _BENCH["name"]
    if bench not in _REAL:
        _REAL[bench] = metrics.features(metrics.real_digits(bench)[0], benchmark=bench)
    return _REAL[bench]


_REAL: dict[str, torch.Tensor] = {}


def token_profile(model: nn.Module, points: int) -> dict[str, list[float]]:
    """Per-timestep width (mean fraction of units on over width-routed sites) and token keep
    rate (mean over token-routed sites, eval routing, real digits noised at t) of a converted
    model, measured like ``report.json``'s profile."""
    from dynconvert.runs.report import flops_profile

    x, y = metrics.real_digits(_BENCH["name"])
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(x), generator=g)[:64]
    batch = {"x": x[idx], "y": y[idx]}
    cfg = _recipe().calibration_config(0.5)
    prof = flops_profile(model, batch, cfg, points, 0)
    bank = dynconvert.get_state(model)
    table = bank.width_table()
    ts = prof["timesteps"]
    width = [
        float(torch.stack([m[t].float().mean() for m in table.values()]).mean()) if table else 1.0
        for t in ts
    ]
    return {"timesteps": ts, "width": width, "token_keep": prof["token_keep"],
            "flops_ratio_per_t": [prof["per_t"][t] for t in ts]}  # fmt: skip


def high_t_keep(profile: dict[str, list[float]]) -> float:
    """Mean token keep rate over the measured t >= 500."""
    vals = [k for t, k in zip(profile["timesteps"], profile["token_keep"], strict=True) if t >= 500]
    return float(sum(vals) / len(vals))


# -- one row ------------------------------------------------------------------------------------
def run_row(method: str, target: float, seed: int, settings: dict[str, Any],
            shared: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Build, train (if the method trains) and evaluate one model; one JSON row."""
    _BENCH["name"] = settings.get("benchmark", "digits")
    steps = settings["sample_steps"]
    row: dict[str, Any] = {"method": method, "target_flops": target, "seed": seed}
    extra: dict[str, Any] = {}
    if method == "original":
        res = evaluate(build_model(_BENCH["name"]).eval(), settings, steps=steps, routed=False)
        res["flops_ratio"] = 1.0
    elif method == "fewer-steps":
        steps = max(1, round(target * settings["sample_steps"]))
        res = evaluate(build_model(_BENCH["name"]).eval(), settings, steps=steps, routed=False)
        res["flops_ratio"] = steps / settings["sample_steps"]
    elif method == "cache":
        model = build_model(_BENCH["name"]).eval()
        cost = shared.setdefault("cached_cost", cached_step_cost(model))
        reuse = cache_schedule(steps, target, cost)
        with first_block_cache(model, reuse):
            res = evaluate(model, settings, steps=steps, routed=False)
        res["flops_ratio"] = (reuse.count(False) + reuse.count(True) * cost) / steps
        extra = {"cached_steps": reuse.count(True), "cached_step_cost": round(cost, 4)}
    elif method == "dynamic+cache":
        res, extra = dynamic_with_cache(target, seed, settings)
    else:
        model, seconds = build_trained(method, target, seed, settings)
        extra = {"calibration_steps": settings["calibration_steps"],
                 "calibration_seconds": round(seconds, 1)}  # fmt: skip
        if settings.get("match_budget") and method in ROUTED:  # static pruning: fixed units
            extra["sampling_budget"] = match_budget(model, target, settings)
        res = evaluate(model, settings, steps=steps, routed=True)
        if method in ("dynamic", "tokens-only", "width-only"):
            prof = token_profile(model, settings["profile_points"])
            extra["token_keep_t_ge_500"] = round(high_t_keep(prof), 4)
            extra["profile"] = prof
    row.update(flops_ratio=round(float(res["flops_ratio"]), 4), steps=steps,
               samples=settings["samples"], accuracy=round(res["accuracy"], 4),
               frechet_distance=round(res["frechet_distance"], 4),
               sample_seconds=res["sample_seconds"], **extra)  # fmt: skip
    return row


def dynamic_with_cache(
    target: float, seed: int, settings: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The first-block cache on top of a dynamic model, at a combined budget ``target``.

    The cache skips the later blocks on about every other step (a cached step costs about half a
    routed full step, so that is a factor of about 0.75) and the routing does the rest: the
    model is calibrated at ``target / 0.75``. The cache's schedule comes from the cached step's
    cost relative to the routed full step, and the routers' thresholds are fitted (the budget
    step) so that the full steps spend what is left; a held-out run with the cache (noise
    EVAL_SEED + 1) measures the mean on the sampler's own calls and the full steps' target is
    scaled by the miss, once. The evaluation measures what its calls executed.
    """
    steps = settings["sample_steps"]
    dyn_target = round(min(1.0, target / 0.75), 4)
    model, seconds = build_trained("dynamic", dyn_target, seed, settings)
    with dynconvert.routing(model, "eval"):
        rel = cached_step_cost(model)  # a cached step's MACs over the full step's (t=500)
    reuse = cache_schedule(steps, target / dyn_target, rel)
    full, n_cached = reuse.count(False), reuse.count(True)
    extra: dict[str, Any] = {
        "calibration_steps": settings["calibration_steps"],
        "calibration_seconds": round(seconds, 1), "dynamic_target": dyn_target,
        "cached_steps": n_cached, "cached_step_cost_t500": round(rel, 4),
    }  # fmt: skip
    held = max(20, settings["samples"] // 10)
    full_target = min(1.0, target * steps / (full + n_cached * rel))  # mean: the target
    points: list[tuple[float, float]] = []  # (full steps' target, held-out ratio with the cache)
    for _ in range(4 if settings.get("match_budget") else 0):
        extra["full_step_target"] = round(full_target, 4)
        extra["sampling_budget"] = match_budget(model, full_target, settings)
        with first_block_cache(model, reuse) as rest:  # the mean on the sampler's own calls
            r = evaluate(model, settings, steps=steps, routed=True, rest=rest,
                         seed=EVAL_SEED + 1, samples=held)  # fmt: skip
        extra["held_out_flops_ratio"] = round(r["flops_ratio"], 4)
        points.append((full_target, r["flops_ratio"]))
        if abs(r["flops_ratio"] - target) <= 0.005:
            break
        # The full steps are a subset of the timesteps (their mean cost differs from all
        # steps', and not in proportion: measured, 0.40 -> 0.255 and 0.47 -> 0.281 at 0.3), so
        # the next target is the secant through the last two rounds (the first: scaled).
        (a, ra), (b, rb) = points[-2] if len(points) > 1 else (0.0, 0.0), points[-1]
        step = (b - a) / (rb - ra) if len(points) > 1 and rb != ra else b / rb
        full_target = min(1.0, max(0.05, b + (target - rb) * step))
    extra["budget_rounds"] = len(points)
    with first_block_cache(model, reuse) as rest:
        res = evaluate(model, settings, steps=steps, routed=True, rest=rest)
    return res, extra


def infeasible_row(
    method: str, target: float, seed: int, settings: dict[str, Any], why: str
) -> dict[str, Any]:
    """A row for a (method, target) the method cannot reach: the metrics are None."""
    return {"method": method, "target_flops": target, "flops_ratio": None, "seed": seed,
            "steps": settings["sample_steps"], "samples": settings["samples"], "accuracy": None,
            "frechet_distance": None, "note": why}  # fmt: skip


def row_job(method: str, target: float, seed: int, settings: dict[str, Any], threads: int,
            shared: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """One row, timed; an unreachable target gives an infeasible row (run in a worker with
    ``--jobs``: its own process, ``threads`` torch threads)."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        row = run_row(method, target, seed, settings, {} if shared is None else shared)
    except dynconvert.BudgetError as e:
        row = infeasible_row(method, target, seed, settings, f"unreachable: {e}")
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row
