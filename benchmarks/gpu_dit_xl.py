"""DiT-XL/2 256 px on one CUDA GPU: a 50-step sampling schedule, original vs dynamic, eager
and CUDA-graphed (issue 10). Runs in under 6 minutes end to end on an H100/H200.

Run:   python benchmarks/gpu_dit_xl.py [--out gpu_bench.json]
Smoke: python benchmarks/gpu_dit_xl.py --device cpu --tiny      (checks the script, no timing)

For each model batch B (8, 32, 256: B/2 images, classifier-free guidance in the batch, so both
halves run in one call) one timed run is a whole schedule: 50 model calls at the timesteps of a
50-step DDIM respacing of 1000 (999 -> 0), each followed by the guidance mix and a latent
update. Variants, all in one process, alternating per repeat:

- ``original_eager``: the unconverted model, eager.
- ``dynamic_fast``: converted, synthetic routing at FLOPs ratio 0.5 (fixed over t, as in
  ``dynconvert bench``), fast path (today's eager path: sliced weights, nonzero gather).
- ``dynamic_planned``: the same model on the planned path, eager (static shapes, capacities).
- ``original_graphed`` / ``dynamic_graphed``: both through dynconvert's CUDA graphs (one graph
  per routing pattern and batch shape, captured during the untimed warm-up schedule).

Reported per variant: seconds per schedule and per call (median of the repeats), peak memory
(the model's weights + slices + what its schedule allocates, graph pools included), graph
count and capture seconds; per batch: speed-ups eager vs eager and graphed vs graphed,
efficiency (speed-up x FLOPs ratio), the planned path's executed FLOPs ratio and token overflow
rate. ``--varying`` adds one run whose width routing changes with t (one pattern per step:
the worst case for graph count and capture time). Weights are random (speed does not depend on
them); a deadline (``--budget-s``) skips what would not fit, and says so.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import traceback

import torch

import dynconvert
from dynconvert.flops import last_flops_ratio
from dynconvert.models import build_model
from dynconvert.runtime.planned.controls import planned_stats, token_overflow
from dynconvert.runtime.planned.graphs import disable_cuda_graphs, enable_cuda_graphs, graph_stats
from dynconvert.runtime.synthetic import randomize_routing, synthetic_routing


def log(results: list, path: str, item: dict) -> None:
    results.append(item)
    print(json.dumps(item), flush=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def schedule(model, x0, y, ts, cfg_scale: float = 1.5, ratios: list | None = None):
    """One sampling schedule with CFG in the batch (y: labels, then null labels); with
    ``ratios``, the FLOPs ratio of each call is appended (a host read: untimed runs only)."""
    x = x0
    n = x.shape[0]
    for t in ts:
        with torch.no_grad():
            out = model(torch.cat([x, x]), t.expand(2 * n), y)
        if ratios is not None:
            ratios.append(float(last_flops_ratio(model).mean()))
        eps = out[:, : x.shape[1]]
        cond, uncond = eps.chunk(2)
        x = x - 0.02 * (uncond + cfg_scale * (cond - uncond))  # the update rule does not matter
    return x


def speed(res: dict, a: str, b: str) -> float | None:
    """Seconds per schedule of variant a over that of b (None when either did not run)."""
    if "schedule_s" not in res.get(a, {}) or "schedule_s" not in res.get(b, {}):
        return None
    return res[a]["schedule_s"] / res[b]["schedule_s"]


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gpu_bench.json")
    p.add_argument("--batches", default="8,32,256", help="model batch sizes (CFG pairs inside)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3, help="timed schedules per variant")
    p.add_argument("--model", default="DiT-XL/2")
    p.add_argument("--device", default="cuda", help="cpu only for a smoke test of this script")
    p.add_argument("--tiny", action="store_true", help="dit-tiny, few steps: a smoke test")
    p.add_argument("--varying", type=int, default=32, help="batch of the t-varying run (0: none)")
    p.add_argument("--budget-s", type=float, default=330.0, help="skip what would run past this")
    args = p.parse_args()
    dev = args.device
    if args.tiny:
        args.model, args.steps, args.repeats = "dit-tiny", min(args.steps, 4), 1
        args.batches = "4,8" if args.batches == "8,32,256" else args.batches
        args.varying = 8 if args.varying else 0
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = True
    t_start = time.time()
    results: list = []
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    log(results, args.out, {"device": name, "torch": torch.__version__, "model": args.model,
                            "dtype": str(dtype), "steps": args.steps,
                            "ratio": args.ratio})  # fmt: skip

    torch.manual_seed(0)
    with torch.device(dev):
        original = build_model(args.model).eval().to(dtype)
    shape = original.example_inputs(batch_size=1)[0].shape[1:]
    ex = original.example_inputs(batch_size=2)
    t0 = time.time()
    dynamic = dynconvert.convert(copy.deepcopy(original), args.ratio, example_inputs=ex)
    log(results, args.out, {"what": "convert", "seconds": round(time.time() - t0, 2)})
    ts = torch.linspace(999, 0, args.steps, device=dev).round().long()

    def variant(label, model, execution, graphs, x0, y, warm_ts):
        """Warm-up (graph capture) then timed schedules; a dict of what was measured."""
        if dynconvert.is_converted(model):
            dynconvert.set_routing(model, "eval", execution)
        if graphs:
            enable_cuda_graphs(model)
        else:
            disable_cuda_graphs(model)
        sync(dev)
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if dev == "cuda" else 0
        w0 = time.time()
        ratios = [] if dynconvert.is_converted(model) else None
        schedule(model, x0, y, warm_ts, ratios=ratios)  # untimed: builds plans, captures graphs
        sync(dev)
        warm_s = time.time() - w0
        if dynconvert.is_converted(model):
            token_overflow(model)  # count the timed schedules only
        times = []
        for _ in range(args.repeats):
            sync(dev)
            s0 = time.perf_counter()
            schedule(model, x0, y, ts)
            sync(dev)
            times.append(time.perf_counter() - s0)
        d = {"variant": label, "schedule_s": statistics.median(times), "times_s": times,
             "per_call_ms": 1000 * statistics.median(times) / len(ts),
             "warmup_s": round(warm_s, 3)}  # fmt: skip
        if dev == "cuda":
            extra = model_bytes(model) + (
                dynconvert.get_state(model).slice_bytes if dynconvert.is_converted(model) else 0
            )
            d["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated() - before + extra)
        g = graph_stats(model)
        if g is not None:
            d.update(graphs=g["graphs"], capture_s=round(g["capture_s"], 3), replays=g["replays"],
                     eager_calls=g["eager_calls"], graph_failures=g["failures"])  # fmt: skip
        if dynconvert.is_converted(model) and execution == "planned":
            ov = token_overflow(model)
            d.update(
                token_overflow_rate=ov.rate,
                tokens_dropped=ov.dropped,
                patterns=planned_stats(model)["patterns"],
            )
            d["executed_flops_ratio"] = statistics.mean(ratios)  # over the warm-up schedule
        if dynconvert.is_converted(model) and execution == "fast":
            d["flops_ratio"] = statistics.mean(ratios)
        disable_cuda_graphs(model)
        return d

    def over_budget() -> bool:
        return time.time() - t_start > args.budget_s

    runs = [(b, "fixed") for b in (int(v) for v in args.batches.split(","))]
    if args.varying:
        runs.append((args.varying, "varying"))
    for batch, kind in runs:
        if over_budget():
            log(
                results,
                args.out,
                {"what": "skipped", "batch": batch, "routing": kind, "reason": "time budget"},
            )
            continue
        try:
            g = torch.Generator().manual_seed(batch)
            n = batch // 2
            x0 = torch.randn(n, *shape, generator=g).to(dev, dtype)
            null = original.y_embedder.num_classes  # DiT's null label: its class count
            y = torch.randint(0, null, (n,), generator=g).to(dev)
            y = torch.cat([y, torch.full_like(y, null)])  # (B,): labels, then null labels
            inputs = (torch.cat([x0, x0]), torch.full((batch,), 500, device=dev), y)
            if kind == "fixed":
                routing = synthetic_routing(dynamic, args.ratio, 0.7, inputs)
            else:  # each unit on for `ratio` of the timesteps: one pattern per step
                randomize_routing(dynamic, keep=args.ratio, tokens=0.7, example_inputs=inputs)
                routing = {"width": "varies with t", "tokens": 0.7}
            warm_ts = ts if kind == "varying" else ts[:3]
            out = {
                "what": "schedule",
                "batch": batch,
                "images": n,
                "routing": kind,
                "synthetic": routing,
            }
            variants = [("original_eager", original, None, False),
                        ("dynamic_fast", dynamic, "fast", False),
                        ("dynamic_planned", dynamic, "planned", False),
                        ("original_graphed", original, None, True),
                        ("dynamic_graphed", dynamic, "planned", True)]  # fmt: skip
            if kind == "varying":
                variants = [
                    v
                    for v in variants
                    if v[0] in ("original_graphed", "dynamic_graphed", "dynamic_planned")
                ]
            res = {}
            for label, m, execution, graphs in variants:
                if over_budget():
                    res[label] = {"skipped": "time budget"}
                    continue
                res[label] = variant(label, m, execution, graphs, x0, y, warm_ts)
            out["variants"] = res

            ratio = res.get("dynamic_fast", {}).get("flops_ratio") or res.get(
                "dynamic_planned", {}
            ).get("executed_flops_ratio")
            out["speedup_eager_fast"] = speed(res, "original_eager", "dynamic_fast")
            out["speedup_eager_planned"] = speed(res, "original_eager", "dynamic_planned")
            out["speedup_graphed"] = speed(res, "original_graphed", "dynamic_graphed")
            out["flops_ratio"] = ratio
            out["efficiency_graphed"] = (
                out["speedup_graphed"] * ratio if out["speedup_graphed"] and ratio else None
            )
            out["elapsed_s"] = round(time.time() - t_start, 1)
            log(results, args.out, out)
        except Exception as e:  # noqa: BLE001 - keep going, report the failure
            log(results, args.out, {"what": "schedule", "batch": batch, "routing": kind,
                                    "error": repr(e),
                                    "trace": traceback.format_exc()[-3000:]})  # fmt: skip
        if dev == "cuda":
            torch.cuda.empty_cache()
    log(results, args.out, {"what": "done", "elapsed_s": round(time.time() - t_start, 1)})


if __name__ == "__main__":
    main()
