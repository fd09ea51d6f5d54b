"""``dynconvert bench``: time the original and the dynamic model in the same process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer

from dynconvert.cli import render
from dynconvert.cli.options import BudgetOpt, DeviceOpt, JsonOpt, ModelOpt, RunOpt, unset_option
from dynconvert.errors import ConfigError
from dynconvert.runtime.modes import execution_names

SCHEMA = """The --json object (dynconvert.measure.bench.BenchResult): time_static_s, time_dynamic_s
(median seconds per denoising call), speedup, flops_ratio (analytic), executed_flops_ratio
(counted), efficiency (speedup x flops_ratio), peak_mem_static_bytes, peak_mem_dynamic_bytes,
device, dtype, batch, timestep, repeats, times_static_s, times_dynamic_s, slice_cache_bytes,
model, routing, flops_unit ("MACs"), execution, graphs, graphs_static, graphs_dynamic,
capture_s_static, capture_s_dynamic (CUDA graphs held and seconds spent capturing them),
token_overflow_rate (tokens over a planned capacity / tokens over the threshold)."""


KeepOpt = Annotated[
    float | None,
    unset_option(
        "--keep",
        help="FLOPs ratio of synthetic routing (required with --model; with --run it "
        "replaces the learned routing).",
        min=0.0,
        max=1.0,
    ),
]
TokensOpt = Annotated[
    float, typer.Option("--tokens", help="Token keep rate of synthetic routing.", min=0.0, max=1.0)
]
BatchOpt = Annotated[
    int, typer.Option("--batch", "-b", help="Samples per call (2 = one CFG pair).", min=1)
]
TimestepOpt = Annotated[
    float, typer.Option("--timestep", help="Timestep of every sample.", min=0, max=999)
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16.")]
RepeatsOpt = Annotated[int, typer.Option("--repeats", help="Timed calls per model.", min=1)]
WarmupOpt = Annotated[int, typer.Option("--warmup", help="Untimed calls per model first.", min=0)]
CountOpt = Annotated[bool, typer.Option("--count/--no-count", help="Also count executed FLOPs.")]
MemoryOpt = Annotated[
    bool,
    typer.Option(
        "--memory/--no-memory",
        help="Also measure peak memory (weights + cached slices + the call's peak; "
        "on CPU through the torch profiler's allocation events).",
    ),
]
ExecutionOpt = Annotated[
    str | None,
    typer.Option(
        "--execution",
        help=f"Execution mode of the dynamic model: {', '.join(execution_names())} "
        "(default: the model's own; planned with --graphs).",
    ),
]
GraphsOpt = Annotated[
    bool,
    typer.Option(
        "--graphs/--no-graphs",
        help="Run both models through CUDA graphs (one per routing pattern and shape; CUDA only).",
    ),
]
HALF = ("bfloat16", "bf16", "float16", "fp16")


def bench(
    model: ModelOpt = None,
    run: RunOpt = None,
    keep: KeepOpt = None,
    tokens: TokensOpt = 0.7,
    batch: BatchOpt = 8,
    timestep: TimestepOpt = 500,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    repeats: RepeatsOpt = 5,
    warmup: WarmupOpt = 1,
    count: CountOpt = True,
    memory: MemoryOpt = True,
    execution: ExecutionOpt = None,
    graphs: GraphsOpt = False,
    budget: BudgetOpt = None,
    json: JsonOpt = False,
) -> None:
    """Time the original and the dynamic model per denoising call (same process, alternating).

    With --model, a preset is built with random weights (speed does not depend on them) and
    given synthetic routing at FLOPs ratio --keep; with --run, the run's learned routing is
    timed. Reports the median time of each, the speed-up, the analytic and the executed FLOPs
    ratio, and peak memory.

    [bold]Examples[/bold]

      dynconvert bench --model dit-xl --keep 0.5 --batch 8 --device cuda --dtype bfloat16

      dynconvert bench --model dit-xl --keep 0.5 --batch 32 --device cuda --dtype bfloat16 --graphs

      dynconvert bench --run runs/digits-0.5 --batch 64 --json

      dynconvert bench --run runs/digits-0.3-1 --budget 0.4

      dynconvert bench --model dit-s --keep 0.5 --tokens 0.5 --repeats 10
    """
    import torch

    from dynconvert.measure.bench import DTYPES, benchmark
    from dynconvert.runs import resolve_device

    if (model is None) == (run is None):
        raise ConfigError("pass exactly one of --model NAME (with --keep) or --run DIR")
    if run is None and keep is None:
        raise ConfigError(
            "bench --model needs --keep (the FLOPs ratio of synthetic routing, e.g. 0.5)"
        )
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    dev = resolve_device(device)
    if budget is not None and run is None:
        raise ConfigError("--budget needs --run (a budget-conditioned model's run folder)")
    with render.status(f"building {model or run}"):
        net = _build(model, run)
    if budget is not None:
        from dynconvert.runtime.routing import set_budget

        set_budget(net, budget)  # BudgetError naming the range when it is outside it
    if model is not None and dev == "cpu" and dtype in HALF:
        render.note("note: half precision on CPU is often slower than float32")
    with torch.no_grad(), render.native_stderr_silenced():  # the profiler's C++ start/stop lines
        result = benchmark(net, keep=keep, tokens=tokens, batch=batch, timestep=timestep,
                           device=dev, dtype=dtype, repeats=repeats, warmup=warmup, count=count,
                           memory=memory, execution=execution, graphs=graphs,
                           on_progress=_stage_printer()).to_dict()  # fmt: skip
    if json:
        render.print_json(result)
        return
    show(result)


def _build(model: str | None, run: str | None) -> Any:
    """The model to time, in eval mode: a run's, or a preset with random weights."""
    from dynconvert.runs import load_run, resolve_source

    if run is not None:
        net, _ = load_run(run)
    else:
        net = resolve_source(str(model), random_init=True).build()
    return net.eval()


def _stage_printer() -> Callable[[str, int, int], None]:
    """An ``on_progress(stage, i, n)`` callback printing each new stage once on stderr."""
    console = render.err()
    last: list[str] = []

    def on_progress(stage: str, i: int, n: int) -> None:
        if last[-1:] != [stage]:
            last.append(stage)
            console.print(f"[dim]    bench[/dim]  {stage}", highlight=False)

    return on_progress


def show(r: dict[str, Any]) -> None:
    """Print a benchmark result as a table on stdout."""
    from dynconvert.measure.bench import format_bytes

    execution = r["execution"] + (
        f", CUDA graphs {r['graphs_static']} original / {r['graphs_dynamic']} dynamic"
        if r.get("graphs")
        else ", eager"
    )
    if r.get("token_overflow_rate") is not None:
        execution += f", token overflow {100 * r['token_overflow_rate']:.2f}%"
    rows = [
        ("model", f"{r['model']} ({r['routing']})"),
        ("device / dtype / batch",
         f"{r['device']} / {r['dtype']} / {r['batch']} at t={r['timestep']:g}"),
        ("time per call", f"{1000 * r['time_static_s']:.2f} ms original, "
         f"{1000 * r['time_dynamic_s']:.2f} ms dynamic (median of {r['repeats']})"),
        ("speed-up", f"{r['speedup']:.2f}x"),
        ("FLOPs ratio", f"{render.ratio(r['flops_ratio'])} analytic, "
         f"{render.ratio(r['executed_flops_ratio'])} executed"),
        ("efficiency",
         f"{r['efficiency']:.2f} (speed-up x FLOPs ratio; 1.0 = speed follows FLOPs)"),
        ("execution", execution),
        ("peak memory", f"{format_bytes(r['peak_mem_static_bytes'])} original, "
         f"{format_bytes(r['peak_mem_dynamic_bytes'])} dynamic"),
    ]  # fmt: skip
    render.out().print(render.key_values("Benchmark (MACs; 1 MAC = 2 FLOPs)", rows))
