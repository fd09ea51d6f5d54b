"""What a run measures once calibrated: the FLOPs profile over t, the executed FLOPs, the
benchmark, the digits evaluation and sample grids, assembled into ``report.json``."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dynconvert.analysis.costs import call_macs
from dynconvert.calibration.adapters import resolve_labels, select_adapter
from dynconvert.calibration.capacity import busy_keep, noised_at, spread_timesteps, token_sites
from dynconvert.calibration.objectives import build_objective
from dynconvert.errors import CheckpointError, ConfigError
from dynconvert.flops import last_flops_ratio, routed_ratio
from dynconvert.io.save import save
from dynconvert.measure.bench import benchmark
from dynconvert.measure.evaluations import EVALUATIONS, NONE, evaluation_names
from dynconvert.plan import ROUTER_TIMESTEPS
from dynconvert.runs.folder import REPORT_FILE, SAMPLES_FILE
from dynconvert.runs.sources import first_line, original_model
from dynconvert.runtime.planned.controls import capacity_from_keep
from dynconvert.runtime.routing import routing
from dynconvert.runtime.state import get_state, is_converted
from dynconvert.sampling import compare_grid, model_spec, sample, save_grid
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
    """
    import numpy as np

    bank = get_state(model)
    adapter = select_adapter(model, config.adapter, config.adapter_args)
    objective = build_objective(config, adapter)
    if not resolve_labels(model, adapter, config).uses_labels:
        batch = {k: v for k, v in batch.items() if k != "y"}
    x0 = batch["x"].float()
    ts = spread_timesteps(points)
    counted = set(
        np.linspace(0, len(ts) - 1, min(executed_points, len(ts))).round().astype(int).tolist()
    )
    routed = token_sites(model)
    keep: dict[int, list[float]] = {i: [] for i in routed}
    busy: dict[int, list[float]] = {i: [] for i in routed}  # busy per-sample keep (capacity.py)
    measured, executed = [], []
    full = None
    was = model.training
    model.eval()
    try:
        for k, t in enumerate(ts.tolist()):
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
    # Token capacities of the planned path (GPU): saved in the record with the model.
    capacity_from_keep(model, [int(t) for t in ts], busy)
    grid = torch.arange(ROUTER_TIMESTEPS, dtype=torch.float64)
    width = {i: m.double().mean(1).cpu() for i, m in bank.width_table().items()}  # {site: (1000,)}
    tokens = {  # {site: (1000,)}: keep rates measured at ts, interpolated in between
        i: torch.from_numpy(np.interp(grid.numpy(), ts, np.asarray(k))) for i, k in keep.items()
    }
    reduction = bank.config.token_reduction
    per_t = routed_ratio(bank.plan, reduction, width, tokens) * torch.ones_like(grid)
    blocks_per_t = routed_ratio(
        bank.plan, reduction, width, tokens, blocks_only=True
    ) * torch.ones_like(grid)
    static = bank.plan.static_macs / max(bank.plan.batch, 1)
    blocks = float(bank.plan.blocks_macs_per_sample)
    keep_mean = [
        float(np.mean([keep[i][k] for i in keep])) if keep else 1.0 for k in range(len(ts))
    ]
    return {
        "per_t": [round(float(v), 6) for v in per_t],
        "blocks_per_t": [round(float(v), 6) for v in blocks_per_t],
        "flops_ratio": float(per_t.mean()),
        "flops_ratio_blocks": float(blocks_per_t.mean()),
        "executed_flops_ratio": float(np.mean(executed)) if executed else None,
        "executed_timesteps": [int(ts[k]) for k in sorted(counted)],
        "timesteps": [int(t) for t in ts],
        "token_keep": [round(v, 4) for v in keep_mean],
        "token_sites": len(routed),
        "measured": [round(v, 4) for v in measured],
        "static_macs": static,
        "dynamic_macs": float(per_t.mean()) * static,
        "blocks_macs": blocks,
    }


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
            f"evaluate.kind {kind!r} cannot evaluate model {recipe.model!r}: {reason}. Set evaluate.kind to 'none'"
        )


def build_report(
    prepared: PreparedRun, result: Any, on_event: EventFn | None = None
) -> dict[str, Any]:
    """Measure the calibrated model, save it with its FLOPs profile, and assemble the report."""

    event = on_event or (lambda stage, msg: None)
    recipe, out, model = prepared.recipe, prepared.out, result.model
    settings = recipe.report
    device = next(model.parameters()).device
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    event("profile", "measuring the FLOPs profile on real data")
    batch = _real_batch(prepared.data, settings.profile_batch, prepared.calibration.seed, device)
    prof = flops_profile(model, batch, prepared.calibration, settings.profile_timesteps,
                         settings.executed_timesteps)  # fmt: skip
    timings["profile_s"] = round(time.perf_counter() - t0, 2)
    keep = token_keep_summary(prof)
    kept = "" if keep is None else (f", token keep {keep['mean']:.3f} (t >= 500: "
                                    f"{keep['t_ge_500']:.3f})")  # fmt: skip
    event("profile", f"FLOPs ratio {prof['flops_ratio']:.3f} (mean over t), executed "
          f"{_fmt(prof['executed_flops_ratio'])}{kept}")  # fmt: skip

    summary = {
        "steps": result.steps, "final_loss": result.losses[-1] if result.losses else None,
        "last_flops_ratio_train": result.flops_ratios[-1] if result.flops_ratios else None,
        "skipped_nonfinite": result.skipped_nonfinite, "skipped_grad_norm": result.skipped_grad_norm,
        "resumed_from": str(result.resumed_from) if result.resumed_from else None,
    }  # fmt: skip
    t0 = time.perf_counter()
    save(model, out, flops_ratio_per_t=prof["per_t"],
                    extra={"run": {"recipe": recipe.name, "source": prepared.source.to_dict(with_config=False),
                                   "target_flops": prepared.target}, "calibration": summary})  # fmt: skip
    timings["save_s"] = round(time.perf_counter() - t0, 2)
    event("save", f"saved the model to {out}")

    bench = None
    if settings.bench:
        t0 = time.perf_counter()
        event(
            "bench",
            f"timing original vs dynamic (batch {settings.bench_batch}, t={settings.bench_timestep})",
        )

        bench = benchmark(model, batch=settings.bench_batch, timestep=float(settings.bench_timestep),
                          device=str(device), repeats=settings.bench_repeats, memory=False).to_dict()  # fmt: skip
        model.eval()
        timings["bench_s"] = round(time.perf_counter() - t0, 2)
        event("bench", f"speed-up {bench['speedup']:.2f}x at t={settings.bench_timestep}")

    report: dict[str, Any] = {
        "run_dir": str(out),
        "model": recipe.model,
        "model_class": get_state(model).plan.model_class,
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
        "bench": bench,
    }
    if recipe.evaluate.kind != NONE:
        evaluation = EVALUATIONS[recipe.evaluate.kind]
        t0 = time.perf_counter()
        event("evaluate", f"{evaluation.name}: {evaluation.description}")
        original = original_model({"source": prepared.source.to_dict()}).to(device)
        report.update(evaluation.run(original, model, recipe, out))
        timings["evaluate_s"] = round(time.perf_counter() - t0, 2)
        event("evaluate", evaluation.summary(report))
    if recipe.samples.grid and "samples" not in report:
        t0 = time.perf_counter()
        event("samples", f"writing {SAMPLES_FILE} (original left, dynamic right)")
        write_samples(model, original_model({"source": prepared.source.to_dict()}).to(device),
                      out / SAMPLES_FILE, recipe.samples)  # fmt: skip
        report["samples"] = SAMPLES_FILE
        timings["samples_s"] = round(time.perf_counter() - t0, 2)
    files = {p.name for p in out.iterdir() if not p.name.startswith(".")} | {REPORT_FILE}
    report["files"] = sorted(files)
    report["device"] = str(device)
    report["cpu_threads"] = torch.get_num_threads() if device.type == "cpu" else None
    report["timings"] = timings
    report["dynconvert_version"] = __version__
    return report


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def class_labels(model: nn.Module, labels: list[int] | None = None) -> list[int] | None:
    """The labels to sample (given, or the first classes up to 10); None for unconditional models."""

    spec = model_spec(model)
    if not spec.uses_labels or spec.num_classes is None:
        return None
    if labels is not None:
        bad = [v for v in labels if not 0 <= v < spec.num_classes]
        if bad:
            raise ConfigError(f"labels {bad} are outside 0..{spec.num_classes - 1} of this model")
        return list(labels)
    if spec.num_classes >= 1000:
        return [207, 360, 387, 974, 88, 979, 417, 279]  # DiT's sample.py classes
    return list(range(min(spec.num_classes, 10)))


def draw(model: nn.Module, settings: Any, labels: list[int] | None, full: bool = False,
         on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:  # fmt: skip
    """Samples of ``model`` (routing "full" when ``full``) with the settings' sampler and seed."""

    spec = model_spec(model)
    kwargs = dict(labels=labels, steps=settings.steps, cfg_scale=settings.cfg_scale, seed=settings.seed,
                  scheduler=settings.scheduler, clip_sample=spec.channels in (1, 3), on_step=on_step,
                  num_samples=None if labels else 8)  # fmt: skip
    if spec.adapter.needs_cond:
        raise ConfigError(
            "sampling a text-conditional model needs caption embeddings: use "
            "dynconvert.sampling.sample(model, cond=...) from Python"
        )
    if full and is_converted(model):
        with routing(model, "full"):
            return sample(model, **kwargs)
    return sample(model, **kwargs)


def write_samples(dynamic: nn.Module, original: nn.Module | None, path: Path, settings: Any,
                  vae: str | None = None, raw: bool = False) -> Path:  # fmt: skip
    """``path``: a grid of the dynamic model's samples, beside the original's when given."""

    labels = class_labels(dynamic, getattr(settings, "labels", None))
    images = to_images(draw(dynamic, settings, labels), vae, raw)
    nrow = min(len(images), 10) if len(images) <= 10 else None
    if original is None:
        return save_grid(images, path, nrow=nrow, upscale=_upscale(images))
    base = to_images(draw(original, settings, labels), vae, raw)
    return compare_grid(base, images, path, nrow=nrow, upscale=_upscale(images))


def _upscale(images: torch.Tensor) -> int:
    return max(1, 64 // int(images.shape[-1]))


def to_images(x: torch.Tensor, vae: str | None = None, raw: bool = False) -> torch.Tensor:
    """Samples as images in [-1, 1]: decoded through a local VAE folder when given."""
    if vae is not None:
        from diffusers import AutoencoderKL

        path = Path(vae).expanduser()
        if not path.is_dir():
            raise CheckpointError(
                f"`vae` {vae}: no such folder; pass a local diffusers AutoencoderKL folder"
            )
        try:
            model = AutoencoderKL.from_pretrained(
                str(path), subfolder="vae" if (path / "vae").is_dir() else None
            )
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load a VAE from {path}: {first_line(e)}") from e
        model = model.to(x.device).eval()
        with torch.no_grad():
            return model.decode(x / float(model.config.scaling_factor)).sample.clamp(-1, 1)
    if x.shape[1] in (1, 3):
        return x.clamp(-1, 1)
    if raw:
        return (x[:, :3] / 3.0).clamp(-1, 1)
    raise ConfigError(
        f"the samples are {x.shape[1]}-channel latents: pass `vae` (a local diffusers "
        "AutoencoderKL folder) to decode them, or `raw=True` to write their first 3 channels as colours"
    )
