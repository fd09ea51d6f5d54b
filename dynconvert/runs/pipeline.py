"""The end-to-end run: :func:`prepare_run` checks everything and converts the model (nothing
written yet); :func:`execute_run` locks the folder, calibrates (continuing from the last
checkpoint with ``resume``), measures and writes the report; :func:`convert_run` does both.

Failure rules: a fresh run that fails before its first checkpoint removes only what it wrote
(the folder too when it created it); a resume that fails before a new checkpoint puts
``run.json`` back as it was. Either way the lock is dropped."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynconvert.calibration.checkpoint import check_resume, list_checkpoints
from dynconvert.calibration.loop import calibrate
from dynconvert.convert import convert
from dynconvert.errors import (
    BudgetError,
    CheckpointError,
    ConfigError,
    DataError,
    DynconvertError,
)
from dynconvert.fields import RECORD_LIMITS, Range, check_value
from dynconvert.io.files import read_bytes
from dynconvert.io.save import atomic_write_bytes
from dynconvert.recipes import Recipe, load_recipe, recipe_for_model
from dynconvert.runs.data import (
    check_data_shape,
    data_source,
    model_input_shape,
    synthetic_data,
)
from dynconvert.runs.folder import (
    REPORT_FILE,
    RUN_FILE,
    check_out,
    check_writable,
    default_out,
    remove_created,
    remove_stale_temps,
    run_identity,
    snapshot,
    write_json,
    write_run_state,
)
from dynconvert.runs.lock import RunLock, refuse_if_locked
from dynconvert.runs.memory import Heartbeat, check_run_memory
from dynconvert.runs.report import build_report, check_report
from dynconvert.runs.request import EventFn, PreparedRun, RunRequest
from dynconvert.runs.sources import ModelSource, resolve_source, weights_problem
from dynconvert.runtime.budgets import parse_budget
from dynconvert.runtime.state import get_state


def parse_target(value: Any) -> tuple[float, list[float] | None]:
    """A FLOPs target from the command line or Python: a number in (0, 1], or a range
    ``"0.3:1.0"`` / ``(0.3, 1.0)`` for a budget-conditioned model (runtime/budgets.py).
    Returns (the target, the range or None); the target of a range is its low end.

    Example:
        >>> parse_target("0.5"), parse_target("0.3:1.0")
        ((0.5, None), (0.3, [0.3, 1.0]))
    """
    try:
        low, budget_range = parse_budget(value)
    except BudgetError:
        raise BudgetError(
            f"`target_flops` must be a number in (0, 1] (a fraction of the original FLOPs, e.g. "
            f"0.5 for half) or a range low:high such as 0.3:1.0; got {value!r}"
        ) from None
    return low, list(budget_range) if budget_range else None


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


def check_samples(recipe: Any, model: Any) -> None:
    """Refuse, before any work, a ``samples.grid`` of a model whose samples are not images.

    Raises:
        ConfigError: The model's samples are latents (not 1 or 3 channels); the message says
            to turn the grid off and sample with a VAE afterwards.
    """
    if not recipe.samples.grid:
        return
    with torch.random.fork_rng(devices=[]):  # example inputs: leave the global RNG as it was
        shape = model_input_shape(model)
    if shape is not None and shape[0] not in (1, 3):
        raise ConfigError(
            f"samples.grid: {recipe.model} samples {shape[0]}-channel latents, which need a VAE "
            "to become images; set samples.grid to false and run `dynconvert sample --vae` "
            "on the finished run"
        )


def prepare_run(request: RunRequest, on_event: EventFn | None = None) -> PreparedRun:
    """Check everything and build the converted model; writes nothing.

    The checks that need no model come first, and every missing requirement (data, weights)
    is named in one error; then the model is built, its data checked and it is converted.

    Raises:
        DynconvertError: A bad recipe, model name, budget, checkpoint, data set, device or
            output folder (each message names the fix).

    Example:
        >>> prepared = prepare_run(RunRequest(model="digits", target_flops=0.5))  # doctest: +SKIP
        >>> prepared.out.as_posix()                                             # doctest: +SKIP
        'runs/digits-0.5'
    """
    event = on_event or (lambda stage, msg: None)
    recipe = _checked_recipe(request)
    target = recipe.target_flops
    device = resolve_device(request.device)
    source = check_requirements(recipe, request.random_init)
    budget = tuple(recipe.budget_range) if recipe.budget_range else target  # convert's
    out = Path(request.out) if request.out else default_out(recipe.model, budget)
    run_fields = {"output_dir": str(out), "resume": bool(request.resume), "cpu": device == "cpu"}
    if request.force:
        run_fields["check_memory"] = False
    calibration = recipe.calibration_config(target, **run_fields)
    identity = run_identity(recipe, source, target)
    main = int(os.environ.get("RANK", "0")) == 0
    previous = None
    if main:
        check_writable(out)
        refuse_if_locked(out)  # another process is writing there: refused before any work
        previous = check_out(out, identity, request.resume, calibration.steps)
    data = data_source(recipe.data)

    t0 = time.perf_counter()
    plan = check_run_memory(source, recipe, calibration, device)  # before any weight exists
    if plan is not None:
        event(
            "memory",
            f"memory plan: about {plan.total / 2**30:.1f} GiB per process "
            f"(micro-batch {plan.settings.micro_batch}) in {time.perf_counter() - t0:.1f} s",
        )
    model = _build(source, recipe, event)
    if data is None:
        data = synthetic_data(model, rows=max(64, calibration.batch_size), seed=calibration.seed)
    check_data_shape(model, data)
    check_report(recipe, model)
    check_samples(recipe, model)

    t0 = time.perf_counter()
    model = convert(model, budget, config=recipe.convert_config(), seed=calibration.seed)
    plan = get_state(model).plan
    if main:
        check_resume(calibration, model)  # the checkpoint to continue from, before any work
    event("convert", f"converted {len(plan.sites)} sites in {len(plan.blocks)} blocks "
          f"({plan.coverage}) in {time.perf_counter() - t0:.1f} s")  # fmt: skip
    return PreparedRun(
        request=request, recipe=recipe, source=source, target=target, out=out, device=device,
        calibration=calibration, model=model, data=data, identity=identity, previous=previous,
        main_process=main,
    )  # fmt: skip


def _checked_recipe(request: RunRequest) -> Recipe:
    """The request's values checked and its recipe loaded, the request's values applied."""
    target, budget_range = (
        parse_target(request.target_flops) if request.target_flops is not None else (None, None)
    )
    steps = request.steps
    if steps is not None:
        check_value("`steps`", steps, int, Range(1))
    for name in ("model", "recipe", "checkpoint", "data", "out"):
        check_value(f"`{name}`", getattr(request, name), str | os.PathLike | None)
    check_value("`overrides`", list(request.overrides), list[str])
    if request.out is not None and not str(request.out).strip():
        raise ConfigError(
            "`out` is empty; pass a folder for the run, or leave it out for the default"
        )
    recipe_name = request.recipe
    if recipe_name is None and request.model is not None:
        recipe_name = recipe_for_model(request.model)
    explicit = {"model": request.model, "target_flops": target, "checkpoint": request.checkpoint,
                "data": request.data, "calibration.steps": steps}  # fmt: skip
    explicit = {k: v for k, v in explicit.items() if v is not None}
    if target is not None:  # a run's target replaces the recipe's, range and all
        explicit["budget_range"] = budget_range
    recipe = load_recipe(recipe_name, list(request.overrides), explicit)
    if recipe.model is None:
        raise ConfigError(
            'no model: pass `model` (e.g. `model="digits"`) or a `recipe` that names one'
        )
    return recipe


def check_requirements(recipe: Recipe, random_init: bool = False) -> ModelSource:
    """The source of a recipe's model, once its weights and its data can both be had.

    Every missing requirement is named in one error, before anything is built or downloaded:
    the data (a recipe without ``data``) and the weights (no checkpoint, or weights from the
    Hugging Face hub when it cannot be reached; see :func:`dynconvert.runs.hub.hub_problem`).

    Raises:
        DataError: Only the data is missing.
        CheckpointError: Only the weights are missing (or a checkpoint is not there).
        ConfigError: Both are missing; the message names each with its fix.

    Example:
        >>> recipe = load_recipe("digits")
        >>> check_requirements(recipe).describe()
        'digits (shipped weights)'
    """
    missing: list[DynconvertError] = []
    source = None
    try:
        source = resolve_source(
            recipe.model, checkpoint=recipe.checkpoint, random_init=random_init,
            model_kwargs=recipe.model_kwargs, seed=int(recipe.calibration.get("seed", 0)),
        )  # fmt: skip
    except CheckpointError as e:
        missing.append(e)
    problem = weights_problem(source) if source is not None else None
    if problem is not None:
        missing.append(CheckpointError(problem))
    if recipe.data is None:
        missing.append(DataError(
            f"recipe {recipe.name} needs calibration data: set `data` to a latents folder (see "
            'dynconvert.write_latents), or `data="synthetic"` to try the pipeline on random latents'
        ))  # fmt: skip
    if len(missing) == 1:
        raise missing[0]
    if missing:
        listed = "; ".join(f"({n}) {e}" for n, e in enumerate(missing, 1))
        raise ConfigError(f"{len(missing)} things are missing to convert {recipe.model}: {listed}")
    assert source is not None
    return source


def _build(source: ModelSource, recipe: Recipe, event: EventFn) -> nn.Module:
    """The base model, built (a ``model_kwargs`` value its constructor refuses is named)."""
    t0 = time.perf_counter()
    try:
        model = source.build()
    except (TypeError, ValueError) as e:  # a model_kwargs value the model's constructor refuses
        if not recipe.model_kwargs:
            raise
        raise ConfigError(
            f"{source.describe()} cannot be built with model_kwargs {recipe.model_kwargs}: {e}"
        ) from e
    event("build", f"built {source.describe()} in {time.perf_counter() - t0:.1f} s")
    return model


def execute_run(
    prepared: PreparedRun,
    on_step: Callable[[Any], None] | None = None,
    on_event: EventFn | None = None,
) -> dict[str, Any] | None:
    """Create the run folder, calibrate, measure, save, and write ``report.json``.

    ``on_step`` gets every step's ``StepInfo``; when it has a ``micro_batch`` method, that gets
    every micro-batch of an accumulating step (``calibrate``'s ``on_micro_batch``).

    Returns:
        The report (None on the other processes of a multi-process launch).
    """
    event = on_event or (lambda stage, msg: None)
    main = prepared.main_process
    t_start = time.perf_counter()
    threads = torch.get_num_threads()
    if prepared.recipe.cpu_threads and prepared.device == "cpu":
        torch.set_num_threads(prepared.recipe.cpu_threads)
    try:
        if not main:
            return _calibrate_and_report(prepared, on_step, event, t_start)
        return _locked_run(prepared, on_step, event, t_start)
    finally:
        torch.set_num_threads(threads)


def _locked_run(
    prepared: PreparedRun,
    on_step: Callable[[Any], None] | None,
    event: EventFn,
    t_start: float,
) -> dict[str, Any] | None:
    """The main process's run, holding the folder's lock throughout."""
    out = prepared.out
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        # Checked again under the lock: another writer may have finished here since prepare.
        prepared.previous = check_out(
            out, prepared.identity, prepared.request.resume, prepared.calibration.steps
        )
        remove_stale_temps(out)  # what a killed writer left; nobody else is writing now
        before = snapshot(out)
        run_file = out / RUN_FILE
        run_before = read_bytes(run_file, RECORD_LIMITS.bytes, out) if run_file.is_file() else None
        checkpoints_before = list_checkpoints(out)
        try:
            write_run_state(prepared, "running")
            return _calibrate_and_report(prepared, on_step, event, t_start)
        except BaseException:
            try:  # best effort: the error that stopped the run is the one to report
                if list_checkpoints(out) == checkpoints_before:  # no progress: undo our writes
                    if prepared.previous is None:
                        remove_created(out, before, created)
                    elif run_before is not None:
                        atomic_write_bytes(run_file, run_before)
            except DynconvertError:
                pass
            raise


def _calibrate_and_report(
    prepared: PreparedRun,
    on_step: Callable[[Any], None] | None,
    event: EventFn,
    t_start: float,
) -> dict[str, Any] | None:

    out, main = prepared.out, prepared.main_process
    event(
        "calibrate",
        f"calibrating toward {prepared.target:g} for {prepared.calibration.steps} steps",
    )
    t0 = time.perf_counter()
    # A caller with on_step (the CLI) draws its own progress: calibrate's own is off then.
    cal = replace(prepared.calibration, progress="off") if on_step else prepared.calibration
    with Heartbeat(out / RUN_FILE) if main else _nothing() as beat:  # run.json says how it went
        step = beat.wrap(on_step) if main else on_step
        micro = getattr(on_step, "micro_batch", None)  # the CLI's bar: micro-batches too
        result = calibrate(prepared.model, prepared.data, cal, on_step=step, on_micro_batch=micro)
    calibrate_s = time.perf_counter() - t0
    if not main:
        return None
    report = build_report(prepared, result, event)
    report["timings"]["calibrate_s"] = round(calibrate_s, 2)
    report["timings"]["total_s"] = round(time.perf_counter() - t_start, 2)
    write_json(out / REPORT_FILE, report)
    write_run_state(prepared, "finished", steps=result.steps)
    return report


@contextlib.contextmanager
def _nothing() -> Any:
    yield None


def convert_run(
    request: RunRequest,
    on_step: Callable[[Any], None] | None = None,
    on_event: EventFn | None = None,
) -> dict[str, Any] | None:
    """:func:`prepare_run` then :func:`execute_run`: one whole ``dynconvert convert``.

    Example:
        >>> request = RunRequest(model="digits", target_flops=0.5, out="runs/x")
        >>> report = convert_run(request)  # doctest: +SKIP
    """
    return execute_run(prepare_run(request, on_event), on_step=on_step, on_event=on_event)
