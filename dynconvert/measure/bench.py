"""benchmark: time the original and the converted model in the same process, per denoising call.

Calls alternate (original, converted, original, ...) after a warm-up, and the median of
several repeats is reported, so both sides see the same machine state. With ``graphs=True``
both models run through CUDA graphs (graphs.py; the dynamic one on the planned path), so the
speed-up compares graphed with graphed; on CPU that option changes nothing. FLOPs are reported
two ways: the analytic ratio of the routing in force and the ratio the fast path really
executed (``torch.utils.flop_counter`` with math attention). Peak memory is the model's own:
weights + cached weight slices + the peak of what the call allocates.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from dynconvert.convert import convert, get_state, is_converted, revert
from dynconvert.errors import ConfigError
from dynconvert.flops import last_flops_ratio, measure_macs
from dynconvert.inputs import batch_of, default_inputs, split_inputs, with_timestep
from dynconvert.runtime.modes import execution_mode
from dynconvert.runtime.planned.controls import token_overflow
from dynconvert.runtime.planned.graphs import disable_cuda_graphs, enable_cuda_graphs, graph_stats
from dynconvert.runtime.synthetic import synthetic_routing

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class BenchResult:
    """What :func:`benchmark` measured (times in seconds per denoising call, memory in bytes)."""

    time_static_s: float
    time_dynamic_s: float
    speedup: float
    flops_ratio: float
    executed_flops_ratio: float | None
    efficiency: float
    peak_mem_static_bytes: int | None
    peak_mem_dynamic_bytes: int | None
    device: str
    dtype: str
    batch: int
    timestep: float
    repeats: int
    times_static_s: list[float]
    times_dynamic_s: list[float]
    slice_cache_bytes: int
    model: str
    routing: str
    flops_unit: str = "MACs"
    execution: str = "fast"
    graphs: bool = False
    graphs_static: int | None = None
    graphs_dynamic: int | None = None
    capture_s_static: float | None = None
    capture_s_dynamic: float | None = None
    token_overflow_rate: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain dict (``dataclasses.asdict``), ready for JSON."""
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to(obj: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, dtype=dtype) if obj.is_floating_point() else obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


def _model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _peak_call_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by one call above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    points = []
    for e in prof.events():
        delta = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if delta:
            points.append((e.time_range.start, delta))
    points.sort()
    cur = peak = 0
    for _, d in points:
        cur += d
        peak = max(peak, cur)
    return int(peak)


def benchmark(
    model: nn.Module,
    *,
    keep: float | None = None,
    tokens: float = 0.7,
    batch: int = 8,
    timestep: float = 500.0,
    device: str = "cpu",
    dtype: str = "float32",
    repeats: int = 5,
    warmup: int = 1,
    count: bool = True,
    memory: bool = True,
    compile: bool = False,
    execution: str | None = None,
    graphs: bool = False,
    seed: int = 0,
    example_inputs: Any = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> BenchResult:
    """Time the original and the converted model per denoising call, in the same process.

    Args:
        model: a converted model (its routing is used; the original is obtained by reverting a
            copy) or a plain model (then ``keep`` is required: it is converted and given fixed
            synthetic routing at FLOPs ratio ``keep``).
        keep: target whole-model FLOPs ratio of synthetic routing (overrides a converted model's
            learned routing when given).
        tokens: token keep rate of synthetic routing.
        batch: samples per call (2 = one classifier-free-guidance pair).
        timestep: the DDPM timestep of every sample (masks are a function of t).
        device, dtype: e.g. "cpu"/"float32" or "cuda"/"bfloat16".
        repeats, warmup: timed and untimed calls per model (alternating).
        count: also count executed FLOPs (one extra call of each model).
        memory: also measure peak memory (one extra call of each model).
        compile: wrap both models in torch.compile.
        execution: the converted model's evaluation path ("fast", "planned", "masked", "auto";
            default: the model's own, "planned" with ``graphs``).
        graphs: run both models through CUDA graphs (on CUDA; eager elsewhere).

    Both models are moved to ``device`` and ``dtype`` (a plain ``model`` is the original itself).

    Example:
        >>> from dynconvert.testing import tiny_dit
        >>> r = benchmark(tiny_dit(), keep=0.5, batch=2, repeats=2)
        >>> r.speedup > 0
        True
    """
    dev, dt = _check(dtype, execution, device)
    progress = on_progress or (lambda stage, i, n: None)
    name = getattr(model, "preset", None) or type(model).__name__
    if example_inputs is None:
        args, kwargs = default_inputs(model, batch_size=batch)
    else:
        args, kwargs = split_inputs(example_inputs)
    args, kwargs = with_timestep(model, (args, kwargs), float(timestep))
    static, dynamic, routing = _pair(model, keep, tokens, (args, kwargs), seed)
    bank = _place(static, dynamic, dev, dt, execution, graphs)
    args, kwargs = _to(args, dev, dt), _to(kwargs, dev, dt)
    run_static = torch.compile(static) if compile else static
    run_dynamic = torch.compile(dynamic) if compile else dynamic

    def call(m: nn.Module) -> Any:
        with torch.no_grad():
            return m(*args, **kwargs)

    for i in range(warmup):
        progress("warm-up", i + 1, warmup)
        call(run_static)
        call(run_dynamic)
    ratio = float(last_flops_ratio(bank).mean())
    token_overflow(dynamic)  # count the timed calls only
    ts, td = _alternate(run_static, run_dynamic, call, repeats, dev, progress)
    overflow = token_overflow(dynamic)
    g_static, g_dynamic = graph_stats(static) or {}, graph_stats(dynamic) or {}
    t_static, t_dynamic = statistics.median(ts), statistics.median(td)
    speedup = t_static / t_dynamic
    executed, peak_s, peak_d = _flops_and_memory(
        static, dynamic, call, (args, kwargs), dev, count, memory, progress
    )
    return BenchResult(
        time_static_s=t_static, time_dynamic_s=t_dynamic, speedup=speedup, flops_ratio=ratio,
        executed_flops_ratio=executed, efficiency=speedup * ratio, peak_mem_static_bytes=peak_s,
        peak_mem_dynamic_bytes=peak_d, device=str(dev), dtype=str(dt).replace("torch.", ""),
        batch=batch_of(args, kwargs), timestep=timestep, repeats=repeats, times_static_s=ts,
        times_dynamic_s=td, slice_cache_bytes=int(bank.slice_bytes), model=name, routing=routing,
        execution=bank.execution, graphs=graphs, graphs_static=g_static.get("graphs"),
        graphs_dynamic=g_dynamic.get("graphs"), capture_s_static=g_static.get("capture_s"),
        capture_s_dynamic=g_dynamic.get("capture_s"),
        token_overflow_rate=overflow.rate if overflow.calls else None,
    )  # fmt: skip


def _check(dtype: str, execution: str | None, device: str) -> tuple[torch.device, torch.dtype]:
    """The device and dtype to run on, once the options are known to be valid."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if execution is not None:
        execution_mode(execution)  # an unknown name fails here, before any model is built
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError('device cuda requested but CUDA is not available; use `device="cpu"`')
    return dev, DTYPES[dtype]


def _pair(
    model: nn.Module, keep: float | None, tokens: float, inputs: Any, seed: int
) -> tuple[nn.Module, nn.Module, str]:
    """(original, converted, how it is routed): a converted model and its reverted copy, or a
    plain model and a converted copy; ``keep`` gives either synthetic routing."""
    if is_converted(model):
        dynamic = model
        static = revert(copy.deepcopy(model))
    else:
        if keep is None:
            raise ConfigError(
                "benchmarking an unconverted model needs keep= (the FLOPs ratio of synthetic "
                "routing)"
            )
        static = model
        dynamic = convert(copy.deepcopy(model), keep, example_inputs=inputs)
    routing = "learned"
    if keep is not None:
        fr = synthetic_routing(dynamic, keep, tokens, inputs, seed)
        routing = f"synthetic: {fr['width']:.3f} of heads and groups, {fr['tokens']:.3f} of tokens"
    return static, dynamic, routing


def _place(
    static: nn.Module,
    dynamic: nn.Module,
    dev: torch.device,
    dt: torch.dtype,
    execution: str | None,
    graphs: bool,
) -> Any:
    """Both models in eval mode on ``dev`` in ``dt``, on the asked execution path and graphed
    or eager as asked; returns the converted model's state."""
    static.eval().to(device=dev, dtype=dt)
    dynamic.eval().to(device=dev, dtype=dt)
    bank = get_state(dynamic)
    bank.clear_cache()
    if execution is not None or graphs:
        bank.execution = execution or "planned"
    for m in (static, dynamic):  # graphed or eager as asked (a loaded model comes graphed)
        if graphs:
            enable_cuda_graphs(m)
        else:
            disable_cuda_graphs(m)
    return bank


def _alternate(
    static: Any,
    dynamic: Any,
    call: Callable[[Any], Any],
    repeats: int,
    dev: torch.device,
    progress: Callable[[str, int, int], None],
) -> tuple[list[float], list[float]]:
    """Seconds of each of ``repeats`` calls of each model, alternating (original first)."""
    ts: list[float] = []
    td: list[float] = []
    for i in range(repeats):
        progress("timing", i + 1, repeats)
        for m, out in ((static, ts), (dynamic, td)):
            _sync(dev)
            t0 = time.perf_counter()
            call(m)
            _sync(dev)
            out.append(time.perf_counter() - t0)
    return ts, td


def _flops_and_memory(
    static: nn.Module,
    dynamic: nn.Module,
    call: Callable[[nn.Module], Any],
    inputs: Any,
    dev: torch.device,
    count: bool,
    memory: bool,
    progress: Callable[[str, int, int], None],
) -> tuple[float | None, int | None, int | None]:
    """(executed FLOPs ratio, peak bytes of the original, of the converted model), as asked.

    Measured on the same paths run eagerly: a graph replay dispatches no op to count and
    allocates from its pool, captured during the warm-up.
    """
    for m in (static, dynamic):
        disable_cuda_graphs(m)
    executed = None
    if count:
        progress("counting FLOPs", 1, 1)
        executed = measure_macs(dynamic, inputs) / measure_macs(static, inputs)
    peak_s = peak_d = None
    if memory:
        progress("measuring memory", 1, 1)
        slices = get_state(dynamic).slice_bytes
        peak_s = _model_bytes(static) + _peak_call_bytes(lambda: call(static), dev)
        peak_d = _model_bytes(dynamic) + slices + _peak_call_bytes(lambda: call(dynamic), dev)
    return executed, peak_s, peak_d


def format_bytes(n: int | None) -> str:
    """Human-readable bytes (GiB/MiB)."""
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


__all__ = ["BenchResult", "benchmark", "format_bytes", "synthetic_routing"]
