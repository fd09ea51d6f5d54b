"""``dynconvert export``: a run's calibrated model as static programs that run with torch alone."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from dynconvert.cli import render
from dynconvert.cli.options import BudgetOpt, JsonOpt, comma_list, unset_option
from dynconvert.errors import ConfigError, DynconvertError

SCHEMA = """The --json object (dynconvert.deploy.ExportResult, plus load_s): out, format, programs
(distinct width patterns of the schedule), files (programs x batches), timesteps, batches,
export_s, folder_bytes, weights_bytes, graph_bytes, max_abs_diff (programs against the planned
path), flops_ratio (MACs ratio, mean over the schedule), load_s (run_exported.load of the
folder)."""


def default_batch(model: Any) -> int:
    """The batch ``dynconvert sample`` calls the model with by default: the first classes (up
    to 10, or DiT's 8) twice with guidance; 8 samples for an unconditional model; else 2."""
    from dynconvert.runs.samples import class_labels
    from dynconvert.sampling import model_spec

    try:
        if model_spec(model).adapter.needs_cond:
            return 2
        labels = class_labels(model)
    except DynconvertError:
        return 2
    return 2 * len(labels) if labels else 8


def export(
    run: Annotated[
        str, typer.Argument(help="A run folder, or a folder written by dynconvert.save.")
    ],
    out: Annotated[str, unset_option("--out", "-o", help="The export folder to write.")],
    format: Annotated[
        str, typer.Option("--format", "-f", help="pt2 (torch.export), aoti (AOTInductor) or onnx.")
    ] = "pt2",
    steps: Annotated[
        int,
        typer.Option("--steps", help="Sampler steps of the schedule to export.", min=1, max=1000),
    ] = 50,
    timesteps: Annotated[
        str | None,
        unset_option(
            "--timesteps", help="The timesteps to export, comma-separated (instead of --steps)."
        ),
    ] = None,
    scheduler: Annotated[
        str | None,
        unset_option("--scheduler", help="ddim, dpm or ddpm (default: the run recipe's sampler)."),
    ] = None,
    batch: Annotated[
        str | None,
        unset_option(
            "--batch",
            "-b",
            help="Batch size(s) the programs take, comma-separated (default: the batch "
            "'dynconvert sample' uses: 2 x the first 10 classes with guidance).",
        ),
    ] = None,
    height: Annotated[
        int | None, unset_option("--height", help="Sample height (latent pixels).", min=1)
    ] = None,
    width: Annotated[
        int | None, unset_option("--width", help="Sample width (latent pixels).", min=1)
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing export folder.")
    ] = False,
    budget: BudgetOpt = None,
    json: JsonOpt = False,
) -> None:
    """Export a run's model: one program per width pattern of a sampling schedule.

        The folder holds the weights once, the programs, manifest.json (timestep -> program, input
        signature, capacities, FLOPs ratios) and run_exported.py, a loader that needs only torch.
        Every program is checked against the planned path before the folder is renamed into place.
    A budget-conditioned model is exported at one budget (--budget; default: the model's): one
    export folder per budget.

        [bold]Examples[/bold]

          dynconvert export runs/digits-0.5 --out export/

          dynconvert export runs/digits-0.5 --out export-aoti/ --format aoti --batch 2,20

          dynconvert export runs/dit-xl-0.5 --out dit-export/ --steps 250 --scheduler ddpm --batch 8
    """
    from dynconvert.deploy import export as export_model
    from dynconvert.deploy import load_exported
    from dynconvert.deploy.formats import check_format
    from dynconvert.runs import load_run, read_run

    check_format(format)  # before the model loads
    values = comma_list(timesteps, "--timesteps", float, "999,500,0")
    batches = comma_list(batch, "--batch", int, "2,8")
    if values is not None and steps != 50:
        raise ConfigError("pass either --steps or --timesteps, not both")
    with render.status(f"loading {run}"):
        model, _ = load_run(run, device="cpu")
        info = read_run(run) or {}
        if budget is not None:
            from dynconvert.runtime.routing import set_budget

            set_budget(model, budget)  # the budget the programs are traced at
    sampler = scheduler or ((info.get("recipe") or {}).get("samples") or {}).get(
        "scheduler", "ddim"
    )
    console = render.err()

    def on_progress(stage: str, done: int, total: int) -> None:
        console.print(f"[dim]   export[/dim]  {stage} {done}/{total}", highlight=False)

    result = export_model(
        model, out, format=format, timesteps=values, steps=steps, scheduler=sampler,
        batch=batches or default_batch(model), height=height, width=width, overwrite=overwrite,
        on_progress=on_progress,
    ).to_dict()  # fmt: skip
    t0 = time.perf_counter()
    load_exported(out)
    result["load_s"] = round(time.perf_counter() - t0, 3)
    if json:
        render.print_json(result)
        return
    show(result)


def show(r: dict[str, Any]) -> None:
    """Print an export result as a table on stdout."""
    from dynconvert.measure.bench import format_bytes

    rows = [
        ("folder", r["out"]),
        ("format", r["format"]),
        ("programs", f"{r['programs']} width patterns x {len(r['batches'])} batch size(s) = "
         f"{r['files']} files, for {r['timesteps']} timesteps"),
        ("batch", ", ".join(str(b) for b in r["batches"])),
        ("FLOPs ratio", f"{render.ratio(r['flops_ratio'])} (MACs, mean over the schedule)"),
        ("checked", "not checked" if r["max_abs_diff"] is None
         else f"max difference to the planned path {r['max_abs_diff']:.2g}"),
        ("export time", render.duration(r["export_s"])),
        ("folder size", f"{format_bytes(r['folder_bytes'])} "
         f"(weights {format_bytes(r['weights_bytes'])}, "
         f"programs {format_bytes(r['graph_bytes'])})"),
        ("load time", f"{r['load_s']:.2f} s (run_exported.load)"),
    ]  # fmt: skip
    render.out().print(
        render.key_values("Export (run it with run_exported.py in the folder)", rows)
    )
