"""Where a calibration's peak resident memory is: RSS sampled by phase, one row per process.

Run: python benchmarks/memory_phases.py --row dit-s-ckpt [--steps 3] [--out phases.json]
(rows are ``memory_plan.py``'s). A thread reads VmRSS every millisecond while the run calibrates;
the loop's pieces are wrapped to name the phase they run in (setup, forward, backward, clip,
optimiser step, EMA, checkpoint, finish) with the step it belongs to. For every phase it reports
the highest RSS seen and the RSS when the phase began, so a peak inside a step (real work) is
told from one that grows from step to step (memory the allocator keeps) or one outside the steps
(a checkpoint's or the result's copy). ``--malloc`` reports the glibc settings the process ran
with (set them in the environment: ``MALLOC_MMAP_THRESHOLD_=...``) to tell freed-but-kept heap
from live tensors.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from memory_plan import ROWS  # noqa: E402

GIB = 2**30


class Sampler:
    """VmRSS every millisecond, the highest per phase (and the value when the phase began)."""

    def __init__(self):
        self.phase = "before"
        self.peaks: dict[str, int] = {}
        self.starts: dict[str, int] = {}
        self.order: list[str] = []
        self._stop = threading.Event()
        self._fd = os.open("/proc/self/statm", os.O_RDONLY)
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        return int(os.pread(self._fd, 100, 0).split()[1]) * self._page

    def enter(self, phase: str) -> None:
        self.sample()
        self.phase = phase
        if phase not in self.starts:
            self.starts[phase] = self.rss()
            self.order.append(phase)
        self.sample()

    def sample(self) -> None:
        value = self.rss()
        if value > self.peaks.get(self.phase, 0):
            self.peaks[self.phase] = value

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _wrap(owner, name: str, sampler: Sampler, label) -> None:
    """Replace ``owner.name`` by a version that enters phase ``label()`` around each call."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def run(*args, **kwargs):
        sampler.enter(label())
        try:
            return original(*args, **kwargs)
        finally:
            sampler.sample()

    setattr(owner, name, run)


def profile(name: str, steps: int) -> dict:
    """Calibrate row ``name`` for ``steps`` steps (a checkpoint at the end) under the sampler."""
    import torch

    import dynconvert
    from dynconvert.calibration import loop
    from dynconvert.calibration.ema import EMA
    from dynconvert.calibration.memory import MemorySettings, estimate
    from dynconvert.calibration.memory_facts import model_facts
    from dynconvert.models import build_model
    from dynconvert.runs.data import synthetic_data
    from dynconvert.runtime.state import get_state

    row = ROWS[name]
    torch.manual_seed(0)
    model = dynconvert.convert(build_model(row["model"]), budget=0.5)
    batch = row["batch"]
    data = synthetic_data(model, rows=max(64, batch), seed=0)
    settings = MemorySettings(
        batch_size=batch, mixed_precision=row.get("mixed_precision", "no"),
        grad_accum_steps=row.get("accum", 1),
        gradient_checkpointing=row.get("checkpointing", False),
        trainable=row.get("trainable", "all"), device="cpu",
    )  # fmt: skip
    plan = estimate(model_facts(model, get_state(model).plan), settings)
    sampler = Sampler()
    step = {"n": 0}

    def at(phase):
        return lambda: f"{step['n']}:{phase}"

    original_fb = loop.forward_backward

    def forward_backward(*args, **kwargs):
        step["n"] = kwargs.get("step", step["n"])
        sampler.enter(at("forward")())
        return original_fb(*args, **kwargs)

    loop.forward_backward = forward_backward
    _wrap(EMA, "update", sampler, at("ema"))
    _wrap(torch.optim.AdamW, "step", sampler, at("optimizer"))
    _wrap(loop, "_checkpoint_if_due", sampler, at("checkpoint"))
    _wrap(loop, "_finish", sampler, lambda: "finish")
    accelerator = None
    with tempfile.TemporaryDirectory() as out:
        cfg = dynconvert.CalibrationConfig(
            target=0.5, steps=steps, batch_size=batch, trainable=settings.trainable,
            mixed_precision=settings.mixed_precision, output_dir=out, checkpoint_every=0,
            lambda_hold_steps=0, warmup_steps=2, cpu=True, check_memory=False,
            grad_accum_steps=settings.grad_accum_steps,
            gradient_checkpointing=settings.gradient_checkpointing, progress="off",
        )  # fmt: skip
        accelerator = loop.make_accelerator(cfg)
        _wrap(accelerator, "backward", sampler, at("backward"))
        _wrap(accelerator, "clip_grad_norm_", sampler, at("clip"))
        start = sampler.rss()
        with sampler:
            sampler.enter("setup")
            dynconvert.calibrate(model, data, cfg, accelerator=accelerator)
            sampler.enter("after")
    return {
        "row": name, **row, "steps": steps, "estimate": plan.total, "terms": plan.terms,
        "rss_at_start": start, "malloc": {k: v for k, v in os.environ.items() if "MALLOC" in k},
        "phases": [
            {"phase": p, "rss_at_start": sampler.starts[p], "peak": sampler.peaks.get(p, 0)}
            for p in sampler.order
        ],
        "peak": max(sampler.peaks.values()),
        "vmhwm": int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())[1])
        * 1024,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--row", default="dit-s-ckpt", choices=sorted(ROWS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = profile(args.row, args.steps)
    for p in result["phases"]:
        start, peak = p["rss_at_start"] / GIB, p["peak"] / GIB
        print(f"{p['phase']:16s} start {start:6.3f}  peak {peak:6.3f} GiB")
    print(f"estimate {result['estimate'] / GIB:.3f} GiB, sampled peak {result['peak'] / GIB:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
