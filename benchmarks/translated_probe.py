"""Why the translated-digits DiT does not generate: one retraining remedy per run, scored.

Each run trains the translated demo's DiT with ``dynconvert.demo.training.train_digits`` (one
thread, seed 1) under one change, then samples 200 images (20 per class; the demo's sampler:
DDIM 50 steps, guidance 1.5, seed 0) and prints the classifier's accuracy and the Frechet
distance to the reference set (docs/quality.md, "Translated digits", has the results):

    python benchmarks/translated_probe.py --init shipped --steps 1500 --lr 1e-3
    python benchmarks/translated_probe.py --hidden-size 128 --steps 3000 --lr 1e-3
    python benchmarks/translated_probe.py --align 4 --steps 3000 --lr 2e-3

``--init shipped`` continues from the shipped weights (EMA) instead of random ones;
``--hidden-size`` widens the model; ``--align N`` rounds every training placement down to a
multiple of N pixels (4: each digit covers whole patches, so a token never holds a digit at one
of 16 sub-patch offsets). ``--out`` keeps the trained weights.
"""

from __future__ import annotations

import argparse
import time

import torch

import dynconvert.demo  # noqa: F401 - registers the demos
from dynconvert.demo import data, metrics, training
from dynconvert.demo import models as demo_models
from dynconvert.sampling import sample


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--init", choices=["random", "shipped"], default="random")
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--align", type=int, default=0, help="round placements to this many pixels")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--out", default=None, help="save the trained EMA weights here")
    args = p.parse_args()
    torch.set_num_threads(1)
    overrides = {} if args.hidden_size is None else {"hidden_size": args.hidden_size}
    build = demo_models.build_demo
    # train_digits builds its model and data through these module attributes at call time:
    # swap them for this process only (the experiment's one change).
    demo_models.build_demo = lambda name, pretrained=False, **kw: build(
        name, pretrained=args.init == "shipped", **{**kw, **overrides}
    )
    if args.align:
        place, a = data.place, args.align
        data.place = lambda g, r, c, canvas: place(g, r // a * a, c // a * a, canvas)

    def log(i: training.TrainInfo) -> None:
        if i.step % 250 == 0:
            print(f"step {i.step} loss {i.loss:.4f} mse {i.mse:.4f} {i.seconds:.0f}s", flush=True)

    label_std = None if args.init == "shipped" else 0.5
    result = training.train_digits(
        "translated", steps=args.steps, lr=args.lr, label_init_std=label_std, seed=1, on_step=log
    )
    if args.out:
        demo_models.save_demo_weights(result.model, "translated", args.out)
    settings = demo_models.demo_spec("translated").sampling
    labels = torch.arange(10).repeat_interleave(20)
    start = time.perf_counter()
    images = sample(result.model, labels=labels, seed=0, **settings)
    acc = metrics.classifier_accuracy(images, labels, "translated")
    real, _ = metrics.real_digits("translated")
    fd = metrics.frechet_distance(images, real, "translated")
    print(f"{vars(args)}: accuracy {acc:.3f}, FD {fd:.2f} ({time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()
