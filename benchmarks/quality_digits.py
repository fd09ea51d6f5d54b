"""Quality at equal FLOPs on a demo benchmark: dynconvert against the alternatives.

``--benchmark digits`` (default) or ``translated`` (the digits on an empty 32x32 canvas). Every
method starts from the benchmark's shipped DiT, trains (where it trains) on the same data with
the digits recipe's optimiser, batch, schedule and number of steps, and is evaluated the same
way: ``--samples`` class-balanced samples from the same initial noise (DDIM, guidance 1.5), scored
by the digits classifier (accuracy) and the Frechet distance of its features to all 1797 real
digits (``dynconvert.demo.metrics``). Methods:

- ``original``: the shipped model, full sampling steps.
- ``fine-tuned``: the original trained for the same steps on the same data, no routing (the
  control: calibration trains the weights too).
- ``fewer-steps``: the original with ``round(target * steps)`` sampling steps.
- ``dynamic``: dynconvert, width + tokens (the digits recipe); ``width-only``; ``tokens-only``.
  After calibration their router thresholds are shifted on held-out samples of the evaluation's
  sampler so that it spends the target (``dynconvert.sampling.budget``; ``--no-match-budget``
  turns it off, as the studies before it ran).
- ``static-pruning``: the same heads and MLP channel groups removed at every timestep, ranked by
  the importance score convert uses (``dynconvert.analysis.importance.magnitude``), the same
  fraction in every site, then fine-tuned for the same steps.
- ``cache``: training-free, first-block-cache style: on a "cached" sampling step only the first
  block runs, and the residual of the other blocks from the last full step is reused; the cached
  steps are spread evenly so the mean cost matches the target.

Rows go to ``--out`` (one per evaluated model, written as each finishes; rows already there are
skipped, so an interrupted study resumes). Plots are written next to it.

Run (the committed results): see docs/quality.md.
Smoke (under a minute; in the default tests):
``python benchmarks/quality_digits.py --smoke --out /tmp/q.json``
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import dynconvert
from dynconvert.analysis.importance import magnitude
from dynconvert.demo import metrics
from dynconvert.demo.models import demo_spec
from dynconvert.flops import routed_ratio
from dynconvert.models import build_model
from dynconvert.recipes import load_recipe
from dynconvert.sampling import sample
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
TRAINED = ("fine-tuned", "dynamic", "width-only", "tokens-only", "static-pruning", "lora")
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


# -- settings ------------------------------------------------------------------------------
def study_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The sizes of the study (what docs/quality.md states), from the command line."""
    common = dict(benchmark=getattr(args, "benchmark", "digits"),
                  match_budget=getattr(args, "match_budget", True))  # fmt: skip
    if args.smoke:
        return dict(targets=[0.5], seeds={0.5: [0]}, calibration_steps=6, batch_size=16,
                    samples=50, sample_steps=5, profile_points=5, **common)  # fmt: skip
    seeds = {t: list(args.seeds) if args.seeds else [0] for t in args.targets}
    if 0.5 in seeds and not args.seeds:
        seeds[0.5] = list(range(args.seeds_at_half))
    return dict(targets=list(args.targets), seeds=seeds, calibration_steps=args.calibration_steps,
                batch_size=args.batch_size, samples=args.samples, sample_steps=args.sample_steps,
                profile_points=20, **common)  # fmt: skip


def plan_rows(settings: dict[str, Any], methods: list[str]) -> list[tuple[str, float, int]]:
    """(method, target, seed) of every row, in the order they run: every seed at 0.5 first
    (seed 0, then 1, ...), then the other targets; so an interrupted study has the most
    informative rows. ``original`` and ``fine-tuned`` are evaluated at target 1.0 (fine-tuned
    once per seed at 0.5); the training-free methods are deterministic and run for seed 0 only."""
    seeds = settings["seeds"]
    groups = [(0.5, s) for s in seeds.get(0.5, [])]
    groups += [(t, s) for t in sorted(settings["targets"]) if t != 0.5 for s in seeds.get(t, [0])]
    rows: list[tuple[str, float, int]] = []
    for target, seed in groups:
        for m in methods:
            if m == "original":
                row = ("original", 1.0, 0)
            elif m == "fine-tuned":
                row = ("fine-tuned", 1.0, seed)
            elif m in ("fewer-steps", "cache") and seed != 0:
                continue
            else:
                row = (m, target, seed)
            if row not in rows:
                rows.append(row)
    return rows


# -- models -----------------------------------------------------------------------------------
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


# -- the cache ------------------------------------------------------------------------------
class _Rest(nn.Module):
    """Blocks 1..L-1 of a DiT that, on a cached step, add the residual of the last full step."""

    def __init__(self, blocks: list[nn.Module], reuse: list[bool]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.reuse = reuse  # per sampling step of a chunk
        self.calls = 0
        self.residual: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        step = self.calls % len(self.reuse)
        self.calls += 1
        if self.reuse[step] and self.residual is not None and self.residual.shape == x.shape:
            return x + self.residual
        out = x
        for block in self.blocks:
            out = block(out, c)
        self.residual = out - x
        return out


@contextlib.contextmanager
def first_block_cache(model: nn.Module, reuse: list[bool]):
    """Run ``model`` (a DiT) with blocks 1..L-1 cached on the sampling steps ``reuse`` marks."""
    blocks = list(model.blocks)
    rest = _Rest(blocks[1:], reuse)
    model.blocks = nn.ModuleList([blocks[0], rest])
    try:
        yield rest
    finally:
        model.blocks = nn.ModuleList(blocks)


def cache_schedule(steps: int, target: float, cached_cost: float) -> list[bool]:
    """Which sampling steps reuse the cache so the mean cost is closest to ``target`` (the first
    step always runs in full; full steps are spread evenly)."""
    best = None
    for n_full in range(1, steps + 1):
        ratio = (n_full + (steps - n_full) * cached_cost) / steps
        if best is None or abs(ratio - target) < abs(best[1] - target):
            best = (n_full, ratio)
    n_full = best[0]
    full = {int(math.floor(j * steps / n_full)) for j in range(n_full)}
    return [i not in full for i in range(steps)]


def cached_step_cost(model: nn.Module) -> float:
    """MACs of a cached step (first block, embeddings, final layer) over a full step's, counted
    by ``dynconvert.measure_macs``."""
    size = demo_spec(_BENCH["name"]).image_size
    inputs = (torch.zeros(1, 1, size, size), torch.tensor([500]), torch.tensor([0]))
    full = dynconvert.measure_macs(model, inputs)
    with first_block_cache(model, [False, True]) as rest:
        model(*inputs)  # fills the residual
        cached = dynconvert.measure_macs(model, inputs)
        rest.calls = 0
    return cached / full


# -- evaluation -------------------------------------------------------------------------------
def evaluate(
    model: nn.Module, settings: dict[str, Any], *, steps: int, routed: bool
) -> dict[str, Any]:
    """Sample ``settings["samples"]`` class-balanced digits and score them.

    Returns accuracy, Frechet distance to all real digits, and the mean FLOPs ratio of the
    sampler's calls when ``routed`` (read from the converted model after each call).
    """
    per_class = settings["samples"] // 10
    labels = torch.arange(10).repeat_interleave(per_class)
    sampling = demo_spec(_BENCH["name"]).sampling
    ratios: list[float] = []
    probe = None
    if routed:
        bank = dynconvert.get_state(model)

        def probe(done: int, total: int) -> None:
            ratios.append(float(dynconvert.last_flops_ratio(bank).mean()))

    context = dynconvert.routing(model, "eval") if routed else contextlib.nullcontext()
    t0 = time.perf_counter()
    with context:
        images = sample(model, labels=labels, steps=steps, cfg_scale=sampling["cfg_scale"],
                        seed=EVAL_SEED, scheduler=sampling["scheduler"],
                        clip_sample=sampling["clip_sample"], on_step=probe,
                        batch_size=50).cpu()  # fmt: skip
    seconds = time.perf_counter() - t0
    bench = _BENCH["name"]
    fd = metrics.frechet_from_features(metrics.features(images, benchmark=bench), _real_features())
    return {
        "accuracy": float(metrics.classifier_accuracy(images, labels, bench)),
        "frechet_distance": float(fd),
        "flops_ratio": (sum(ratios) / len(ratios)) if ratios else None,
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


def infeasible_row(
    method: str, target: float, seed: int, settings: dict[str, Any], why: str
) -> dict[str, Any]:
    """A row for a (method, target) the method cannot reach: the metrics are None."""
    return {"method": method, "target_flops": target, "flops_ratio": None, "seed": seed,
            "steps": settings["sample_steps"], "samples": settings["samples"], "accuracy": None,
            "frechet_distance": None, "note": why}  # fmt: skip


# -- output ---------------------------------------------------------------------------------------
def load_rows(path: Path) -> dict[str, Any]:
    """The study file (rows and metadata), or an empty one."""
    if path.exists():
        return json.loads(path.read_text())
    return {"rows": []}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically (a resumed study never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread (min..max and sample std) over seeds of each (method, target)."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("frechet_distance") is not None:
            groups.setdefault((r["method"], r["target_flops"]), []).append(r)
    out = []
    for (m, t), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], METHODS.index(kv[0][0]))):
        fd = [r["frechet_distance"] for r in rs]
        acc = [r["accuracy"] for r in rs]
        out.append({
            "method": m, "target_flops": t, "seeds": len(rs),
            "flops_ratio": round(statistics.mean(r["flops_ratio"] for r in rs), 4),
            "fd_mean": round(statistics.mean(fd), 3), "fd_min": min(fd), "fd_max": max(fd),
            "fd_std": round(statistics.stdev(fd), 3) if len(fd) > 1 else None,
            "acc_mean": round(statistics.mean(acc), 4), "acc_min": min(acc), "acc_max": max(acc),
        })  # fmt: skip
    return out


def table(rows: list[dict[str, Any]]) -> str:
    """The summary as a Markdown table."""
    lines = ["| method | target | FLOPs ratio | seeds | FD (mean, min..max) "
             "| accuracy (mean, min..max) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for s in summary(rows):
        spread = f" ({s['fd_min']:.2f}..{s['fd_max']:.2f})" if s["seeds"] > 1 else ""
        aspread = f" ({s['acc_min']:.3f}..{s['acc_max']:.3f})" if s["seeds"] > 1 else ""
        lines.append(f"| {s['method']} | {s['target_flops']:g} | {s['flops_ratio']:.3f} "
                     f"| {s['seeds']} | {s['fd_mean']:.2f}{spread} "
                     f"| {s['acc_mean']:.3f}{aspread} |")  # fmt: skip
    return "\n".join(lines)


def plot(data: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """FD against FLOPs ratio for every method, and the dynamic model's per-timestep width and
    token keep rate; PNGs next to the JSON. Needs matplotlib (``pip install dynconvert[study]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in METHODS:
        pts = [s for s in summary(rows) if s["method"] == m]
        if not pts:
            continue
        pts.sort(key=lambda s: s["flops_ratio"])
        x = [s["flops_ratio"] for s in pts]
        y = [s["fd_mean"] for s in pts]
        lo = [max(0.0, s["fd_mean"] - s["fd_min"]) for s in pts]
        hi = [max(0.0, s["fd_max"] - s["fd_mean"]) for s in pts]
        ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=m,
                    linestyle="-" if len(x) > 1 else "none")  # fmt: skip
    ax.set_xlabel("FLOPs ratio (MACs of the sampler's calls / original's)")
    ax.set_ylabel("Frechet distance to real digits (lower is better)")
    ax.set_yscale("log")
    bench = (data.get("settings") or {}).get("benchmark", "digits")
    ax.set_title(f"{bench}: quality against compute (bars: min..max over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / f"{stem}_fd.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    prof_rows = [r for r in rows if r["method"] == "dynamic" and r.get("profile")]
    if prof_rows:
        r = min(prof_rows, key=lambda r: (abs(r["target_flops"] - 0.5), r["seed"]))
        p = r["profile"]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(p["timesteps"], p["width"], marker=".", label="width (fraction of heads/groups on)")
        ax.plot(p["timesteps"], p["token_keep"], marker=".", label="token keep rate")
        ax.plot(p["timesteps"], p["flops_ratio_per_t"], linestyle="--", label="FLOPs ratio")
        ax.set_xlabel("timestep t (0 = clean, 999 = pure noise)")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"dynamic (width + tokens), target {r['target_flops']:g}, seed {r['seed']}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{stem}_profile.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def merge(parts: list[str], out: Path, plots: bool = True, quiet: bool = False) -> dict[str, Any]:
    """Combine study files run in parallel (disjoint rows) into ``out``, with summary and plots."""
    data: dict[str, Any] = {"rows": [], "parts": []}
    seen = set()
    for part in parts:
        d = load_rows(Path(part))
        data.setdefault("settings", d.get("settings"))
        data["parts"].append(
            {"command": d.get("command"), "elapsed_seconds": d.get("elapsed_seconds")}
        )
        for r in d["rows"]:
            key = (r["method"], r["target_flops"], r["seed"])
            if key not in seen:
                seen.add(key)
                data["rows"].append(r)
    data["summary"] = summary(data["rows"])
    write_json(out, data)
    if plots:
        with contextlib.suppress(ImportError):
            plot(data, out.parent, out.stem)
    if not quiet:
        print(table(data["rows"]))
    return data


# -- main -----------------------------------------------------------------------------------------
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the study (or the rows of it not yet in ``--out``); returns the study file's dict."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--benchmark", default="digits", choices=["digits", "translated"])
    parser.add_argument(
        "--out", default=None, help="default: benchmarks/results/quality_<benchmark>.json"
    )
    parser.add_argument(
        "--no-match-budget", dest="match_budget", action="store_false",
        help="keep the calibrated thresholds (the sampler may spend more or less than the target)",
    )  # fmt: skip
    parser.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--seeds-at-half", type=int, default=3)
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="the seeds of every target (default: 0, and --seeds-at-half at 0.5)",
    )
    parser.add_argument("--calibration-steps", type=int, default=400, help="the recipe's 400")
    parser.add_argument("--batch-size", type=int, default=64, help="the recipe's 64")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--sample-steps", type=int, default=25, help="DDIM steps (the recipe's 25)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per row")
    parser.add_argument(
        "--jobs", type=int, default=1,
        help="rows run at once, each in its own process (2 on a 2-core machine)",
    )  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: under a minute")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument(
        "--merge", nargs="+", metavar="JSON",
        help="run nothing: merge the rows of these study files (parts run in parallel) into --out",
    )  # fmt: skip
    args = parser.parse_args(argv)
    out = Path(args.out or f"benchmarks/results/quality_{args.benchmark}.json")
    if args.merge:
        return merge(args.merge, out, plots=not args.no_plots, quiet=args.quiet)
    torch.set_num_threads(args.threads)
    settings = study_settings(args)
    data = load_rows(out)
    data["settings"] = {**{k: v for k, v in settings.items() if k != "seeds"},
                        "seeds": {str(k): v for k, v in settings["seeds"].items()},
                        "evaluation_seed": EVAL_SEED, "sampler": "ddim",
                        "cfg_scale": demo_spec(args.benchmark).sampling["cfg_scale"]}  # fmt: skip
    data["command"] = "python benchmarks/quality_digits.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    done = {(r["method"], r["target_flops"], r["seed"]) for r in data["rows"]}
    todo = [key for key in plan_rows(settings, args.methods) if key not in done]
    t_start = time.perf_counter()

    def record(row: dict[str, Any]) -> None:  # written as each row finishes: a stop loses one
        data["rows"].append(row)
        data["elapsed_seconds"] = round(data.get("elapsed_seconds", 0) + row["seconds"], 1)
        write_json(out, data)
        if not args.quiet:
            print(f"[{time.perf_counter() - t_start:7.0f} s] {row['method']:15s} target "
                  f"{row['target_flops']:g} seed {row['seed']}: ratio {row['flops_ratio']} "
                  f"acc {row['accuracy']} FD {row['frechet_distance']} ({row['seconds']} s)",
                  flush=True)  # fmt: skip

    if args.jobs > 1 and len(todo) > 1:
        # Rows are independent (each seeds its own training and uses the fixed evaluation
        # noise), so they give the same numbers in parallel; spawn: no forked torch threads.
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            futures = [pool.submit(row_job, *key, settings, args.threads) for key in todo]
            for fut in concurrent.futures.as_completed(futures):
                record(fut.result())
    else:
        shared: dict[str, Any] = {}
        for key in todo:
            record(row_job(*key, settings, args.threads, shared))
    data["summary"] = summary(data["rows"])
    write_json(out, data)
    if not args.no_plots:
        with contextlib.suppress(ImportError):
            plot(data, out.parent, out.stem)
    if not args.quiet:
        print(table(data["rows"]))
    return data


if __name__ == "__main__":
    main()
