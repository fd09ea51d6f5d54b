"""Calibrate a tiny DiT toward half its FLOPs for a few steps, save it, and load it back.

    python examples/calibrate_tiny.py [OUT_DIR]

Runs in seconds on a CPU. The data are random latents (the point is the API, not the images);
for real data pass a latents folder written by ``dynconvert.write_latents`` instead.
"""

from __future__ import annotations

import sys
import tempfile

import torch

import dynconvert
from dynconvert.testing import tiny_dit


def main(out: str) -> None:
    torch.manual_seed(0)
    model = dynconvert.convert(tiny_dit(), budget=0.5)
    data = {"x": torch.randn(64, 4, 8, 8), "y": torch.randint(0, 10, (64,))}
    config = dynconvert.CalibrationConfig(
        target=0.5, steps=30, batch_size=16, lr=5e-3, lambda_hold_steps=2, warmup_steps=10,
        ema_decay=0.0, checkpoint_every=0,
    )  # fmt: skip

    # Progress shows on stderr: a bar on a terminal, else a log line every few steps (the
    # config's progress="off" silences it; on_step=callback receives every step's StepInfo).
    result = dynconvert.calibrate(model, data, config)
    dynconvert.save(result.model, out)
    loaded = dynconvert.load(out)  # a built-in preset: the record rebuilds the base model
    x, t, y = torch.randn(4, 4, 8, 8), torch.tensor([0.0, 300.0, 600.0, 999.0]), torch.arange(4)
    with torch.no_grad():
        same = torch.allclose(loaded(x, t, y), result.model(x, t, y), atol=1e-5)
    ratio = dynconvert.last_flops_ratio(loaded).mean().item()
    print(f"saved to {out}; reloaded model matches: {same}; FLOPs ratio on this batch: {ratio:.3f}")
    if not same:
        raise SystemExit("the reloaded model differs from the saved one")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="dynconvert-tiny-"))
