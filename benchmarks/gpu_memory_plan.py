"""DiT-XL/2 calibration on CUDA: the measured peak next to the memory plan's estimate (issue 22).

NOT RUN YET: written on a machine without a GPU; the numbers it prints are the first ones.

Run (one GPU, about 3 minutes on an H100 including the 40 s build):
    python benchmarks/gpu_memory_plan.py [--batch 32] [--steps 4] [--out gpu_memory_plan.json]
FSDP over the GPUs of one machine (one process per GPU):
    accelerate launch --config_file examples/accelerate/fsdp.yaml --num_processes 8 \\
        benchmarks/gpu_memory_plan.py --batch 256
Smoke test of the script on CPU (no figures worth keeping):
    python benchmarks/gpu_memory_plan.py --device cpu --model dit-tiny --batch 4 --steps 2

Each process builds DiT-XL/2 with random weights, converts it, and calibrates ``--steps`` steps
(bf16 mixed precision, the recipe's settings otherwise, synthetic latents, no checkpoints).
Reported per process: ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` over the
calibration, and the plan's estimate for the same settings (``calibration.memory.estimate``),
with the relative error against the reserved peak.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import dynconvert
from dynconvert.calibration.distributed import make_accelerator, sharding_of
from dynconvert.calibration.fit import settings_for
from dynconvert.calibration.memory import estimate
from dynconvert.calibration.memory_facts import model_facts
from dynconvert.models import build_model
from dynconvert.runs.data import synthetic_data
from dynconvert.runtime.state import get_state


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="DiT-XL/2")
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--trainable", default="all")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="gpu_memory_plan.json")
    args = parser.parse_args()
    cfg = dynconvert.CalibrationConfig(
        target=0.5, steps=args.steps, batch_size=args.batch, grad_accum_steps=args.accum,
        gradient_checkpointing=args.checkpointing, trainable=args.trainable,
        mixed_precision=args.precision if args.device == "cuda" else "no",
        lambda_hold_steps=0, warmup_steps=2, cpu=args.device == "cpu", check_memory=False,
        capacity_points=0,
    )  # fmt: skip
    accelerator = make_accelerator(cfg)
    t0 = time.perf_counter()
    model = dynconvert.convert(build_model(args.model), budget=0.5)
    built = time.perf_counter() - t0
    settings = settings_for(
        cfg, accelerator.num_processes, sharding_of(accelerator), accelerator.device
    )
    plan = estimate(model_facts(model, get_state(model).plan), settings)
    data = synthetic_data(model, rows=max(64, args.batch), seed=0)
    cuda = accelerator.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    t0 = time.perf_counter()
    dynconvert.calibrate(model, data, cfg, accelerator=accelerator)
    seconds = time.perf_counter() - t0
    row = {
        "model": args.model, "process": accelerator.process_index,
        "processes": accelerator.num_processes, "sharding": settings.sharding,
        "batch": args.batch, "micro_batch": settings.micro_batch, "steps": args.steps,
        "trainable": args.trainable, "mixed_precision": cfg.mixed_precision,
        "gradient_checkpointing": args.checkpointing, "build_convert_s": round(built, 1),
        "calibrate_s": round(seconds, 1), "estimate_bytes": plan.total, "terms": plan.terms,
    }  # fmt: skip
    if cuda:
        reserved = torch.cuda.max_memory_reserved(accelerator.device)
        row.update(
            device=torch.cuda.get_device_name(accelerator.device),
            peak_allocated_bytes=torch.cuda.max_memory_allocated(accelerator.device),
            peak_reserved_bytes=reserved, error=round(plan.total / reserved - 1, 3),
        )  # fmt: skip
    print(json.dumps(row), flush=True)
    if accelerator.is_main_process:
        with open(args.out, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
