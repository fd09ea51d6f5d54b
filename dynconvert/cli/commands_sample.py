"""``dynconvert sample``: a grid of samples from a run's calibrated model (and its original)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dynconvert.cli import render
from dynconvert.cli.options import (
    BudgetOpt,
    CheckpointOpt,
    DeviceOpt,
    JsonOpt,
    RunOpt,
    SeedOpt,
    comma_list,
    unset_option,
)
from dynconvert.errors import ConfigError


def _labels(text: str | None) -> list[int] | None:
    return comma_list(text, "--labels", int, "1,2,3", what="class numbers")


LabelsOpt = Annotated[
    str | None,
    unset_option(
        "--labels", help="Class labels, comma-separated (default: the first classes, up to 10)."
    ),
]
StepsOpt = Annotated[int, typer.Option("--steps", help="Sampler steps.", min=1)]
CfgOpt = Annotated[
    float, typer.Option("--cfg", help="Classifier-free guidance scale (1.0: off).", min=1.0)
]
SchedulerOpt = Annotated[str, typer.Option("--scheduler", help="ddim, dpm or ddpm.")]
CompareOpt = Annotated[
    bool,
    typer.Option(
        "--compare",
        help="Put the original model's samples (same seeds) on the left; the grids are titled "
        "'original' and 'dynamic' with its FLOPs ratio.",
    ),
]
VaeOpt = Annotated[
    str | None,
    unset_option("--vae", help="A local diffusers AutoencoderKL folder to decode latents."),
]
RawOpt = Annotated[
    bool, typer.Option("--raw", help="Write latents' first 3 channels as colours (no VAE).")
]
OutOpt = Annotated[str | None, unset_option("--out", "-o", help="The PNG to write (required).")]


def sample(
    run: RunOpt = None,
    out: OutOpt = None,
    labels: LabelsOpt = None,
    steps: StepsOpt = 50,
    cfg: CfgOpt = 1.5,
    seed: SeedOpt = 0,
    scheduler: SchedulerOpt = "ddim",
    compare: CompareOpt = False,
    checkpoint: CheckpointOpt = None,
    vae: VaeOpt = None,
    raw: RawOpt = False,
    device: DeviceOpt = "auto",
    budget: BudgetOpt = None,
    json: JsonOpt = False,
) -> None:
    """Sample a grid from a run's calibrated model, optionally beside the original's.

    Needs --run and --out. The original model (--compare) is rebuilt from where the run found
    it (shipped weights, its checkpoint, or --checkpoint); both draw the same initial noise,
    image by image. Latent models need --vae to decode (or --raw for a quick look).

    [bold]Examples[/bold]

      dynconvert sample --run runs/digits-0.5 --out grid.png --compare

      dynconvert sample --run runs/digits-0.3-1 --budget 0.4 --out grid.png

      dynconvert sample --run runs/digits-0.5 --labels 3,3,7,7 --steps 25 --scheduler dpm \\
        --out sevens.png

      dynconvert sample --run runs/dit-xl-0.5 --vae sd-vae-ft-ema/ --steps 250 \\
        --scheduler ddpm --out dit.png
    """
    from types import SimpleNamespace

    from dynconvert.runs import (
        check_writable,
        load_run,
        original_model,
        resolve_device,
        write_samples,
    )
    from dynconvert.runtime.planned.controls import token_overflow
    from dynconvert.runtime.routing import set_budget

    check_options(run, out, scheduler)
    assert run is not None and out is not None
    check_writable(Path(out))  # before the model loads and samples
    settings = SimpleNamespace(
        labels=_labels(labels), steps=steps, cfg_scale=cfg, seed=seed, scheduler=scheduler
    )
    dev = resolve_device(device)
    with render.status(f"loading {run}"):
        model, info = load_run(run, device=dev)
        if budget is not None:  # checked against the model's range before anything samples
            set_budget(model, budget)
        original = original_model(info, checkpoint).to(dev) if compare else None
    with render.status(f"sampling ({steps} {scheduler} steps{', twice' if compare else ''})"):
        token_overflow(model)  # counted from here: this sampling call only
        path = write_samples(model, original, Path(out), settings, vae=vae, raw=raw)
    # Planned path (CUDA): tokens over a site's fixed capacity, read once for the whole call.
    overflow = token_overflow(model)
    result = {"path": str(path), "run": run, "compare": compare, "labels": settings.labels,
              "steps": steps, "cfg_scale": cfg, "seed": seed, "scheduler": scheduler,
              "budget": budget,
              "token_overflow": {"dropped": overflow.dropped, "rate": overflow.rate}}  # fmt: skip
    if overflow.dropped:
        render.note(f"note: {overflow.dropped} tokens ({100 * overflow.rate:.2f}%) exceeded "
                    "their site's token capacity and skipped their MLP")  # fmt: skip
    if json:
        render.print_json(result)
    else:
        side = " (original left, dynamic right)" if compare else ""
        render.out().print(f"{path}{side}", markup=False, highlight=False)


def check_options(run: str | None, out: str | None, scheduler: str) -> None:
    """Every missing or bad option of ``sample`` named in one error, before anything loads.

    Example:
        >>> try:
        ...     check_options(None, None, "ddim")
        ... except ConfigError as e:
        ...     print(str(e)[:32])
        sample needs --run DIR (a run fo
    """
    from dynconvert.sampling import SCHEDULERS

    wanted = {"--run DIR (a run folder written by 'dynconvert convert')": run,
              "--out FILE.png (the grid to write)": out}  # fmt: skip
    missing = [flag for flag, value in wanted.items() if not value]
    if missing:
        raise ConfigError(f"sample needs {' and '.join(missing)}")
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"--scheduler must be one of {', '.join(SCHEDULERS)}; got {scheduler!r}")
    if not str(out).lower().endswith(".png"):
        raise ConfigError(f"--out must be a .png file; got {out!r}")
