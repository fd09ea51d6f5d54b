"""The memory plan against measured CPU peaks: one calibration per row, each in its own process.

Run: python benchmarks/memory_plan.py [--rows tiny,dit-s,...]
        [--out benchmarks/results/memory_plan.json]
The DiT-XL/2 rows (``--rows dit-xl,dit-xl-routers``) need some 15 GB: on a shared machine run
them alone (``flock /tmp/bigmem.lock nice -n 5 python benchmarks/memory_plan.py ...``).

Each row builds its model (random weights), converts it, then resets the process's peak resident
memory (``/proc/self/clear_refs`` 5, Linux) and calibrates a few steps with a checkpoint at the
end; the measured peak is VmHWM afterwards (everything the process held during calibration,
the interpreter included; calibrate fixes glibc's mmap threshold on the CPU, see
``calibration/memory_release.py``). The estimate is ``calibration.memory.estimate`` for the same
settings on the CPU (interpreter term included). Rows run one after the other, never together,
and a row is not started while the machine has less than 1.15 x its estimate available (it
waits: the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = {
    "tiny": dict(model="dit-tiny", batch=8),
    "tiny-routers": dict(model="dit-tiny", batch=8, trainable="routers"),
    "dit-s": dict(model="DiT-S/2", batch=8),
    "dit-s-routers": dict(model="DiT-S/2", batch=8, trainable="routers"),
    "dit-s-bf16": dict(model="DiT-S/2", batch=8, mixed_precision="bf16"),
    "dit-s-accum": dict(model="DiT-S/2", batch=16, accum=4),
    "dit-s-ckpt": dict(model="DiT-S/2", batch=16, checkpointing=True),
    "dit-b": dict(model="DiT-B/2", batch=8, steps=2),
    "dit-b-routers": dict(model="DiT-B/2", batch=8, steps=2, trainable="routers"),
    "dit-b-lora": dict(model="DiT-B/2", batch=8, steps=2, trainable="lora"),
    "dit-b-ckpt": dict(model="DiT-B/2", batch=16, steps=2, checkpointing=True),
    "dit-b-ckpt-routers": dict(
        model="DiT-B/2", batch=16, steps=2, checkpointing=True, trainable="routers"
    ),
    "dit-xl": dict(model="DiT-XL/2", batch=2, steps=3),
    "dit-xl-routers": dict(model="DiT-XL/2", batch=2, steps=3, trainable="routers"),
}


def _hwm() -> int:
    """Peak resident bytes of this process since the last reset."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def _rss() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


def one(row: dict) -> dict:
    """Build, convert, reset the peak, calibrate; the peak and the estimate in bytes."""
    import torch

    import dynconvert
    from dynconvert.calibration.memory import MemorySettings, estimate
    from dynconvert.calibration.memory_facts import model_facts
    from dynconvert.calibration.memory_release import release_freed_memory
    from dynconvert.calibration.trainable import adapter_numel
    from dynconvert.models import build_model
    from dynconvert.runs.data import synthetic_data
    from dynconvert.runtime.state import get_state

    before_model = _rss()
    torch.manual_seed(0)
    model = dynconvert.convert(build_model(row["model"]), budget=0.5)
    batch, steps = row["batch"], row.get("steps", 3)
    data = synthetic_data(model, rows=max(64, batch), seed=0)
    settings = MemorySettings(
        batch_size=batch,
        mixed_precision=row.get("mixed_precision", "no"),
        grad_accum_steps=row.get("accum", 1),
        gradient_checkpointing=row.get("checkpointing", False),
        trainable=row.get("trainable", "all"),
        device="cpu",
    )
    extra = {}
    if settings.grad_accum_steps > 1:
        extra["grad_accum_steps"] = settings.grad_accum_steps
    if settings.gradient_checkpointing:
        extra["gradient_checkpointing"] = True
    with tempfile.TemporaryDirectory() as out:
        cfg = dynconvert.CalibrationConfig(
            target=0.5,
            steps=steps,
            batch_size=batch,
            trainable=settings.trainable,
            mixed_precision=settings.mixed_precision,
            output_dir=out,
            checkpoint_every=0,
            lambda_hold_steps=0,
            warmup_steps=2,
            cpu=True,
            check_memory=False,
            **extra,
        )
        adapters = adapter_numel(model, cfg) if settings.trainable == "lora" else 0
        plan = estimate(model_facts(model, get_state(model).plan, adapter_numel=adapters), settings)
        at_start = _rss()
        Path("/proc/self/clear_refs").write_text("5")
        t0 = time.perf_counter()
        release_freed_memory("cpu")  # as calibrate does when its plan is tight: every row alike
        dynconvert.calibrate(model, data, cfg)
        seconds = time.perf_counter() - t0
        peak = _hwm()
    return {
        **row,
        "estimate": plan.total,
        "terms": plan.terms,
        "measured": peak,
        "rss_before_model": before_model,
        "rss_at_start": at_start,
        "seconds": round(seconds, 1),
        "error": round(plan.total / peak - 1, 3),
    }


def _available() -> int:
    import psutil

    return psutil.virtual_memory().available


def _planned(row: dict) -> int:
    """The row's estimate, from a meta-device skeleton (nothing allocated)."""
    import torch

    from dynconvert.calibration.memory import MemorySettings, estimate
    from dynconvert.calibration.memory_facts import skeleton_facts
    from dynconvert.models import build_model

    with torch.device("meta"):
        skeleton = build_model(row["model"])
    settings = MemorySettings(
        batch_size=row["batch"],
        mixed_precision=row.get("mixed_precision", "no"),
        grad_accum_steps=row.get("accum", 1),
        gradient_checkpointing=row.get("checkpointing", False),
        trainable=row.get("trainable", "all"),
        device="cpu",
    )
    return estimate(skeleton_facts(skeleton)[1], settings).total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--rows",
        default="tiny,tiny-routers,dit-s,dit-s-routers,dit-s-bf16,"
        "dit-s-accum,dit-s-ckpt,dit-b,dit-b-routers,dit-b-lora,dit-b-ckpt,dit-b-ckpt-routers",
    )
    parser.add_argument("--out", default=None, help="Write the rows as JSON here.")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(ROWS[args.one])))
        return
    results = []
    for name in args.rows.split(","):
        need = 1.15 * _planned(ROWS[name])
        while _available() < need:  # other engineers' jobs hold the memory: wait, never squeeze
            print(f"{name}: waiting for {need / 2**30:.1f} GiB available", flush=True)
            time.sleep(60)
        proc = subprocess.run(
            [sys.executable, __file__, "--one", name], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            print(f"{name}: failed ({proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["row"] = name
        results.append(row)
        gib = 2**30
        print(
            f"{name:22s} estimate {row['estimate'] / gib:7.3f} GiB  measured "
            f"{row['measured'] / gib:7.3f} GiB  error {100 * row['error']:+5.1f}%",
            flush=True,
        )
        if args.out:  # after every row: a long series cut short keeps what it measured
            Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
