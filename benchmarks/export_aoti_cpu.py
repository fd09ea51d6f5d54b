"""CPU speed of the AOTInductor export against the original model compiled the same way.

Run: python benchmarks/export_aoti_cpu.py [--model dit-xl] [--batch 2 8] [--repeats 5]
         [--out benchmarks/results/export_aoti_cpu.json]

The model is built with random weights (speed does not depend on them). The original is
exported with torch.export and compiled with AOTInductor exactly as ``dynconvert export
--format aoti`` compiles its programs: its weights are program inputs (not constants), default
inductor settings. Then the same model is converted in place and given synthetic routing at
FLOPs ratio ``--keep`` (the same at every t, tokens kept ``--tokens``), and exported with
``dynconvert.export(format="aoti", timesteps=[t])``: one program per batch. Both run in this
process, alternating call by call; the result is the median time per call of each, and their
ratio. ``--eager`` also times the original and the planned path eagerly.

Threads: inductor writes the thread count of the compiling process into the compiled code, and
on a CPU shared with other jobs OpenMP threads that wait at barriers for a descheduled partner
slow every call down many times over (measured: DiT-S/2 batch 2 eager 9.3 s with 2 threads,
1.65 s with 1, on the 2-core machine under a load of about 15). Run it with OMP_NUM_THREADS=1
there; the command line with it is kept in the result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import dynconvert
from dynconvert.deploy import load_exported
from dynconvert.inputs import default_inputs, with_timestep
from dynconvert.runs import resolve_source
from dynconvert.runtime.synthetic import synthetic_routing


class WeightsAsInputs(nn.Module):
    """The original model with its weights as the program's first input (as the export does)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        object.__setattr__(self, "model", model)  # not a submodule: nothing to lift

    def forward(self, weights, *args):
        return torch.func.functional_call(self.model, weights, args)


def compile_original(model, weights, args, path):
    t0 = time.perf_counter()
    with torch.no_grad():
        ep = torch.export.export(WeightsAsInputs(model), (weights, *args), strict=False)
    torch._inductor.aoti_compile_and_package(ep, package_path=str(path))
    return torch._inductor.aoti_load_package(str(path)), time.perf_counter() - t0


def timed(fn):
    t0 = time.perf_counter()
    with torch.no_grad():
        fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="dit-xl")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--tokens", type=float, default=0.7)
    parser.add_argument("--batch", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--timestep", type=float, default=500.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default="benchmarks/results/export_aoti_cpu.json")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="export-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = resolve_source(args.model, random_init=True).build().eval()
    weights = {n: p.detach() for n, p in model.named_parameters()}
    weights.update({n: b.detach() for n, b in model.named_buffers()})
    calls = {}
    for b in args.batch:
        a, k = with_timestep(model, default_inputs(model, b), args.timestep)
        calls[b] = (a, k)
    originals, compile_s = {}, {}
    for b, (a, _) in calls.items():
        print(f"compiling the original, batch {b}", file=sys.stderr, flush=True)
        originals[b], compile_s[b] = compile_original(
            model, weights, a, work / f"original-b{b}.pt2"
        )
    first = calls[args.batch[0]]
    dynconvert.convert(model, args.keep, example_inputs=first)
    fractions = synthetic_routing(model, args.keep, args.tokens, first)
    print("exporting the dynamic model", file=sys.stderr, flush=True)
    result = dynconvert.export(model, work / "export", format="aoti", timesteps=[args.timestep],
                               batch=args.batch, overwrite=True)  # fmt: skip
    t0 = time.perf_counter()
    exported = load_exported(work / "export")
    load_s = time.perf_counter() - t0
    rows = []
    for b, (a, k) in calls.items():
        print(f"timing batch {b}", file=sys.stderr, flush=True)
        runs = {"original_aoti": lambda a=a, b=b: originals[b](weights, *a),
                "export_aoti": lambda a=a, k=k: exported(*a, **k)}  # fmt: skip
        if args.eager:
            dynconvert.set_routing(model, "eval", execution="planned")
            runs["planned_eager"] = lambda a=a, k=k: model(*a, **k)
            runs["original_eager"] = lambda a=a, k=k: _full(model, a, k)
        for fn in runs.values():  # warm-up
            timed(fn)
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                times[name].append(timed(fn))
        med = {name: statistics.median(v) for name, v in times.items()}
        row = {"batch": b, "median_s": med, "times_s": times,
               "speedup_aoti": med["original_aoti"] / med["export_aoti"],
               "compile_original_s": compile_s[b]}  # fmt: skip
        if args.eager:
            row["speedup_eager"] = med["original_eager"] / med["planned_eager"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "times_s"}), file=sys.stderr)
    out = {
        "command": " ".join(
            [f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] * ("OMP_NUM_THREADS" in os.environ)
            + ["python", *sys.argv]
        ),
        "model": args.model, "keep": args.keep, "routing": fractions, "timestep": args.timestep,
        "flops_ratio": result.flops_ratio, "flops_unit": "MACs", "export": result.to_dict(),
        "load_s": load_s, "rows": rows, "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "note": "2 CPU cores shared with other jobs; times are medians of alternating calls",
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({"rows": [{k: v for k, v in r.items() if k != "times_s"} for r in rows]}))


def _full(model, a, k):
    with dynconvert.routing(model, "full"):
        return model(*a, **k)


if __name__ == "__main__":
    main()
