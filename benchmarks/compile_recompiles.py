"""What torch.compile costs on a converted model across the timesteps of a sampler.

Run: python benchmarks/compile_recompiles.py [--model DiT-S/2] [--steps 10]

Width masks change with t (piecewise constant), token counts change with the data, so the
sliced shapes change from call to call. This script compiles the converted model, calls it at
the timesteps of a short sampler (twice, as a second image would), and reports the time of each
call, the eager time of the same call, and how many graphs dynamo compiled.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import dynconvert
from dynconvert.models import build_model
from dynconvert.testing import randomize_routing


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(args.model).eval()
    x, _, y = model.example_inputs(batch_size=args.batch)
    dynconvert.convert(model, 0.5, example_inputs=(x, torch.full((args.batch,), 500.0), y))
    randomize_routing(
        model, keep=0.6, tokens=0.7, example_inputs=(x, torch.full((args.batch,), 500.0), y)
    )
    compiled = torch.compile(model)
    timesteps = torch.linspace(999, 0, args.steps).round().tolist()
    rows = []
    from torch._dynamo.utils import counters

    for rep in range(2):
        for t in timesteps:
            tt = torch.full((args.batch,), float(t))
            with torch.no_grad():
                t0 = time.perf_counter()
                compiled(x, tt, y)
                tc = time.perf_counter() - t0
                t0 = time.perf_counter()
                model(x, tt, y)
                te = time.perf_counter() - t0
            rows.append(
                {
                    "pass": rep,
                    "t": t,
                    "compiled_s": tc,
                    "eager_s": te,
                    "graphs_so_far": int(counters["stats"]["unique_graphs"]),
                }
            )
    first = sum(r["compiled_s"] for r in rows if r["pass"] == 0)
    second = sum(r["compiled_s"] for r in rows if r["pass"] == 1)
    eager = sum(r["eager_s"] for r in rows if r["pass"] == 1)
    print(
        json.dumps(
            {
                "model": args.model,
                "batch": args.batch,
                "steps": args.steps,
                "first_pass_compiled_s": first,
                "second_pass_compiled_s": second,
                "second_pass_eager_s": eager,
                "unique_graphs": int(counters["stats"]["unique_graphs"]),
                "calls": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
