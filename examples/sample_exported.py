"""Sample from a ``dynconvert export`` folder with torch alone: DDIM with classifier-free guidance.

    dynconvert export runs/digits-0.5 --out export/
    python examples/sample_exported.py export/ [--out samples.pt] [--steps 50] [--block-dynconvert]

No dynconvert, no diffusers: the export's ``run_exported.py`` runs the programs and the DDIM
loop below is the one ``dynconvert sample`` runs (diffusers' DDIMScheduler as dynconvert sets it
up: DDPM's linear betas, "leading" spacing, alpha 1 at the end, eta 0, x0 clipped to [-1, 1]
for pixel models), so the two give the same images (first 10 classes, 50 steps, guidance 1.5,
seed 0, as ``dynconvert sample`` by default). ``--block-dynconvert`` makes ``import dynconvert``
fail first, to show that nothing here needs it. The samples are saved as a tensor file.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch


def load_exported(folder: str):
    """Import the folder's run_exported.py and load the export with it."""
    spec = importlib.util.spec_from_file_location("run_exported", Path(folder) / "run_exported.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load(folder)


def ddim(
    model, labels: list[int], steps: int = 50, cfg: float = 1.5, seed: int = 0
) -> torch.Tensor:
    """Guided DDIM (eta 0) from seeded noise; returns float32 samples (N, C, H, W)."""
    facts = model.manifest["sampling"]
    c, size, offset = facts["channels"], facts["image_size"], facts["timestep_offset"]
    clip = c in (1, 3)  # pixel-space samples are clipped to [-1, 1], latents are not
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32)  # DDPM's linear schedule
    alphas = torch.cumprod(1.0 - betas, dim=0)
    ratio = 1000 // steps
    timesteps = (torch.arange(steps) * ratio).flip(0)  # "leading": 980, 960, ..., 0 for 50
    n = len(labels)
    x = torch.randn((n, c, size, size), generator=torch.Generator().manual_seed(seed))
    y = torch.tensor(labels + [facts["null_label"]] * n)  # conditional rows, then unconditional
    with torch.no_grad():
        for t in timesteps.tolist():
            out = model(torch.cat([x, x]), torch.full((2 * n,), t + offset), y).float()
            cond, uncond = out[:, :c].chunk(2)
            eps = uncond + cfg * (cond - uncond)
            a_t = alphas[t]
            a_prev = alphas[t - ratio] if t - ratio >= 0 else torch.tensor(1.0)
            x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
            if clip:
                x0 = x0.clamp(-1.0, 1.0)
            x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return x


def main(folder: str, out: str, steps: int) -> None:
    model = load_exported(folder)
    samples = ddim(model, labels=list(range(10)), steps=steps)
    dropped, wanted = model.overflow()
    torch.save(samples, out)
    print(f"wrote {out}: {tuple(samples.shape)} samples; tokens over capacity {dropped}/{wanted}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="an export folder (dynconvert export)")
    parser.add_argument("--out", default="samples.pt", help="where to save the samples")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (those exported)")
    parser.add_argument("--block-dynconvert", action="store_true", help="make it unimportable")
    args = parser.parse_args()
    if args.block_dynconvert:
        sys.modules["dynconvert"] = None  # import dynconvert now raises ImportError
    main(args.folder, args.out, args.steps)
