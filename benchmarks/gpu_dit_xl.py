"""DiT-XL/2 256 px on one CUDA GPU: speed of the fast path and calibration memory.

Run: python benchmarks/gpu_dit_xl.py [--out results.json]

1. dynconvert.bench.benchmark in bf16 at batch 8 and 32: synthetic routing at FLOPs ratio 0.5,
   and with everything on (the overhead of an unused converted model).
2. Peak GPU memory of a few calibration steps of DiT-XL/2 at per-GPU batch 32 in bf16 (the
   published recipe's per-GPU batch), routers + model trained, EMA kept.
Weights are random (speed and memory do not depend on them).
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch

import dynconvert
from dynconvert.bench import benchmark
from dynconvert.models import build_model


def log(results: list, path: str, item: dict) -> None:
    results.append(item)
    print(json.dumps(item), flush=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_bench.json")
    parser.add_argument("--batches", default="8,32")
    parser.add_argument("--calib-steps", type=int, default=4)
    parser.add_argument("--model", default="DiT-XL/2")
    parser.add_argument("--device", default="cuda", help="cpu only for a smoke test of this script")
    args = parser.parse_args()
    dev = args.device
    dtype = "bfloat16" if dev == "cuda" else "float32"
    torch.backends.cuda.matmul.allow_tf32 = True
    results: list = []
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    log(results, args.out, {"device": name, "torch": torch.__version__, "model": args.model})
    t0 = time.time()
    for batch in [int(b) for b in args.batches.split(",")]:
        for keep in (0.5, 1.0):
            model = None
            try:
                with torch.device(dev):
                    torch.manual_seed(0)
                    model = build_model(args.model).eval()
                r = benchmark(model, keep=keep, batch=batch, device=dev, dtype=dtype,
                              repeats=20, warmup=3, count=True, memory=True)
                d = r.to_dict()
                d.pop("times_static_s")
                d.pop("times_dynamic_s")
                log(results, args.out, {"what": "bench", "keep": keep, "elapsed_s": time.time() - t0, **d})
            except Exception as e:  # noqa: BLE001 - keep going, report the failure
                log(results, args.out, {"what": "bench", "keep": keep, "batch": batch, "error": repr(e),
                                        "trace": traceback.format_exc()[-2000:]})
            del model
            torch.cuda.empty_cache()
    if args.calib_steps <= 0:
        return
    try:
        if dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with torch.device(dev):
            torch.manual_seed(0)
            model = build_model(args.model)
        shape = model.example_inputs(batch_size=1)[0].shape[1:]
        x = torch.randn(64, *shape)
        y = torch.randint(0, model.num_classes if hasattr(model, "num_classes") else 10, (64,))
        dynconvert.convert(model, 0.5, example_inputs=model.example_inputs(batch_size=2))
        cfg = dynconvert.CalibrationConfig(target=0.5, steps=args.calib_steps, batch_size=32,
                                           mixed_precision="bf16" if dev == "cuda" else "no", cpu=dev == "cpu",
                                           checkpoint_every=0, warmup_steps=1000, lambda_hold_steps=0)
        data = {"x": x, "y": y}
        times: list[float] = []
        last = [time.time()]

        def on_step(info):
            now = time.time()
            times.append(now - last[0])
            last[0] = now

        dynconvert.calibrate(model, data, cfg, on_step=on_step)
        cuda = dev == "cuda"
        log(results, args.out, {"what": "calibration_memory", "model": args.model, "per_gpu_batch": 32,
                                "mixed_precision": cfg.mixed_precision, "steps": args.calib_steps,
                                "peak_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
                                "peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
                                "step_times_s": times, "elapsed_s": time.time() - t0})
    except Exception as e:  # noqa: BLE001
        log(results, args.out, {"what": "calibration_memory", "error": repr(e), "trace": traceback.format_exc()[-3000:]})


if __name__ == "__main__":
    main()
