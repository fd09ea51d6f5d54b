"""``dynconvert inspect``: what convert finds in a model, and what it would cost."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynconvert.cli import render
from dynconvert.cli.inspect_models import inspect_target, memory_columns, to_device
from dynconvert.cli.memory_table import (
    BatchOpt,
    CalibrationOpt,
    PlanDeviceOpt,
    ProcessesOpt,
    ShardingOpt,
    show_calibration,
)
from dynconvert.cli.options import (
    ConfigFileOpt,
    DiffusersOpt,
    FramesOpt,
    HeightOpt,
    JsonOpt,
    ModelOpt,
    RunOpt,
    SetOpt,
    WidthOpt,
)
from dynconvert.errors import ConfigError
from dynconvert.plan import ATTENTION

if TYPE_CHECKING:
    pass

SCHEMA = """The --json object (MACs per sample; 1 MAC = 2 hardware FLOPs):
model, params, router_params, calibration_gib {all, routers} (GiB; not with --run),
model_class, unit ("MACs"), timestep_arg, capture, coverage, input_shapes,
static_macs (whole model), blocks_macs (converted attention + MLP sites), other_macs,
blocks (count), min_budget (lowest reachable whole-model ratio), max_budget (1.0),
sites: [{index, name, block, kind ("attention"|"mlp"), module_class, heads|groups, head_dim,
hidden, width, width_reason, token_routing, token_reason, fast, fast_reason, macs, share}],
skipped: [{name, kind, reason}], and for --run: run {budget, flops_ratio (the record's),
executed_flops_ratio (counted on the loaded model; null when it makes no example inputs),
recipe, ...} and each site's mean_units_on (fraction of heads/groups on, mean over the 1000
timesteps)."""


def plan_summary(plan: Any, config: Any = None) -> dict[str, Any]:
    """The inspect JSON object of a plan (see SCHEMA)."""
    from dynconvert.config import ConvertConfig
    from dynconvert.flops import min_ratio, other_macs_per_sample
    from dynconvert.plan import AttentionSite, site_kind

    config = config or ConvertConfig()
    static = plan.static_macs_per_sample
    other = other_macs_per_sample(plan)
    sites = []
    for s in plan.sites:
        cost = s.macs()
        d: dict[str, Any] = {
            "index": s.index,
            "name": s.name or "(model)",
            "block": s.block,
            "module_class": s.module_class,
            "macs": cost,
            "share": cost / static if static else 0.0,
            "fast": s.fast,
            "fast_reason": s.fast_reason,
        }
        if isinstance(s, AttentionSite):
            d.update(
                kind=site_kind(s),
                attention=s.kind,
                heads=s.heads,
                head_dim=s.head_dim,
                tokens=s.tokens_q,
                width=True,
                width_reason="",
                token_routing=False,
                token_reason="attention always sees every token",
            )
        else:
            d.update(
                kind=site_kind(s),
                groups=s.groups,
                hidden=s.hidden,
                gated=s.gated,
                tokens=s.tokens,
                width=s.width,
                width_reason=s.width_reason,
                token_routing=s.token,
                token_reason=s.token_reason,
            )
        sites.append(d)
    return {
        "model_class": plan.model_class,
        "unit": "MACs",
        "per": "sample",
        "timestep_arg": plan.timestep_arg,
        "capture": plan.capture,
        "coverage": plan.coverage,
        "input_shapes": plan.input_shapes,
        "static_macs": static,
        "blocks_macs": plan.blocks_macs_per_sample,
        "other_macs": other,
        "blocks": len(plan.blocks),
        "min_budget": min_ratio(plan, config.token_reduction),
        "max_budget": 1.0,
        "sites": sites,
        "skipped": [{"name": s.name, "kind": s.kind, "reason": s.reason} for s in plan.skipped],
    }


def _run_summary(folder: str) -> dict[str, Any]:
    from dynconvert.analysis.importance import IMPORTANCE
    from dynconvert.config import ConvertConfig
    from dynconvert.io.save import decode_masks, read_record
    from dynconvert.measure.executed import executed_ratio
    from dynconvert.plan import Plan
    from dynconvert.runs import load_run, read_run

    loaded, _ = load_run(folder)  # every check of load: a folder it refuses is refused here
    record = read_record(folder)
    plan = Plan.from_dict(record["plan"])
    cfg = dict(record["config"])
    if cfg.get("importance") not in IMPORTANCE:
        cfg["importance"] = "magnitude"
    summary = plan_summary(plan, ConvertConfig.from_dict(cfg))
    masks = record.get("width_masks", {})
    for site in summary["sites"]:
        segs = masks.get(str(site["index"]))
        site["mean_units_on"] = float(decode_masks(segs).float().mean()) if segs else 1.0
    run = read_run(folder) or {}
    summary["model"] = (
        record.get("preset") or (run.get("source") or {}).get("name") or record["model_class"]
    )
    summary["run"] = {
        "dir": str(folder),
        "budget": record["budget"],
        "flops_ratio": record.get("mean_flops_ratio"),
        "flops_ratio_note": record.get("flops_ratio_note"),
        "executed_flops_ratio": executed_ratio(loaded),  # None: the model makes no inputs
        "recipe": (run.get("recipe") or {}).get("name"),
        "status": run.get("status"),
        "steps": run.get("steps"),
    }
    return summary


def inspect(
    model: ModelOpt = None,
    run: RunOpt = None,
    diffusers: DiffusersOpt = None,
    config: ConfigFileOpt = None,
    height: HeightOpt = None,
    width: WidthOpt = None,
    frames: FramesOpt = None,
    json: JsonOpt = False,
    calibration: CalibrationOpt = False,
    batch: BatchOpt = None,
    processes: ProcessesOpt = 1,
    sharding: ShardingOpt = "none",
    device: PlanDeviceOpt = "auto",
    set_: SetOpt = None,
) -> None:
    """Show what convert finds in a model: blocks, sites, heads, groups, costs, budget range.

    Prints one row per attention or MLP site (heads or channel groups, whether tokens can be
    routed and why not, MACs per sample), the totals, the reachable FLOPs budget range, and the
    sites that were skipped with the reason. No weights are needed: big presets are built on
    the meta device. With --run, the plan of a converted model and its learned routing.

    [bold]Examples[/bold]

      dynconvert inspect --model dit-xl

      dynconvert inspect --model digits --json

      dynconvert inspect --run runs/digits-0.5

      dynconvert inspect --model flux-dev --height 768 --width 1360

      dynconvert inspect --diffusers WanTransformer3DModel --config config.json --frames 81

      dynconvert inspect --model dit-xl --calibration --batch 256 --processes 8 --sharding fsdp
    """
    if calibration and model is None:
        raise ConfigError(
            "--calibration needs --model NAME (e.g. inspect --model dit-xl --calibration)"
        )
    if sum(x is not None for x in (model, run, diffusers)) != 1:
        raise ConfigError(
            "pass exactly one of --model NAME, --run DIR or --diffusers CLASS --config FILE "
            "(e.g. inspect --model dit-xl)"
        )
    if run is not None:
        summary = _run_summary(run)
    elif calibration:
        launch = (batch, processes, sharding, device)
        show_calibration(model, (height, width, frames), json, list(set_ or []), *launch)
        return
    else:
        summary = _analyse(model, diffusers, config, (height, width, frames))
    if json:
        render.print_json(summary)
        return
    show(summary)


def _executed(ratio: float | None) -> str:
    if ratio is None:
        return "cannot measure: the model makes no example inputs (use dynconvert bench)"
    return f"{render.ratio(ratio)} (5 timesteps, example inputs, token routing included)"


def _analyse(model: str | None, cls: str | None, config: Path | None, pixels: tuple) -> dict:
    """The inspect summary of a preset, a shipped real configuration or a diffusers config."""
    from dynconvert.analysis import analyze
    from dynconvert.inputs import default_inputs

    with render.status(f"analysing {model or cls}"):
        net, inputs, probe = inspect_target(model, cls, config, pixels)
        if inputs is None:  # a preset or a tiny model: its own example inputs, on its device
            args, kwargs = default_inputs(net)
            device = next(net.parameters()).device
            inputs = (to_device(args, device), to_device(kwargs, device))
        plan = analyze(net, inputs, probe_inputs=probe)
    return {"model": model or cls, **memory_columns(net, plan), **plan_summary(plan)}


def show(s: dict[str, Any]) -> None:
    """Print an inspect summary as tables on stdout."""
    console = render.out()
    has_run = "run" in s
    cols = ["#>", "site", "kind", "units", "tokens", "MACs>", "share>"]
    if has_run:
        cols.append("on>")
    model_class = s["model_class"].rsplit(".", 1)[-1]
    title = f"{s['model']} ({model_class}): {len(s['sites'])} sites in {s['blocks']} blocks"
    t = render.table(f"{title} (MACs per sample)", *cols)
    for site in s["sites"]:
        if site["kind"] == ATTENTION:
            units, tokens = f"{site['heads']} heads x {site['head_dim']}", "all"
        else:
            per = site["hidden"] // max(site["groups"], 1)
            units = (
                f"{site['groups']} groups x {per}"
                if site["width"]
                else f"fixed: {site['width_reason']}"
            )
            tokens = "routed" if site["token_routing"] else f"all: {site['token_reason']}"
        kind = {"cross": "xattn", "self": "attn"}.get(site.get("attention", ""), "mlp")
        macs = render.macs(site["macs"], compact=True)
        row = [
            str(site["index"]),
            site["name"],
            kind,
            units,
            tokens,
            macs,
            f"{100 * site['share']:.1f}%",
        ]
        if has_run:
            row.append(f"{100 * site['mean_units_on']:.0f}%")
        t.add_row(*row)
    console.print(t)
    static = s["static_macs"]
    rows = [
        ("whole model", f"{render.macs(static)}MACs per sample"),
        (
            "converted blocks",
            f"{render.macs(s['blocks_macs'])}MACs ({100 * s['blocks_macs'] / static:.1f}%)",
        ),
        (
            "not converted",
            f"{render.macs(s['other_macs'])}MACs ({100 * s['other_macs'] / static:.1f}%)",
        ),
        ("reachable budget", f"{s['min_budget']:.3f} .. 1.0 (fraction of the whole model's MACs)"),
        ("capture", f"{s['capture']}, {s['coverage']}"),
        ("timestep argument", s["timestep_arg"]),
    ]
    if s.get("params"):
        gb, weights = s["calibration_gib"], s["params"] * 2 / 2**30
        rows[:0] = [
            ("parameters", f"{s['params'] / 1e9:.3f} B ({weights:.1f} GiB in bf16)"),
            (
                "calibration memory",
                f"{gb['all']:.1f} GiB training all, {gb['routers']:.1f} GiB the routers only "
                "(bf16 weights, gradients, AdamW, EMA; activations not counted)",
            ),
        ]
    if has_run:
        r = s["run"]
        rows += [
            ("run", r["dir"]),
            ("budget", r["budget"]),
            ("flops ratio (mean over t)", render.ratio(r["flops_ratio"])),
            ("executed (loaded model)", _executed(r["executed_flops_ratio"])),
        ]
    console.print(render.key_values("Totals (1 MAC = 2 FLOPs)", rows))
    if s["skipped"]:
        k = render.table("Skipped", "site", "kind", "reason")
        for sk in s["skipped"]:
            k.add_row(sk["name"], sk["kind"], sk["reason"])
        console.print(k)
