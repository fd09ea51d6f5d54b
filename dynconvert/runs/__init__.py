"""Run folders: what ``dynconvert convert`` does end to end, usable from Python too.

A run builds the base model, converts it, calibrates it toward the FLOPs target, measures the
result and writes everything into one folder::

    runs/digits-0.5/
      run.json            what was asked (model, target, recipe) and the run's status
      checkpoints/        resumable calibration checkpoints (step-0000100.pt, ...)
      model.safetensors   the converted, calibrated model (EMA weights) ...
      dynconvert.json     ... and its record: dynconvert.load("runs/digits-0.5")
      samples.png         original (left) vs dynamic (right), same seeds (when the recipe asks)
      report.json         the figures: FLOPs ratio, executed ratio, speed-up, quality metrics

Every check that can fail on bad input (recipe, model name, budget, checkpoint, data, output
folder and whether it can be written) runs in :func:`prepare_run`, before the folder is
created; :func:`execute_run` then writes, holding the folder's lock (``.dynconvert.lock``, an OS
file lock: a second writer is refused at once with the holder's PID). A run that fails before
its first checkpoint removes only what it wrote (the folder too when it created it); after that
the checkpoints stay and ``resume=True`` continues. A resume that fails leaves ``run.json`` as
it was.

The code lives in these modules: ``sources`` (the base model), ``hub`` (whether the Hugging
Face hub can be reached), ``data`` (the calibration data), ``folder`` (the run folder and its
files), ``lock`` (one writer per folder), ``report`` (the measurements) and ``pipeline`` (the
run itself).

Example:
    >>> from dynconvert.runs import RunRequest, convert_run
    >>> report = convert_run(RunRequest(model="digits", target_flops=0.5))  # doctest: +SKIP
    >>> report["flops_ratio"], report["run_dir"]                            # doctest: +SKIP
"""

from dynconvert.runs.data import synthetic_data
from dynconvert.runs.folder import (
    check_out,
    check_writable,
    default_out,
    dumps,
    load_run,
    read_run,
)
from dynconvert.runs.lock import LOCK_FILE, RunLock, holder
from dynconvert.runs.pipeline import (
    check_requirements,
    convert_run,
    execute_run,
    parse_target,
    prepare_run,
    resolve_device,
)
from dynconvert.runs.report import build_report, flops_profile
from dynconvert.runs.request import EventFn, PreparedRun, RunRequest
from dynconvert.runs.samples import write_samples
from dynconvert.runs.sources import (
    DIFFUSERS_MODELS,
    TEST_MODELS,
    ModelSource,
    original_model,
    resolve_source,
    weights_problem,
)

__all__ = [
    "DIFFUSERS_MODELS",
    "LOCK_FILE",
    "TEST_MODELS",
    "ModelSource",
    "RunLock",
    "EventFn",
    "PreparedRun",
    "RunRequest",
    "build_report",
    "check_out",
    "check_requirements",
    "check_writable",
    "convert_run",
    "default_out",
    "dumps",
    "execute_run",
    "flops_profile",
    "holder",
    "load_run",
    "original_model",
    "parse_target",
    "prepare_run",
    "read_run",
    "resolve_device",
    "resolve_source",
    "synthetic_data",
    "weights_problem",
    "write_samples",
]
