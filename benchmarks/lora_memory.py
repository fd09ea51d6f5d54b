"""Peak memory of calibration with trainable="all" against trainable="lora" (issue 21).

One process per setting (peak RSS is per process): build a preset with random weights, convert
it at 0.5, then calibrate a few steps at batch 2 in fp32 on CPU. Prints one JSON line: the RSS
before calibration, the peak RSS during it, and the trainable and total parameter counts.

    python benchmarks/lora_memory.py --model dit-b --trainable lora
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

import dynconvert
from dynconvert.models import build_model


def rss_bytes() -> int:
    """The resident set size of this process now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="dit-b")
    parser.add_argument("--trainable", choices=("all", "routers", "lora"), default="lora")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = dynconvert.convert(build_model(args.model), 0.5)
    x = model.example_inputs()[0] if hasattr(model, "example_inputs") else None
    shape = tuple(x.shape[1:]) if torch.is_tensor(x) else (4, 32, 32)
    n = args.steps * args.batch_size
    data = {"x": torch.randn(n, *shape), "y": torch.randint(0, 1000, (n,))}
    cfg = dynconvert.CalibrationConfig(
        target=0.5, steps=args.steps, batch_size=args.batch_size, trainable=args.trainable,
        lora_rank=args.lora_rank, capacity_points=0, progress="off", cpu=True,
        lambda_hold_steps=0, warmup_steps=0,
    )  # fmt: skip
    before = rss_bytes()
    t0 = time.perf_counter()
    result = dynconvert.calibrate(model, data, cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({
        "model": args.model, "trainable": args.trainable, "batch_size": args.batch_size,
        "steps": args.steps, "lora_rank": args.lora_rank if args.trainable == "lora" else None,
        "rss_before_bytes": before, "peak_rss_bytes": peak,
        "trainable_params": result.trainable_params, "total_params": result.total_params,
        "seconds": round(time.perf_counter() - t0, 1), "dtype": "float32", "device": "cpu",
    }))  # fmt: skip


if __name__ == "__main__":
    main()
