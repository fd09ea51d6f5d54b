"""Load a saved dynconvert model and sample a grid: original (left) vs dynamic (right).

    python examples/export_and_sample.py [RUN_DIR] [OUT_PNG]

RUN_DIR is a run folder of ``dynconvert convert`` (e.g. runs/digits-0.5) or any folder written by
``dynconvert.save``. Without it, the shipped digits DiT is converted and saved first (its
routers set by hand to about 60% of the FLOPs instead of calibrated), so the script runs in
seconds on a CPU with no download.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

import dynconvert
from dynconvert.models import build_model
from dynconvert.sampling import compare_grid, sample
from dynconvert.testing import randomize_routing


def export_demo(folder: str) -> str:
    """Convert the digits DiT, give it fixed routing, and save it to ``folder``."""
    model = dynconvert.convert(build_model("digits").eval(), budget=0.6)
    randomize_routing(model, keep=0.6, tokens=0.8)
    dynconvert.save(model, folder)
    return folder


def main(run_dir: str | None, out_png: str) -> None:
    run_dir = run_dir or export_demo(tempfile.mkdtemp(prefix="dynconvert-export-"))
    model = dynconvert.load(run_dir)  # rebuilt from the record: base preset + routers + weights
    labels = torch.arange(10)
    steps = 20
    dynamic = sample(model, labels=labels, steps=steps, seed=0, clip_sample=True)
    with dynconvert.routing(model, "full"):  # the same weights with every unit on
        full = sample(model, labels=labels, steps=steps, seed=0, clip_sample=True)
    path = compare_grid(full, dynamic, out_png, nrow=10, upscale=4)
    ratio = dynconvert.count_flops(model).ratio
    print(
        f"loaded {run_dir}; wrote {path} (full width left, dynamic right); "
        f"FLOPs ratio on example inputs: {ratio:.3f}"
    )


if __name__ == "__main__":
    args = sys.argv[1:]
    main(
        args[0] if args else None,
        args[1] if len(args) > 1 else str(Path(tempfile.mkdtemp()) / "grid.png"),
    )
