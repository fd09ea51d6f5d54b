"""Train the digits DiT from scratch on a CPU and write the weights dynconvert ships.

    python examples/train_digits.py                      # reproduces dynconvert/assets/digits_dit.safetensors
    python examples/train_digits.py --out /tmp/digits.safetensors --steps 500
    python examples/train_digits.py --classifier         # also retrain the metrics classifier

Fixed seed; with the defaults it takes a few minutes on two cores. At the end it samples 10
digits of every class (DDIM, 50 steps, guidance 1.5) and prints the digits classifier's accuracy
on them. Under CPU contention (other jobs on the same cores) ``--threads 1`` is often faster.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from dynconvert.demo.digits import (
    DIGITS_SAMPLING,
    DIGITS_WEIGHTS,
    digits_model_info,
    save_digits_weights,
)
from dynconvert.demo.training import TrainInfo, train_digits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3000, help="optimiser steps (default 3000)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything random")
    parser.add_argument("--out", default=str(DIGITS_WEIGHTS), help="safetensors file to write")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--classifier", action="store_true", help="also retrain the metrics classifier"
    )
    parser.add_argument("--no-check", action="store_true", help="skip the sample accuracy check")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.classifier:
        from dynconvert.demo import metrics

        print("training the digits classifier ...", flush=True)
        clf = metrics.train_classifier(
            on_epoch=lambda e, acc: print(
                f"  epoch {e:2d}  held-out accuracy {acc:.4f}", flush=True
            )
        )
        print(f"wrote {metrics.save_classifier(clf)}", flush=True)

    info = digits_model_info()
    print(f"digits DiT: {info['parameters']:,} parameters, config {info['config']}", flush=True)
    every = max(1, args.steps // 40)

    def report(i: TrainInfo) -> None:
        if i.step % every == 0 or i.step == i.steps:
            rate = i.step / max(i.seconds, 1e-9)
            print(
                f"step {i.step:5d}/{i.steps}  loss {i.loss:.4f}  mse {i.mse:.4f}  lr {i.lr:.2e}  "
                f"{rate:.2f} steps/s  {i.seconds:6.0f}s",
                flush=True,
            )

    result = train_digits(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, on_step=report
    )
    path = save_digits_weights(result.model, args.out)
    print(
        f"trained {result.steps} steps in {result.seconds:.0f}s; final loss {result.final_loss:.4f} "
        f"(mse {result.final_mse:.4f}, mean of the last 100 steps)",
        flush=True,
    )
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)", flush=True)

    if not args.no_check:
        from dynconvert.demo.metrics import classifier_accuracy
        from dynconvert.sampling import sample

        labels = torch.arange(10).repeat_interleave(10)
        start = time.perf_counter()
        images = sample(result.model, labels=labels, seed=0, **DIGITS_SAMPLING)
        acc = classifier_accuracy(images, labels)
        print(
            f"classifier accuracy on {len(labels)} DDIM-{DIGITS_SAMPLING['steps']} samples "
            f"(cfg {DIGITS_SAMPLING['cfg_scale']}): {acc:.3f} ({time.perf_counter() - start:.0f}s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
