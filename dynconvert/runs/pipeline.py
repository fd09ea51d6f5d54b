"""The end-to-end run: :func:`prepare_run` checks everything and converts the model (nothing
written yet); :func:`execute_run` creates the folder, calibrates (continuing from the last
checkpoint with ``resume``), measures and writes the report; :func:`convert_run` does both."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dynconvert.calibration.checkpoint import list_checkpoints
from dynconvert.calibration.loop import calibrate
from dynconvert.convert import check_budget, convert
from dynconvert.errors import BudgetError, ConfigError, DataError
from dynconvert.recipes import load_recipe, recipe_for_model
from dynconvert.runs.folder import (
    REPORT_FILE,
    check_out,
    default_out,
    remove_run,
    run_identity,
    write_json,
    write_run_state,
)
from dynconvert.runs.report import build_report, check_report
from dynconvert.runs.request import EventFn, PreparedRun, RunRequest
from dynconvert.runs.sources import (
    check_data_shape,
    data_source,
    resolve_source,
    synthetic_data,
)
from dynconvert.state import get_state


def parse_target(value: Any) -> float:
    """A FLOPs target from the command line or Python: a number in (0, 1] (checked by
    :func:`dynconvert.convert.check_budget`; a string is parsed first).

    Example:
        >>> parse_target("0.5")
        0.5
    """
    try:
        return check_budget(float(value) if isinstance(value, str) else value)
    except (ValueError, BudgetError):
        raise BudgetError(
            f"`target_flops` must be a number in (0, 1] (a fraction of the original FLOPs, e.g. "
            f"0.5 for half); got {value!r}"
        ) from None


def resolve_device(device: str) -> str:
    """``device``: "auto" (cuda when present), "cpu" or "cuda" (refused without CUDA)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"`device` must be auto, cpu or cuda; got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            '`device="cuda"`: CUDA is not available on this machine; use `device="cpu"`'
        )
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def prepare_run(request: RunRequest, on_event: EventFn | None = None) -> PreparedRun:
    """Check everything and build the converted model; writes nothing.

    Raises:
        DynconvertError: A bad recipe, model name, budget, checkpoint, data set, device or
            output folder (each message names the fix).
    """

    event = on_event or (lambda stage, msg: None)
    target = parse_target(request.target_flops) if request.target_flops is not None else None
    steps = request.steps
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"`steps` must be an integer >= 1; got {steps!r}")
    recipe_name = request.recipe
    if recipe_name is None and request.model is not None:
        recipe_name = recipe_for_model(request.model)
    explicit = {"model": request.model, "target_flops": target, "checkpoint": request.checkpoint,
                "data": request.data, "calibration.steps": steps}  # fmt: skip
    recipe = load_recipe(recipe_name, list(request.overrides),
                         {k: v for k, v in explicit.items() if v is not None})  # fmt: skip
    if recipe.model is None:
        raise ConfigError(
            'no model: pass `model` (e.g. `model="digits"`) or a `recipe` that names one'
        )
    target = recipe.target_flops
    device = resolve_device(request.device)
    source = resolve_source(
        recipe.model, checkpoint=recipe.checkpoint, random_init=request.random_init,
        model_kwargs=recipe.model_kwargs, seed=int(recipe.calibration.get("seed", 0)),
    )  # fmt: skip
    if recipe.data is None:
        raise DataError(
            f"recipe {recipe.name} needs calibration data: set `data` to a latents folder (see "
            'dynconvert.write_latents), or `data="synthetic"` to try the pipeline on random latents'
        )
    out = Path(request.out) if request.out else default_out(recipe.model, target)
    calibration = recipe.calibration_config(
        target, output_dir=str(out), resume=bool(request.resume), cpu=device == "cpu"
    )
    identity = run_identity(recipe, source, target)
    main = int(os.environ.get("RANK", "0")) == 0
    previous = check_out(out, identity, request.resume, calibration.steps) if main else None
    data = data_source(recipe.data)

    t0 = time.perf_counter()
    model = source.build()
    event("build", f"built {source.describe()} in {time.perf_counter() - t0:.1f} s")
    if data is None:
        data = synthetic_data(model, rows=max(64, calibration.batch_size), seed=calibration.seed)
    check_data_shape(model, data)
    check_report(recipe, model)

    t0 = time.perf_counter()
    model = convert(model, target, config=recipe.convert_config())
    plan = get_state(model).plan
    event("convert", f"converted {len(plan.sites)} sites in {len(plan.blocks)} blocks "
          f"({plan.coverage}) in {time.perf_counter() - t0:.1f} s")  # fmt: skip
    return PreparedRun(
        request=request, recipe=recipe, source=source, target=target, out=out, device=device,
        calibration=calibration, model=model, data=data, identity=identity, previous=previous,
        main_process=main,
    )  # fmt: skip


def execute_run(
    prepared: PreparedRun,
    on_step: Callable[[Any], None] | None = None,
    on_event: EventFn | None = None,
) -> dict[str, Any] | None:
    """Create the run folder, calibrate, measure, save, and write ``report.json``.

    Returns:
        The report (None on the other processes of a multi-process launch).
    """
    event = on_event or (lambda stage, msg: None)
    out, main = prepared.out, prepared.main_process
    t_start = time.perf_counter()
    existed = out.exists()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_run_state(prepared, "running")
    threads = torch.get_num_threads()
    if prepared.recipe.cpu_threads and prepared.device == "cpu":
        torch.set_num_threads(prepared.recipe.cpu_threads)
    try:
        return _calibrate_and_report(prepared, on_step, event, existed, t_start)
    finally:
        torch.set_num_threads(threads)


def _calibrate_and_report(
    prepared: PreparedRun,
    on_step: Callable[[Any], None] | None,
    event: EventFn,
    existed: bool,
    t_start: float,
) -> dict[str, Any] | None:

    out, main = prepared.out, prepared.main_process
    try:
        event(
            "calibrate",
            f"calibrating toward {prepared.target:g} for {prepared.calibration.steps} steps",
        )
        t0 = time.perf_counter()
        result = calibrate(
            prepared.model, prepared.data, prepared.calibration, on_step=on_step
        )
        calibrate_s = time.perf_counter() - t0
    except BaseException:
        if main and prepared.previous is None and not list_checkpoints(out):
            remove_run(out, existed)  # nothing worth keeping: leave nothing behind
        raise
    if not main:
        return None
    report = build_report(prepared, result, event)
    report["timings"]["calibrate_s"] = round(calibrate_s, 2)
    report["timings"]["total_s"] = round(time.perf_counter() - t_start, 2)
    write_json(out / REPORT_FILE, report)
    write_run_state(prepared, "finished", steps=result.steps)
    return report


def convert_run(
    request: RunRequest,
    on_step: Callable[[Any], None] | None = None,
    on_event: EventFn | None = None,
) -> dict[str, Any] | None:
    """:func:`prepare_run` then :func:`execute_run`: one whole ``dynconvert convert``.

    Example:
        >>> report = convert_run(RunRequest(model="digits", target_flops=0.5, out="runs/x"))  # doctest: +SKIP
    """
    return execute_run(prepare_run(request, on_event), on_step=on_step, on_event=on_event)
