"""What a run measures once calibrated: the FLOPs profile over t, the executed FLOPs, the
benchmark, the recipe's evaluation and the sample grid (:mod:`dynconvert.runs.samples`),
assembled into ``report.json``."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dynconvert.analysis.costs import call_macs
from dynconvert.calibration.adapters import resolve_labels, select_adapter
from dynconvert.calibration.capacity import busy_keep, noised_at, spread_timesteps, token_sites
from dynconvert.calibration.objectives import build_objective
from dynconvert.errors import ConfigError
from dynconvert.flops import last_flops_ratio, routed_ratio
from dynconvert.io.save import save
from dynconvert.measure.bench import benchmark
from dynconvert.measure.budgets import budget_grid
from dynconvert.measure.evaluations import EVALUATIONS, NONE, evaluation_names
from dynconvert.plan import ROUTER_TIMESTEPS
from dynconvert.runs.folder import REPORT_FILE, SAMPLES_FILE
from dynconvert.runs.samples import match_run_budget, write_samples
from dynconvert.runs.sources import original_model
from dynconvert.runtime.planned.controls import capacity_from_keep
from dynconvert.runtime.routing import routing
from dynconvert.runtime.state import get_state
from dynconvert.version import __version__

if TYPE_CHECKING:
    from dynconvert.runs.request import EventFn, PreparedRun

UNIT = "MACs"


def _real_batch(data: Any, rows: int, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A fixed batch of real calibration rows (for the FLOPs profile)."""
    if hasattr(data, "get_batch") and len(data):
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(data), generator=g)[: min(rows, len(data))].tolist()
        batch = data.prepare(data.get_batch(idx), device)
    else:
        batch = data.prepare(next(iter(data.iterable)), device)
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


@torch.no_grad()
def flops_profile(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    config: Any,
    points: int = 20,
    executed_points: int = 20,
) -> dict[str, Any]:
    """The FLOPs ratio at each of the 1000 timesteps, measured on real data.

    Width masks are a function of t (read for every t from the routers); token keep rates come
    from eval forwards on ``batch`` at ``points`` timesteps spread over 0..999 (linearly
    interpolated in between). At ``executed_points`` of them (evenly spread) the MACs the fast
    path executes are also counted (torch.utils.flop_counter, math attention) against the full
    model's; ``executed_flops_ratio`` is their mean.

    Returns:
        ``per_t`` (1000 whole-model ratios), ``blocks_per_t``, ``flops_ratio`` (their mean),
        ``flops_ratio_blocks``, ``executed_flops_ratio``, ``timesteps`` and ``token_keep``
        (mean over token-routed sites at each measured t), ``measured`` (the batch-mean ratio of
        the eval forward at each measured t).

    Example:
        >>> prof = flops_profile(model, batch, calibration_config, points=5)  # doctest: +SKIP
        >>> len(prof["per_t"])                                                # doctest: +SKIP
        1000
    """
    import numpy as np

    bank = get_state(model)
    ts = spread_timesteps(points)
    counted = set(
        np.linspace(0, len(ts) - 1, min(executed_points, len(ts))).round().astype(int).tolist()
    )
    m = _measure(model, batch, config, ts.tolist(), counted)
    # Token capacities of the planned path (GPU): saved in the record with the model.
    capacity_from_keep(model, [int(t) for t in ts], m["busy"])
    grid = torch.arange(ROUTER_TIMESTEPS, dtype=torch.float64)
    width = {i: w.double().mean(1).cpu() for i, w in bank.width_table().items()}  # {site: (1000,)}
    tokens = {  # {site: (1000,)}: keep rates measured at ts, interpolated in between
        i: torch.from_numpy(np.interp(grid.numpy(), ts, np.asarray(k)))
        for i, k in m["keep"].items()
    }
    reduction = bank.config.token_reduction
    per_t = routed_ratio(bank.plan, reduction, width, tokens) * torch.ones_like(grid)
    blocks_per_t = routed_ratio(
        bank.plan, reduction, width, tokens, blocks_only=True
    ) * torch.ones_like(grid)
    static = bank.plan.static_macs / max(bank.plan.batch, 1)
    keep = m["keep"]
    keep_mean = [
        float(np.mean([keep[i][k] for i in keep])) if keep else 1.0 for k in range(len(ts))
    ]
    executed = m["executed"]
    return {
        "per_t": [round(float(v), 6) for v in per_t],
        "blocks_per_t": [round(float(v), 6) for v in blocks_per_t],
        "flops_ratio": float(per_t.mean()),
        "flops_ratio_blocks": float(blocks_per_t.mean()),
        "executed_flops_ratio": float(np.mean(executed)) if executed else None,
        "executed_timesteps": [int(ts[k]) for k in sorted(counted)],
        "timesteps": [int(t) for t in ts],
        "token_keep": [round(v, 4) for v in keep_mean],
        "token_sites": len(keep),
        "measured": [round(v, 4) for v in m["measured"]],
        "static_macs": static,
        "dynamic_macs": float(per_t.mean()) * static,
        "blocks_macs": float(bank.plan.blocks_macs_per_sample),
    }


def _measure(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    config: Any,
    ts: list[int],
    counted: set[int],
) -> dict[str, Any]:
    """Eval forwards of ``model`` on ``batch`` noised to each of ``ts``: the batch-mean FLOPs
    ratio (``measured``), the executed MACs ratio at the indices in ``counted``
    (``executed``), and per token-routed site its keep rate (``keep``) and busy per-sample
    keep (``busy``, see calibration/capacity.py) at each t."""
    bank = get_state(model)
    adapter = select_adapter(model, config.adapter, config.adapter_args)
    objective = build_objective(config, adapter)
    if not resolve_labels(model, adapter, config).uses_labels:
        batch = {k: v for k, v in batch.items() if k != "y"}
    x0 = batch["x"].float()
    routed = token_sites(model)
    keep: dict[int, list[float]] = {i: [] for i in routed}
    busy: dict[int, list[float]] = {i: [] for i in routed}
    measured, executed = [], []
    full = None
    was = model.training
    model.eval()
    try:
        for k, t in enumerate(ts):
            x_t, t_in = noised_at(objective, x0, t, seed=k)
            step = functools.partial(adapter, model, x_t, t_in, batch)
            if k in counted and full is None:  # the full model's cost does not depend on t
                with routing(model, "full"):
                    full = call_macs(step, model.parameters())
            with routing(model, "eval"):
                if k in counted:
                    executed.append(call_macs(step, model.parameters()) / full)
                else:
                    step()
                measured.append(float(last_flops_ratio(bank).mean()))
                for i in routed:
                    tk = bank.records.get(i, {}).get("tokens")
                    keep[i].append(float(tk.float().mean()) if tk is not None else 1.0)
                    busy[i].append(busy_keep(tk))
    finally:
        model.train(was)
    return {"measured": measured, "executed": executed, "keep": keep, "busy": busy}


def token_keep_summary(prof: dict[str, Any]) -> dict[str, float] | None:
    """Mean token keep rate of a :func:`flops_profile` over its measured timesteps, and over
    those at t >= 500 (mid and high noise); None when the model routes no tokens.

    Example:
        >>> token_keep_summary({"timesteps": [0, 500, 999], "token_keep": [1.0, 0.5, 0.3],
        ...                     "token_sites": 4})
        {'mean': 0.6, 't_ge_500': 0.4}
    """
    if not prof.get("token_sites"):
        return None
    pairs = list(zip(prof["timesteps"], prof["token_keep"]))
    high = [k for t, k in pairs if t >= 500] or [k for _, k in pairs]
    return {
        "mean": round(sum(k for _, k in pairs) / len(pairs), 4),
        "t_ge_500": round(sum(high) / len(high), 4),
    }


def check_report(recipe: Any, model: nn.Module) -> None:
    """Refuse, before any work, an evaluation the recipe asks for that the model cannot take."""
    kind = recipe.evaluate.kind
    if kind == NONE:
        return
    if kind not in EVALUATIONS:
        raise ConfigError(
            f"evaluate.kind {kind!r} is not registered; use one of {', '.join(evaluation_names())}"
        )
    reason = EVALUATIONS[kind].check(model)
    if reason:
        raise ConfigError(
            f"evaluate.kind {kind!r} cannot evaluate model {recipe.model!r}: {reason}. Set "
            "evaluate.kind to 'none'"
        )


def _budget_message(match: dict[str, Any]) -> str:
    """The sampler fit's result in one line: its ratio, or a range model's ratio per budget.

    Example:
        >>> _budget_message({"kind": "grid", "budgets": [{"target": 0.3, "after": 0.2991}]})
        "sampler's FLOPs ratio per budget: 0.3 -> 0.299"
    """
    if match.get("kind") != "grid":
        return f"sampler's FLOPs ratio {_fmt(match.get('after'))}"
    pairs = [f"{m['target']:g} -> {_fmt(m.get('after'))}" for m in match.get("budgets", [])]
    return "sampler's FLOPs ratio per budget: " + ", ".join(pairs)


def build_report(
    prepared: PreparedRun, result: Any, on_event: EventFn | None = None
) -> dict[str, Any]:
    """Measure the calibrated model, save it with its FLOPs profile, and assemble the report.

    The stages, each timed in ``timings``: the FLOPs profile on real data, saving the model,
    the benchmark, the recipe's evaluation and the sample grid (the last three when the recipe
    asks for them).

    Example:
        >>> report = build_report(prepared, calibrate(prepared.model, ...))  # doctest: +SKIP
    """
    event = on_event or (lambda stage, msg: None)
    recipe, out, model = prepared.recipe, prepared.out, result.model
    device = next(model.parameters()).device
    timings: dict[str, float] = {}
    summary = _calibration_summary(result)
    if recipe.report.sampling_budget:  # before the profile and the save: they see the shift
        with _timed(timings, "sampling_budget_s"):
            summary["sampling_budget"] = match_run_budget(
                model, recipe.samples, recipe.report, prepared.target
            )
        event("budget", _budget_message(summary["sampling_budget"]))
    with _timed(timings, "profile_s"):
        prof, keep = _profile(prepared, model, device, event)
    with _timed(timings, "save_s"):
        source = prepared.source.to_dict(with_config=False)
        run = {"recipe": recipe.name, "source": source, "target_flops": prepared.target}
        save(model, out, flops_ratio_per_t=prof["per_t"],
             extra={"run": run, "calibration": summary})  # fmt: skip
    event("save", f"saved the model to {out}")
    bench = None
    if recipe.report.bench:
        with _timed(timings, "bench_s"):
            bench = _bench(model, recipe.report, device, event)
    report = _report_fields(prepared, result, prof, keep, summary, bench)
    if get_state(model).budget_range is not None:  # a budget-conditioned model: its dial
        with _timed(timings, "budget_grid_s"):
            report["budget_grid"] = _grid(model, recipe.report, device, event)
    if recipe.evaluate.kind != NONE:
        evaluation = EVALUATIONS[recipe.evaluate.kind]
        with _timed(timings, "evaluate_s"):
            event("evaluate", f"{evaluation.name}: {evaluation.description}")
            original = original_model({"source": prepared.source.to_dict()}).to(device)
            report.update(evaluation.run(original, model, recipe, out))
        event("evaluate", evaluation.summary(report))
    if recipe.samples.grid and "samples" not in report:
        with _timed(timings, "samples_s"):
            event("samples", f"writing {SAMPLES_FILE} (original left, dynamic right)")
            write_samples(model, original_model({"source": prepared.source.to_dict()}).to(device),
                          out / SAMPLES_FILE, recipe.samples)  # fmt: skip
        report["samples"] = SAMPLES_FILE
    files = {p.name for p in out.iterdir() if not p.name.startswith(".")} | {REPORT_FILE}
    report["files"] = sorted(files)
    report["device"] = str(device)
    report["cpu_threads"] = torch.get_num_threads() if device.type == "cpu" else None
    report["timings"] = timings
    report["dynconvert_version"] = __version__
    return report


@contextlib.contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Record the seconds the block took as ``timings[key]`` (rounded to 0.01 s)."""
    t0 = time.perf_counter()
    yield
    timings[key] = round(time.perf_counter() - t0, 2)


def _profile(
    prepared: PreparedRun, model: nn.Module, device: torch.device, event: EventFn
) -> tuple[dict[str, Any], dict[str, float] | None]:
    """The FLOPs profile on a fixed batch of real rows, and its token keep summary."""
    settings = prepared.recipe.report
    event("profile", "measuring the FLOPs profile on real data")
    batch = _real_batch(prepared.data, settings.profile_batch, prepared.calibration.seed, device)
    prof = flops_profile(model, batch, prepared.calibration, settings.profile_timesteps,
                         settings.executed_timesteps)  # fmt: skip
    keep = token_keep_summary(prof)
    kept = "" if keep is None else (f", token keep {keep['mean']:.3f} (t >= 500: "
                                    f"{keep['t_ge_500']:.3f})")  # fmt: skip
    event("profile", f"FLOPs ratio {prof['flops_ratio']:.3f} (mean over t), executed "
          f"{_fmt(prof['executed_flops_ratio'])}{kept}")  # fmt: skip
    return prof, keep


def _calibration_summary(result: Any) -> dict[str, Any]:
    """What calibration did, for the record and the report."""
    return {
        "steps": result.steps,
        "final_loss": result.losses[-1] if result.losses else None,
        "last_flops_ratio_train": result.flops_ratios[-1] if result.flops_ratios else None,
        "flops_ratio_train": _tail_mean(result.flops_ratios),
        "skipped_nonfinite": result.skipped_nonfinite,
        "skipped_grad_norm": result.skipped_grad_norm,
        "resumed_from": str(result.resumed_from) if result.resumed_from else None,
        "trainable": result.config.trainable,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
    }


def _tail_mean(values: list[float], n: int = 20) -> float | None:
    """Mean of the last ``n`` values (the training ratio at the end, less one batch's noise)."""
    return sum(values[-n:]) / len(values[-n:]) if values else None


def _bench(model: nn.Module, settings: Any, device: torch.device, event: EventFn) -> dict:
    """The original and the dynamic model timed at the report's timestep."""
    t = settings.bench_timestep
    event("bench", f"timing original vs dynamic (batch {settings.bench_batch}, t={t})")
    bench = benchmark(model, batch=settings.bench_batch, timestep=float(t), device=str(device),
                      repeats=settings.bench_repeats, memory=False).to_dict()  # fmt: skip
    model.eval()
    event("bench", f"speed-up {bench['speedup']:.2f}x at t={t}")
    return bench


def _grid(model: nn.Module, settings: Any, device: torch.device, event: EventFn) -> list:
    """The budget grid of a budget-conditioned model (measure/budgets.py), timed as the bench."""
    event("budgets", "measuring the FLOPs and speed-up of each budget in the range")
    rows = budget_grid(model, speed=settings.bench, batch=settings.bench_batch,
                       timestep=float(settings.bench_timestep), repeats=settings.bench_repeats,
                       device=str(device))  # fmt: skip
    model.eval()
    shown = ", ".join(f"{r['budget']:g}: {r['flops_ratio']:.3f}" for r in rows)
    event("budgets", f"FLOPs ratio per budget {shown}")
    return rows


def _report_fields(
    prepared: PreparedRun,
    result: Any,
    prof: dict[str, Any],
    keep: dict[str, float] | None,
    summary: dict[str, Any],
    bench: dict[str, Any] | None,
) -> dict[str, Any]:
    """The report's measured figures (see ``dynconvert convert --help`` for each key)."""
    recipe = prepared.recipe
    return {
        "run_dir": str(prepared.out),
        "model": recipe.model,
        "model_class": get_state(result.model).plan.model_class,
        "recipe": recipe.name,
        "target_flops": prepared.target,
        "steps": result.steps,
        "flops_ratio": prof["flops_ratio"],
        "flops_ratio_blocks": prof["flops_ratio_blocks"],
        "executed_flops_ratio": prof["executed_flops_ratio"],
        "speedup": bench["speedup"] if bench else None,
        "unit": UNIT,
        "static_macs": prof["static_macs"],
        "dynamic_macs": prof["dynamic_macs"],
        "blocks_macs": prof["blocks_macs"],
        "flops_ratio_note": (
            "whole-model MACs ratio (dynamic / original), mean over the 1000 DDPM timesteps; "
            "width masks exact per t, token keep rates measured on real data at "
            f"{len(prof['timesteps'])} timesteps and interpolated"
        ),
        "profile": {
            k: prof[k] for k in ("timesteps", "token_keep", "measured", "executed_timesteps")
        },
        "token_keep": keep,
        "flops_ratio_per_t": prof["per_t"],
        "calibration": summary,
        # the budget at training (batch ratio, last 20 steps) and at sampling, side by side
        "flops_ratio_train": summary["flops_ratio_train"],
        "flops_ratio_sampling": summary.get("sampling_budget", {}).get("after"),
        "bench": bench,
    }


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"
