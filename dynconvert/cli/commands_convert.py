"""``dynconvert convert``: build, convert, calibrate, measure and save one run folder."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Annotated, Any

import typer

from dynconvert.cli import render
from dynconvert.cli.errors import EXIT_INTERRUPTED
from dynconvert.cli.options import (
    CheckpointOpt,
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    SetOpt,
    unset_option,
)

REPORT_KEYS = """report.json (also printed with --json; MACs per sample, 1 MAC = 2 FLOPs): run_dir,
model, model_class, recipe, target_flops, steps, flops_ratio (whole-model ratio, mean over the
1000 timesteps; width masks exact per t, token keep rates measured on real batches),
flops_ratio_blocks, executed_flops_ratio (counted by torch.utils.flop_counter), flops_ratio_train
(calibration batches, last 20 steps) and flops_ratio_sampling (the recipe's sampler on held-out
noise after report.sampling_budget's threshold shift; null when off), speedup (benchmark
at a representative timestep), unit ("MACs"), static_macs, dynamic_macs, blocks_macs,
flops_ratio_note, profile {timesteps, token_keep, measured, executed_timesteps},
flops_ratio_per_t (1000 values, also in dynconvert.json), calibration {steps, final_loss, ...},
bench (see 'dynconvert bench --help'), files, device, cpu_threads, timings, dynconvert_version;
for the digits demo classifier_accuracy and frechet_distance, each {"original": .., "dynamic": ..},
evaluation, and samples ("samples.png"); for a budget range (--target-flops 0.3:1.0) budget_grid,
a list of {budget, flops_ratio, executed_flops_ratio, speedup} over the range."""


TargetOpt = Annotated[
    str | None,
    unset_option(
        "--target-flops",
        "-t",
        help=(
            "FLOPs budget: a fraction of the original model's, in (0, 1], or a range low:high "
            "(e.g. 0.3:1.0) for one model that runs at any budget in it (default: the recipe's)."
        ),
    ),
]
RecipeOpt = Annotated[
    str | None,
    unset_option(
        "--recipe",
        help="A shipped recipe (see 'dynconvert recipes list') or a YAML file "
        "(default: the recipe for --model).",
    ),
]
DataOpt = Annotated[
    str | None,
    unset_option(
        "--data",
        "-d",
        help="Calibration data: a latents folder, 'digits', or 'synthetic' "
        "(random latents, to try the pipeline).",
    ),
]
StepsOpt = Annotated[
    int | None,
    unset_option("--steps", help="Calibration steps (overrides the recipe's).", min=1),
]
OutOpt = Annotated[
    str | None, unset_option("--out", "-o", help="Run folder (default: runs/<model>-<target>).")
]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")
]
RandomInitOpt = Annotated[
    bool,
    typer.Option(
        "--random-init", help="Start from random weights (to try the pipeline, not for use)."
    ),
]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Start even when the memory plan says calibration will not fit this machine.",
    ),
]


def convert(
    model: ModelOpt = None,
    target_flops: TargetOpt = None,
    recipe: RecipeOpt = None,
    checkpoint: CheckpointOpt = None,
    data: DataOpt = None,
    steps: StepsOpt = None,
    out: OutOpt = None,
    device: DeviceOpt = "auto",
    resume: ResumeOpt = False,
    random_init: RandomInitOpt = False,
    set_: SetOpt = None,
    json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Convert a model, calibrate it toward a FLOPs budget, and save the run.

    Loads the base model, converts it, calibrates with live progress (step, loss, FLOPs ratio,
    ETA), then measures the result and writes the run folder: model.safetensors and
    dynconvert.json (load with dynconvert.load), report.json, samples.png (digits), and
    checkpoints that --resume continues from. Everything that can be wrong with the options is
    checked before the folder is created, every missing requirement (data, weights) is named in
    one message, and a calibration that will not fit in memory is refused with the estimate and
    settings that fit (dynconvert inspect --calibration).

    [bold]Examples[/bold]

      dynconvert convert --model digits --target-flops 0.5

      dynconvert convert --model dit-xl --checkpoint DiT-XL-2-256x256.pt \\
        --data latents/ --target-flops 0.5

      dynconvert convert --recipe dit-s --checkpoint DiT-S-2.pt --data latents/ \\
        --set calibration.lr=2e-5

      dynconvert convert --model digits --target-flops 0.5 --out runs/digits-0.5 \\
        --resume --steps 1200
    """
    from dynconvert.runs import RunRequest, execute_run, prepare_run

    request = RunRequest(
        model=model, target_flops=target_flops, recipe=recipe, checkpoint=checkpoint, data=data,
        steps=steps, out=out, device=device, resume=resume, random_init=random_init,
        overrides=list(set_ or []), force=force,
    )  # fmt: skip
    main_process = int(os.environ.get("RANK", "0")) == 0  # under accelerate launch / torchrun
    on_event = render.event_printer() if main_process else None
    checked: list[tuple[str, str]] = []  # shown once every check passed: an error stays one line
    with render.status("checking the options, building and converting the model"):
        prepared = prepare_run(request, on_event=lambda stage, msg: checked.append((stage, msg)))
    for stage, msg in checked if on_event is not None else []:
        on_event(stage, msg)
    if not prepared.main_process:
        execute_run(prepared)
        return
    report = _execute_with_progress(prepared, on_event)
    if json:
        render.print_json(report)
    else:
        show(report)


def _execute_with_progress(prepared: Any, on_event: Any) -> dict[str, Any]:
    """Run a prepared run with a progress bar; Ctrl-C says which checkpoint was kept."""
    from dynconvert.runs import execute_run

    progress = render.StepProgress(prepared.calibration.steps)
    try:
        with progress, terminate_as_exit():
            return execute_run(prepared, on_step=progress, on_event=on_event)
    except KeyboardInterrupt:
        from dynconvert.calibration.checkpoint import latest_checkpoint

        last = latest_checkpoint(prepared.out) if prepared.out.exists() else None
        where = (
            f"checkpoint {last} kept: add --resume to continue"
            if last
            else "no checkpoint was written"
        )
        render.err().print(f"Interrupted; {where}.", markup=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None


EXIT_TERMINATED = 128 + signal.SIGTERM


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit(143)`` while the block runs, so that its cleanup runs.

    Temp files are removed, the run folder's lock is dropped and a failed fresh run removes what
    it wrote, as on Ctrl-C (``kill -9`` cannot be caught: the next start removes leftovers).
    Only in the main thread (elsewhere Python allows no signal handlers): there it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(EXIT_TERMINATED)

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def show(report: dict[str, Any]) -> None:
    """Print a run report as a table on stdout."""
    model_class = report["model_class"].rsplit(".", 1)[-1]
    macs = (
        f"{render.macs(report['dynamic_macs'])}MACs of "
        f"{render.macs(report['static_macs'])}MACs per sample"
    )
    bench = report.get("bench") or {}
    speedup = (
        "-"
        if report.get("speedup") is None
        else f"{report['speedup']:.2f}x (batch {bench['batch']}, t={bench['timestep']:g}, "
        f"{bench['device']})"
    )
    rows: list[tuple[str, Any]] = [
        ("run folder", report["run_dir"]),
        ("model", f"{report['model']} ({model_class}), recipe {report['recipe']}"),
        ("steps", report["steps"]),
        ("target FLOPs", report["target_flops"]),
        ("FLOPs ratio (mean over t)", f"{render.ratio(report['flops_ratio'])}  ({macs})"),
        ("blocks-only ratio", render.ratio(report["flops_ratio_blocks"])),
        ("executed FLOPs ratio", render.ratio(report["executed_flops_ratio"])),
        ("speed-up", speedup),
    ]
    if report.get("flops_ratio_sampling") is not None:  # the budget at training and at sampling
        train, at_sampling = report["flops_ratio_train"], report["flops_ratio_sampling"]
        rows.insert(-1, ("FLOPs ratio training / sampling",
                         f"{render.ratio(train)} / {render.ratio(at_sampling)}"))  # fmt: skip
    for key, label in (
        ("classifier_accuracy", "classifier accuracy"),
        ("frechet_distance", "Frechet distance"),
    ):
        if key in report:
            v = report[key]
            rows.append((label, f"{v['original']:.3f} original -> {v['dynamic']:.3f} dynamic"))
    if report.get("samples"):
        rows.append(
            ("samples", f"{report['run_dir']}/{report['samples']} (original left, dynamic right)")
        )
    rows.append(("time", render.duration(report["timings"].get("total_s"))))
    render.out().print(render.key_values("Run report (report.json)", rows))
