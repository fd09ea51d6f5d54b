"""``dynconvert.export``: a converted model as static programs, one per width pattern.

For a sampling schedule the width routers give each timestep a pattern (the planned path's:
width masks and token capacities); every distinct pattern becomes one program that runs the
planned path's math with the token routers inside at their capacities. The folder holds the
weights once (the programs take them as inputs), the programs, a manifest and a loader that
needs only torch (``run_exported.py``). The folder is written under a temporary name and renamed
into place: a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynconvert.deploy import run_exported
from dynconvert.deploy.formats import SUFFIX, check_format, onnx_input_names, write_program
from dynconvert.deploy.program import PlannerTap, cut, main_output, state_of, trace
from dynconvert.deploy.schedule import group_patterns, inputs_at, schedule_timesteps, with_t
from dynconvert.deploy.signature import signature_of
from dynconvert.errors import ConfigError, ExportError, OutputExistsError
from dynconvert.flops import last_flops_ratio
from dynconvert.inputs import eval_mode, model_dtype_device
from dynconvert.plan import MlpSite
from dynconvert.runtime.routing import routing
from dynconvert.runtime.state import get_state
from dynconvert.version import __version__

MANIFEST = "manifest.json"
TOLERANCE = {"pt2": 1e-5, "aoti": 1e-4, "onnx": 1e-4}
"""Largest difference a program may show against the planned path (times max(1, |output|))."""

Progress = Callable[[str, int, int], None]


@dataclass
class ExportResult:
    """What :func:`export` wrote and measured.

    Attributes:
        out: the export folder.
        format: "pt2", "aoti" or "onnx".
        programs: distinct width patterns of the schedule (one program each, per batch).
        files: program files (programs x batches).
        timesteps: timesteps of the schedule.
        batches: the batch sizes the programs take.
        export_s: seconds the export took (tracing, compiling, writing, checking).
        folder_bytes: size of the folder; weights_bytes of the weights file, graph_bytes of the
            program files.
        max_abs_diff: largest difference of a program against the planned path at its
            pattern's first timestep (None when not checked).
        flops_ratio: MACs ratio over the original, mean over the schedule's timesteps.
    """

    out: str
    format: str
    programs: int
    files: int
    timesteps: int
    batches: list[int]
    export_s: float
    folder_bytes: int
    weights_bytes: int
    graph_bytes: int
    max_abs_diff: float | None
    flops_ratio: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def export(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    format: str = "pt2",
    timesteps: Sequence[float] | None = None,
    steps: int = 50,
    scheduler: str = "ddim",
    batch: int | Sequence[int] = 2,
    example_inputs: Any = None,
    height: int | None = None,
    width: int | None = None,
    overwrite: bool = False,
    check: bool = True,
    on_progress: Progress | None = None,
) -> ExportResult:
    """Export a converted model's planned path: one program per width pattern of a schedule.

    Args:
        model: a converted model (calibrated or not), on the device the programs are for.
        out: the export folder to write (refused if it exists, unless ``overwrite``).
        format: "pt2" (torch.export programs), "aoti" (AOTInductor packages) or "onnx".
        timesteps: the values the sampler passes to the model (its own convention); default:
            the ``steps``-step ``scheduler`` schedule of ``dynconvert.sampling.sample``.
        steps: sampler steps of the default schedule.
        scheduler: "ddim", "dpm" or "ddpm" (the default schedule's sampler).
        batch: the batch size(s) the programs take (shapes are static: capacities are counted
            in rows of batch x tokens).
        example_inputs: the inputs of one call (at ``batch``), or a function batch -> inputs;
            default: the model's own example inputs.
        height: resize the (B, C, H, W) sample input to this height (width likewise).
        width: see ``height``.
        overwrite: replace an existing export folder.
        check: run every program through the written loader and compare it with the planned
            path (raises ExportError beyond :data:`TOLERANCE`).
        on_progress: called as ``on_progress(stage, done, total)``.

    Returns:
        The :class:`ExportResult`.

    Raises:
        ExportError: bad format, inputs or folder; an op that does not trace, compile or
            translate (named); a program that does not reproduce the planned path.

    Example:
        >>> import dynconvert
        >>> from dynconvert.testing import tiny_dit
        >>> model = dynconvert.convert(tiny_dit(), 0.5)
        >>> result = dynconvert.export(model, "/tmp/tiny-export", steps=4)  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    check_format(format)
    bank = get_state(model)
    out = Path(out)
    _check_out(out, overwrite)
    batches = _batches(batch)
    name = bank.plan.timestep_arg
    tap = PlannerTap(model)
    with eval_mode(model), routing(model, "eval", "planned"), tap.installed(), torch.no_grad():
        bank.planner.clear()
        calls = {b: inputs_at(model, b, example_inputs, height, width) for b in batches}
        values = _timesteps(timesteps) if timesteps is not None else None
        values = values or schedule_timesteps(model, steps, scheduler)
        calls = {b: with_t(c, name, values[0]) for b, c in calls.items()}
        sig = signature_of(model, calls[batches[0]], name)
        shapes = _shapes(model, sig, calls, name)
        groups = group_patterns(model, calls[batches[0]], name, values)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            manifest, refs = _write_programs(
                model, tap, sig, groups, calls, tmp, format, on_progress
            )
            manifest["shapes"] = shapes
            _write_support(model, tap, manifest, tmp)
            _write_json(tmp / MANIFEST, manifest)
            diff = _check(tmp, refs, format, on_progress) if check else None
            result = _result(out, tmp, manifest, values, batches, diff, t0)
            manifest["export_s"] = result.export_s
            _write_json(tmp / MANIFEST, manifest)
            _publish(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            bank.planner.clear()  # the export's patterns hold no pre-sliced weights
    return result


def _timesteps(timesteps: Sequence[float]) -> list[float]:
    try:
        values = [float(v) for v in timesteps]
    except (TypeError, ValueError):
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise ExportError(
            f"`timesteps` must be a non-empty list of numbers (the values the sampler passes to "
            f"the model); got {timesteps!r}"
        )
    return values


def _batches(batch: int | Sequence[int]) -> list[int]:
    values = [batch] if isinstance(batch, int) else list(batch)
    if not values or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in values):
        raise ExportError(f"`batch` must be a positive integer or a list of them; got {batch!r}")
    return sorted(set(values))


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse a folder that exists (unless it is an export and ``overwrite``) before any work."""
    if out.exists():
        if not out.is_dir():
            raise OutputExistsError(f"`out` {out} is a file; choose a folder path for `out`")
        is_export = (out / MANIFEST).is_file()
        if not overwrite or not (is_export or not any(out.iterdir())):
            hint = "pass `overwrite=True`" if is_export else "choose another `out`"
            raise OutputExistsError(f"`out` {out} already exists and is not empty; {hint}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create the parent of `out` {out}: {e}") from e
    if not os.access(out.parent, os.W_OK):
        raise ExportError(f"cannot write into {out.parent}; choose another `out`")


def _write_programs(
    model: nn.Module, tap: PlannerTap, sig: Any, groups: list[list[float]],
    calls: dict[int, dict[str, Any]], tmp: Path, fmt: str, on_progress: Progress | None,
) -> tuple[dict[str, Any], list[tuple[dict[str, Any], torch.Tensor]]]:  # fmt: skip
    """Trace and write every (pattern, batch) program; the manifest so far and the references."""
    name = get_state(model).plan.timestep_arg
    weights = state_of(model)
    programs: dict[str, Any] = {}
    refs = []
    total, done = len(groups) * len(calls), 0
    for i, group in enumerate(groups):
        pid = f"p{i}"
        entry: dict[str, Any] = {"timesteps": group, "files": {}, "flops_ratio": {}}
        for b, named in calls.items():
            call = with_t(named, name, group[0])
            tap.used = set()
            ref = main_output(model(**call)).detach().clone()  # the planned path, eagerly
            entry["flops_ratio"][str(b)] = round(float(last_flops_ratio(model).mean()), 6)
            entry.update(_pattern_facts(model))
            keys = sorted(tap.used)
            slices = {
                f"{k}:{part}": v for k in keys for part, v in cut(tap.specs[k], weights).items()
            }
            ep = trace(model, sig, tap, call, slices)
            file = Path("programs") / f"{pid}-b{b}{SUFFIX[fmt]}"
            names = None
            if fmt == "onnx":
                names = onnx_input_names(
                    list(weights), list(slices), [s["path"] for s in sig.tensors]
                )
                entry["onnx_inputs"] = names
            write_program(ep, tmp / file, fmt, names)
            entry["files"][str(b)] = str(file)
            entry["slices"] = keys
            refs.append((call, ref))
            done += 1
            if on_progress is not None:
                on_progress("programs", done, total)
        programs[pid] = entry
    manifest = {
        "format": run_exported.FORMAT, "version": run_exported.VERSION,
        "dynconvert_version": __version__, "torch_version": torch.__version__,
        "program_format": fmt, "model_class": type(model).__name__, "inputs": sig.to_dict(),
        "programs": programs, "flops_unit": "MACs",
        "schedule": [[t, pid] for pid, p in programs.items() for t in p["timesteps"]],
    }  # fmt: skip
    return manifest, refs


def _pattern_facts(model: nn.Module) -> dict[str, Any]:
    """The current planned pattern's width (units computed per site, None: all) and token
    capacities (fraction of the call's rows per token-routed site)."""
    bank = get_state(model)
    pattern = bank.planner.current
    width, capacity = {}, {}
    for site in bank.plan.sites:
        plan = pattern.sites[site.index]
        width[str(site.index)] = list(plan.decision.key) if plan.decision is not None else None
        if isinstance(site, MlpSite) and site.token:
            capacity[str(site.index)] = plan.capacity
    return {"width": width, "capacities": capacity}


def _shapes(model: nn.Module, sig: Any, calls: dict[int, dict[str, Any]], name: str) -> dict:
    """Per batch, the shape of every tensor input (the same inputs at every batch, or an error)."""
    out = {}
    for b, call in calls.items():
        tensors = signature_of(model, call, name).tensors
        if [t["path"] for t in tensors] != [t["path"] for t in sig.tensors]:
            raise ExportError(
                f"the example inputs at batch {b} are not the same inputs as at batch "
                f"{next(iter(calls))}; `example_inputs` must give the same call at every batch"
            )
        out[str(b)] = [t["shape"] for t in tensors]
    return out


def _write_support(model: nn.Module, tap: PlannerTap, manifest: dict[str, Any], tmp: Path) -> None:
    """The weights (once), the slice index tensors and the loader, beside the programs."""
    weights = state_of(model)
    torch.save({k: v.cpu() for k, v in weights.items()}, tmp / "weights.pt")
    used = {k for p in manifest["programs"].values() for k in p["slices"]}
    specs = {k: {"weight": s.weight, "bias": s.bias, "dim": s.dim, "index": s.index}
             for k, s in tap.specs.items() if k in used}  # fmt: skip
    torch.save(specs, tmp / "slices.pt")
    shutil.copyfile(run_exported.__file__, tmp / "run_exported.py")
    dtype, device = model_dtype_device(model)
    config = getattr(model, "config", None)
    manifest.update(
        weights="weights.pt", slices="slices.pt", weight_names=list(weights),
        dtype=str(dtype).split(".")[-1], device=str(device), config=_jsonable(config),
        batches=sorted(int(b) for b in manifest["shapes"]), budget=get_state(model).budget,
        sampling=_sampling_facts(model),
    )  # fmt: skip


def _sampling_facts(model: nn.Module) -> dict[str, Any] | None:
    """What a sampler needs to know (``dynconvert.sampling.model_spec``), or None."""
    from dynconvert.sampling import model_spec

    try:
        spec = model_spec(model)
    except ConfigError:
        return None
    keys = ("channels", "image_size", "beta_schedule", "timestep_offset", "prediction_type",
            "num_classes", "null_label", "uses_labels", "learned_sigma")  # fmt: skip
    return {k: getattr(spec, k) for k in keys}


def _jsonable(config: Any) -> dict[str, Any] | None:
    """A diffusers config as JSON (entries that are not JSON are left out)."""
    if config is None or not hasattr(config, "items"):
        return None
    out = {}
    for k, v in config.items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        out[k] = v
    return out


def _check(tmp: Path, refs: list, fmt: str, on_progress: Progress | None) -> float:
    """Every program through the written loader against the planned path: the largest
    difference (raises ExportError beyond the format's tolerance)."""
    loaded = run_exported.load(tmp)
    worst = 0.0
    for i, (call, ref) in enumerate(refs):
        got = loaded(**call)
        diff = float((got.float() - ref.float()).abs().max())
        scale = max(1.0, float(ref.float().abs().max()))
        if not diff <= TOLERANCE[fmt] * scale:
            raise ExportError(
                f"an exported {fmt} program differs from the planned path by {diff:.3g} "
                f"(tolerance {TOLERANCE[fmt] * scale:.3g}); this is a bug: please report it"
            )
        worst = max(worst, diff)
        if on_progress is not None:
            on_progress("check", i + 1, len(refs))
    return worst


def _result(out: Path, tmp: Path, manifest: dict[str, Any], values: list[float],
            batches: list[int], diff: float | None, t0: float) -> ExportResult:  # fmt: skip
    files = [tmp / f for p in manifest["programs"].values() for f in p["files"].values()]
    graph = sum(f.stat().st_size for f in files)
    folder = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    weights = (tmp / "weights.pt").stat().st_size
    ratio = sum(
        next(iter(p["flops_ratio"].values())) * len(p["timesteps"])
        for p in manifest["programs"].values()
    ) / len(values)
    return ExportResult(
        out=str(out), format=manifest["program_format"], programs=len(manifest["programs"]),
        files=len(files), timesteps=len(values), batches=batches,
        export_s=round(time.perf_counter() - t0, 3), folder_bytes=folder, weights_bytes=weights,
        graph_bytes=graph, max_abs_diff=diff, flops_ratio=round(ratio, 6),
    )  # fmt: skip


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place (an existing export is replaced only now)."""
    os.chmod(tmp, 0o777 & ~_umask())
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


__all__ = ["MANIFEST", "TOLERANCE", "ExportResult", "export"]
