"""``dynconvert inspect --calibration``: the memory plan of a calibration, per process."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from dynconvert.cli import render

CalibrationOpt = Annotated[
    bool,
    typer.Option(
        "--calibration",
        help="Show the calibration's memory plan per process instead (weights, gradients, AdamW, "
        "EMA, activations), for each trainable mode.",
    ),
]
BatchOpt = Annotated[
    int | None, typer.Option("--batch", help="Global batch (default: the recipe's).", min=1)
]
ProcessesOpt = Annotated[
    int, typer.Option("--processes", help="Processes (GPUs) sharing the batch.", min=1)
]
ShardingOpt = Annotated[
    str, typer.Option("--sharding", help="none (one process or DDP) or fsdp (FSDP2).")
]
PlanDeviceOpt = Annotated[
    str,
    typer.Option("--device", help="cpu or cuda: what the plan is for (nothing runs; auto: here)."),
]

TERMS = {
    "weights": "weights",
    "gradients": "gradients",
    "optimizer": "AdamW moments",
    "ema": "EMA (float32)",
    "ddp_buckets": "DDP gradient buckets",
    "fsdp_unsharded": "FSDP gathered units",
    "activations": "activations",
    "runtime": "interpreter (CPU)",
    "result_copy": "raw weights at the end (CPU)",
}
"""Estimate terms, in the order shown, and their labels."""


def memory_summary(
    net: Any,
    plan: Any,
    facts: Any,
    overrides: list[str],
    batch: int | None,
    processes: int,
    sharding: str,
    device: str,
) -> dict[str, Any]:
    """The ``--calibration`` JSON object: settings, ``calibration_memory_bytes`` (the peak per
    process, keyed by trainable mode) and each mode's terms.

    The settings are the model's recipe, or the defaults for a model without one
    (``--set calibration.X=Y`` overrides them), with ``--batch`` as the global batch.
    """
    from dynconvert.calibration.fit import settings_for
    from dynconvert.calibration.memory import calibration_memory
    from dynconvert.recipes import load_recipe, recipe_for_model

    name = recipe_for_model(getattr(net, "preset", None) or type(net).__name__)
    # a model without a recipe (flux-dev) is planned with the defaults and --set's changes
    recipe = load_recipe(name, list(overrides), {})
    cfg = recipe.calibration_config(0.5)
    settings = settings_for(cfg, processes, sharding, "cuda" if device == "cuda" else "cpu")
    if batch is not None:
        from dataclasses import replace

        settings = replace(settings, batch_size=batch)
    plans = calibration_memory(facts, settings)
    return {
        "recipe": recipe.name if name else None,
        "settings": {
            k: v
            for k, v in plans[settings.trainable].to_dict()["settings"].items()
            if k != "trainable"
        },  # fmt: skip
        "micro_batch": settings.micro_batch,
        "parameters": sum(p.numel() for p in net.parameters()) + facts.router_numel,
        "router_parameters": facts.router_numel,
        "calibration_memory_bytes": {mode: est.total for mode, est in plans.items()},
        "calibration_memory": {mode: est.to_dict()["terms"] for mode, est in plans.items()},
    }


def show_calibration(
    model: str,
    pixels: tuple,
    json: bool,
    overrides: list[str],
    batch: int | None,
    processes: int,
    sharding: str,
    device: str,
) -> None:
    """``inspect --model NAME --calibration``: the memory plan of calibrating NAME, from a
    meta-device skeleton (a preset, or a published configuration at its real size, analysed
    with its probe's few tokens as ``inspect --model flux-dev`` is), printed or as JSON."""
    import torch

    from dynconvert.calibration.memory_facts import skeleton_facts
    from dynconvert.cli.inspect_models import inspect_target
    from dynconvert.errors import ConfigError

    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda; got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    with render.status(f"analysing {model}"):
        net, inputs, probe = inspect_target(model, None, None, pixels)
        plan, facts = skeleton_facts(net, inputs=inputs, probe_inputs=probe)
    launch = (batch, processes, sharding, device)
    summary = {"model": model, **memory_summary(net, plan, facts, overrides, *launch)}
    if json:
        render.print_json(summary)
    else:
        show_memory(summary, model)


def show_memory(s: dict[str, Any], model: str) -> None:
    """Print the memory plan as a table on stdout."""
    st = s["settings"]
    modes = list(s["calibration_memory_bytes"])
    title = (
        f"{model}: calibration memory per process ({st['processes']} process"
        f"{'es' if st['processes'] > 1 else ''}, sharding {st['sharding']}, {st['device']}; global "
        f"batch {st['batch_size']} = micro-batch {s['micro_batch']} x {st['grad_accum_steps']} "
        f"accumulation x {st['processes']}; mixed precision {st['mixed_precision']}; gradient "
        f"checkpointing {'on' if st['gradient_checkpointing'] else 'off'})"
    )
    t = render.table(title, "term", *[f"trainable={m}>" for m in modes])
    for key, label in TERMS.items():
        values = [s["calibration_memory"][m].get(key) for m in modes]
        if any(values):
            t.add_row(label, *[_gib(v) for v in values])
    t.add_row("peak per process",
              *[_gib(s["calibration_memory_bytes"][m]) for m in modes])  # fmt: skip
    render.out().print(t)
    render.note("The peak is not the sum: activations are freed as backward fills the gradients.")


def _gib(n: int | None) -> str:
    return "-" if not n else f"{n / 2**30:.2f} GiB"
