"""The support matrix: how well each model of the zoo converts, measured, one row per model.

For one zoo entry, :func:`support_row` builds the tiny model, analyses and converts it at a budget
it can reach, checks that the fresh conversion reproduces the original output, randomizes the
routing (``keep=0.5``), checks that the fast path equals the masked path, and measures the executed
FLOPs ratio with PyTorch's counter (math attention). Every failure is caught and reported in the
row as a one-line error, so a whole zoo can be run without one class stopping it.

Example:
    >>> from dynconvert.measure.support import support_row
    >>> row = support_row("dit")
    >>> row["status"], row["fresh_ok"]
    ('converted', True)
"""

from __future__ import annotations

import dataclasses
import re
import time
import traceback
from collections import Counter
from typing import Any

import torch
from torch import nn

from dynconvert.analysis import analyze
from dynconvert.config import ConvertConfig
from dynconvert.convert import convert
from dynconvert.errors import BudgetError
from dynconvert.flops import count_flops, measure_macs, min_ratio
from dynconvert.inputs import split_inputs
from dynconvert.plan import AttentionSite, Plan
from dynconvert.runtime.routing import set_routing
from dynconvert.runtime.synthetic import randomize_routing
from dynconvert.testing.zoo import ZOO

__all__ = [
    "KEEP",
    "TOLERANCE",
    "reason_group",
    "reason_groups",
    "summary",
    "support_row",
    "support_rows",
]

TOLERANCE = 1e-5
"""Largest relative error (L2 norm) for two outputs to count as equal."""

KEEP = 0.5
"""Fraction of heads, groups and tokens kept by the randomized routing."""

_PLAN_FIELDS = {f.name for f in dataclasses.fields(Plan)}
_KNOWN = {
    "model_class",
    "timestep_arg",
    "capture",
    "coverage",
    "batch",
    "input_shapes",
    "attention",
    "mlp",
    "skipped",
    "static_macs",
    "other_macs",
    "version",
}


def _tensor(out: Any) -> torch.Tensor:
    """The first tensor of a model's output (``.sample``, a tuple, a list, a dict...)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample") and isinstance(out.sample, torch.Tensor):
        return out.sample
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        parts = [_tensor(o) for o in out if o is not None]
        parts = [p for p in parts if p is not None]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p.reshape(-1).float() for p in parts])
    raise TypeError(f"cannot find a tensor in an output of type {type(out).__name__}")


def _run(model: nn.Module, inputs: Any) -> torch.Tensor:
    args, kwargs = split_inputs(inputs)
    with torch.no_grad():
        return _tensor(model(*args, **kwargs)).detach().float().clone()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _one_line(e: BaseException) -> str:
    """``Type: message`` on one line, with the innermost frame of the library or model."""
    msg = " ".join(str(e).split())
    if len(msg) > 300:
        msg = msg[:297] + "..."
    frames = traceback.extract_tb(e.__traceback__)
    where = ""
    for f in reversed(frames):
        if "dynconvert" in f.filename or "diffusers" in f.filename:
            where = f" [{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno}]"
            break
    return f"{type(e).__name__}: {msg}{where}"


def _site_notes(plan: Plan) -> list[str]:
    """What is not fully converted in the converted sites (fast path off, width or tokens off)."""
    notes = []
    for s in plan.sites:
        if isinstance(s, AttentionSite):
            if not s.fast and s.fast_reason not in ("", "unverified"):
                notes.append(f"{s.name}: fast path off: {s.fast_reason}")
        else:
            if not s.width and s.width_reason:
                notes.append(f"{s.name}: width not routed: {s.width_reason}")
            if not s.token and s.token_reason:
                notes.append(f"{s.name}: tokens not routed: {s.token_reason}")
            if not s.fast and s.fast_reason not in ("", "unverified"):
                notes.append(f"{s.name}: fast path off: {s.fast_reason}")
    return notes


def _plan_extras(plan: Plan) -> dict[str, Any]:
    """Plan fields this module does not know yet (e.g. per-block notes), as plain data."""
    out = {}
    for name in sorted(_PLAN_FIELDS - _KNOWN):
        value = getattr(plan, name)
        try:
            out[name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        except TypeError:
            out[name] = repr(value)
    return out


def support_row(
    name: str, *, keep: float = KEEP, seed: int = 0, batch: int = 2, flops: bool = True
) -> dict[str, Any]:
    """Convert one zoo model and measure it; never raises for a problem of the model.

    Args:
        name: a key of :data:`dynconvert.testing.zoo.ZOO`.
        keep: the fraction kept by ``randomize_routing`` for the executed-FLOPs measurement.
        seed: seed of the random weights and routing.
        batch: samples in the example inputs (each at its own timestep).
        flops: measure the executed and analytic FLOPs (the slowest part; tests may skip it).

    Returns:
        A JSON-ready dict: ``name``, ``class_name``, ``family``, ``status`` (``"converted"``,
        ``"no sites"``, ``"refused"`` or ``"error"``), ``error`` (one line or None), site counts,
        ``skipped`` (name, kind, reason), ``site_notes``, ``static_macs`` (per sample),
        ``min_ratio``, ``budget``, ``fresh_rel_err``/``fresh_ok``, ``fast_masked_rel_err``/
        ``fast_masked_ok``, ``measured_static_macs`` (the original model, counted),
        ``executed_ratio`` (counted, over the counted original, with one mask for every sample as
        a pipeline calls the model: the whole batch at one timestep), ``analytic_ratio``,
        ``fixed_gap`` (executed / analytic - 1 there: the accountant's check), ``static_gap``
        (analytic / counted static - 1), ``executed_ratio_per_t`` and ``analytic_gap`` (the same
        with each sample at its own timestep: a batched call computes the union of the samples'
        units, so executed exceeds the per-sample analytic mean),
        ``flops_error`` (when PyTorch's counter cannot run the model), ``analyze_s``, ``convert_s``
        and ``forward_s``. ``fast_masked_rel_err`` is the larger of two routings: per-timestep masks
        and one mask for every sample.
    """
    row = _new_row(name)
    try:
        model = ZOO[name].build(seed)
        inputs = ZOO[name].inputs(model, batch=batch)
        reference, measured_static = _forward(model, inputs, row, batch, flops)
        config = ConvertConfig()
        row["stage"] = "analyze"
        t0 = time.perf_counter()
        plan = analyze(model, split_inputs(inputs), config)
        row["analyze_s"] = round(time.perf_counter() - t0, 3)
        row.update(_plan_fields(plan))
        if not plan.sites:
            row.update(status="no sites", stage="done")
            return row
        if not _convert(model, inputs, plan, config, row):
            return row
        row["stage"] = "fresh"
        fresh = _run(model, inputs)
        row["fresh_rel_err"] = _rel(fresh, reference)
        row["fresh_ok"] = row["fresh_rel_err"] <= TOLERANCE
        row["fast_masked_rel_err"] = _routings(model, inputs, row, keep, seed, measured_static)
        row["fast_masked_ok"] = row["fast_masked_rel_err"] <= TOLERANCE
        row.update(status="converted", stage="done")
    except Exception as e:  # noqa: BLE001 - the matrix reports every failure, it never stops
        row["error"] = _one_line(e)
        if row["stage"] == "convert" and type(e).__name__ in ("BudgetError", "NoSitesError"):
            row["status"] = "refused"
    return row


_MEASURED = (
    "static_macs", "min_ratio", "budget", "fresh_rel_err", "fresh_ok", "fast_masked_rel_err",
    "fast_masked_ok", "measured_static_macs", "executed_ratio", "executed_ratio_per_t",
    "analytic_ratio", "analytic_gap", "static_gap", "fixed_gap", "flops_error", "analyze_s",
    "convert_s", "forward_s",
)  # fmt: skip
"""The measured fields of a row, None until measured."""


def _new_row(name: str) -> dict[str, Any]:
    """A row before anything ran: status "error" at stage "build" until a stage passes."""
    entry = ZOO[name]
    return {
        "name": name, "class_name": entry.class_name, "family": entry.family, "note": entry.note,
        "status": "error", "error": None, "stage": "build", "attention": None, "mlp": None,
        "skipped": [], "site_notes": [], "capture": None, "coverage": None, "plan_extras": {},
        **dict.fromkeys(_MEASURED),
    }  # fmt: skip


def _forward(
    model: nn.Module, inputs: Any, row: dict[str, Any], batch: int, flops: bool
) -> tuple[torch.Tensor, float | None]:
    """The original's output and, with ``flops``, its counted MACs (None if it cannot count)."""
    row["stage"] = "forward"
    t0 = time.perf_counter()
    reference = _run(model, inputs)
    row["forward_s"] = round(time.perf_counter() - t0, 4)
    measured_static = None
    if flops:
        try:
            measured_static = measure_macs(model, inputs)
            row["measured_static_macs"] = int(measured_static / batch)
        except Exception as e:  # noqa: BLE001 - a counter that cannot run is a note, not a crash
            row["flops_error"] = "counting the original: " + _one_line(e)
    return reference, measured_static


def _plan_fields(plan: Plan) -> dict[str, Any]:
    """What the analysis found, as row fields."""
    return dict(
        attention=len(plan.attention),
        mlp=len(plan.mlp),
        capture=plan.capture,
        coverage=plan.coverage,
        skipped=[{"name": s.name, "kind": s.kind, "reason": s.reason} for s in plan.skipped],
        site_notes=_site_notes(plan),
        plan_extras=_plan_extras(plan),
        static_macs=int(plan.static_macs_per_sample),
    )


def _convert(
    model: nn.Module, inputs: Any, plan: Plan, config: ConvertConfig, row: dict[str, Any]
) -> bool:
    """Convert at a budget the plan can reach; False (the row refused) when it reaches none."""
    row["stage"] = "budget"
    low = min_ratio(plan, config.token_reduction)
    row["min_ratio"] = round(low, 4)
    budget = max(0.5, min(1.0, round(low + 0.02, 2)))
    row["budget"] = budget
    if low > 1.0:
        row.update(status="refused", stage="done", error=f"minimum reachable ratio {low:.3f} > 1")
        return False
    row["stage"] = "convert"
    t0 = time.perf_counter()
    try:
        convert(model, budget, example_inputs=inputs, config=config)
    except BudgetError:
        # Sites whose fast path failed convert's check were dropped, which raised the floor:
        # the budget only sets the routers' target here, so convert at the full budget.
        row["budget"] = budget = 1.0
        convert(model, budget, example_inputs=inputs, config=config)
    row["convert_s"] = round(time.perf_counter() - t0, 3)
    return True


def _routings(
    model: nn.Module,
    inputs: Any,
    row: dict[str, Any],
    keep: float,
    seed: int,
    measured_static: float | None,
) -> float:
    """The larger fast-vs-masked error of two randomized routings, counting FLOPs of each.

    Two routings: per-timestep masks (each sample of the batch its own), then one mask for
    every sample (so the fast path really slices: exactly half the units on).
    """
    errors = []
    for vary in (True, False):
        row["stage"] = "routing" if vary else "fixed routing"
        randomize_routing(model, keep=keep, seed=seed, vary_with_t=vary, example_inputs=inputs)
        set_routing(model, "eval", execution="masked")
        masked = _run(model, inputs)
        set_routing(model, "eval", execution="fast")
        fast = _run(model, inputs)
        errors.append(_rel(fast, masked))
        if measured_static is not None:
            _count(model, inputs, row, vary, measured_static)
    return max(errors)


def _count(
    model: nn.Module, inputs: Any, row: dict[str, Any], vary: bool, measured_static: float
) -> None:
    """The executed and analytic FLOPs of the routing in force, as row fields."""
    try:
        executed = measure_macs(model, inputs)
        report = count_flops(model, inputs)
    except Exception as e:  # noqa: BLE001 - a counter that cannot run is a note, not a crash
        row["flops_error"] = f"counting the converted model ({row['stage']}): " + _one_line(e)
        return
    if vary:  # each sample its own masks: the batch computes their union
        row["executed_ratio_per_t"] = round(executed / measured_static, 4)
        row["analytic_gap"] = round(executed / report.dynamic_macs - 1.0, 4)
    else:  # one mask for every sample (a pipeline's call): executed must equal analytic
        row["executed_ratio"] = round(executed / measured_static, 4)
        row["analytic_ratio"] = round(report.ratio, 4)
        row["fixed_gap"] = round(executed / report.dynamic_macs - 1.0, 4)
        row["static_gap"] = round(report.static_macs / measured_static - 1.0, 4)


def support_rows(
    names: list[str] | None = None, *, keep: float = KEEP, seed: int = 0
) -> list[dict[str, Any]]:
    """:func:`support_row` of each name (default: the whole zoo), in zoo order."""
    return [support_row(n, keep=keep, seed=seed) for n in (names or list(ZOO))]


def reason_group(reason: str) -> str:
    """A reason with the names of modules, numbers and quoted parts blanked, for grouping."""
    r = re.sub(r"<[^<>]* at 0x[0-9a-f]+>", "<…>", reason)  # object addresses
    r = re.sub(r"'[^']*'|\"[^\"]*\"|`[^`]*`", "'…'", r)
    r = re.sub(r"\b[\w]+(\.[\w]+)+\b", "…", r)  # dotted module names
    r = re.sub(r"\(\w+\)", "(…)", r)  # class names
    r = re.sub(r"\d+(\.\d+)?", "N", r)
    return " ".join(r.split())[:200]


def reason_groups(rows: list[dict[str, Any]]) -> list[tuple[str, int, list[str]]]:
    """Distinct refusal reasons, errors and site notes: (reason, rows it affects, their names),
    most frequent first."""
    by: dict[str, set[str]] = {}
    for row in rows:
        texts = [s["reason"] for s in row["skipped"]] + [
            n.split(": ", 1)[1] for n in row["site_notes"]
        ]
        if row["error"]:
            texts.append(f"[{row['status']} at {row['stage']}] {row['error']}")
        if row.get("flops_error"):
            texts.append(f"[FLOPs not counted] {row['flops_error']}")
        for t in texts:
            by.setdefault(reason_group(t), set()).add(row["name"])
    counts = Counter({k: len(v) for k, v in by.items()})
    return [(k, n, sorted(by[k])) for k, n in counts.most_common()]


def summary(rows: list[dict[str, Any]], threshold: float = 0.75) -> dict[str, Any]:
    """Counts over the rows: converted, within ``threshold`` executed ratio among image/video
    diffusers classes, fresh and fast==masked failures, errors."""
    iv = [r for r in rows if r["family"] in ("image", "video")]
    good = [
        r
        for r in iv
        if r["status"] == "converted"
        and r["executed_ratio"] is not None
        and r["executed_ratio"] <= threshold
    ]
    return {
        "rows": len(rows),
        "image_video": len(iv),
        "image_video_within": len(good),
        "threshold": threshold,
        "converted": sum(r["status"] == "converted" for r in rows),
        "errors": sum(r["status"] == "error" for r in rows),
        "flops_errors": sum(bool(r.get("flops_error")) for r in rows),
        "fresh_failures": sum(r["fresh_ok"] is False for r in rows),
        "fast_masked_failures": sum(r["fast_masked_ok"] is False for r in rows),
    }
