"""Train the digits DiT from scratch on a CPU and write the weights dynconvert ships.

    python examples/train_digits.py   # reproduces dynconvert/assets/digits_dit.safetensors
    python examples/train_digits.py --out /tmp/digits.safetensors --steps 500
    python examples/train_digits.py --classifier         # also retrain the metrics classifier

Fixed seed; with the defaults it takes a few minutes on two cores. At the end it samples 20
digits of every class (DDIM, 50 steps, guidance 1.5) and prints the classifier's accuracy on
them and their Frechet distance to the real digits. Under CPU contention (other jobs on the same
cores) ``--threads 1`` is often faster. ``examples/train_translated.py`` runs the same for the
translated-digits demo.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from dynconvert.demo.models import demo_model_info, demo_spec, save_demo_weights
from dynconvert.demo.training import TrainInfo, train_digits


def _parse(argv: list[str] | None, benchmark: str, doc: str) -> argparse.Namespace:
    spec = demo_spec(benchmark)
    defaults = spec.training
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=defaults["steps"], help="optimiser steps")
    parser.add_argument(
        "--batch-size", type=int, default=defaults["batch_size"], help="images per step"
    )
    parser.add_argument("--lr", type=float, default=defaults["lr"], help="peak AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything random")
    parser.add_argument("--out", default=str(spec.weights), help="safetensors file to write")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--classifier", action="store_true", help="also retrain the metrics classifier"
    )
    parser.add_argument("--no-check", action="store_true", help="skip the sample quality check")
    return parser.parse_args(argv)


def _check(model: torch.nn.Module, benchmark: str) -> None:
    """Sample 20 images per class and print their accuracy and Frechet distance."""
    from dynconvert.demo import metrics
    from dynconvert.sampling import sample

    settings = demo_spec(benchmark).sampling
    labels = torch.arange(10).repeat_interleave(20)
    start = time.perf_counter()
    images = sample(model, labels=labels, seed=0, **settings)
    acc = metrics.classifier_accuracy(images, labels, benchmark)
    real, _ = metrics.real_digits(benchmark)
    fd = metrics.frechet_distance(images, real, benchmark)
    floor = metrics.frechet_distance(
        real[torch.randperm(len(real))[: len(labels)]], real, benchmark
    )
    print(
        f"{len(labels)} DDIM-{settings['steps']} samples (cfg {settings['cfg_scale']}): classifier "
        f"accuracy {acc:.3f}, Frechet distance to the real images {fd:.2f} (a real subset of the "
        f"same size: {floor:.2f}) ({time.perf_counter() - start:.0f}s)",
        flush=True,
    )


def main(argv: list[str] | None = None, benchmark: str = "digits", doc: str = __doc__) -> int:
    args = _parse(argv, benchmark, doc)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.classifier:
        from dynconvert.demo import metrics

        print(f"training the {benchmark} classifier ...", flush=True)
        start = time.perf_counter()
        clf = metrics.train_classifier(
            benchmark=benchmark,
            on_epoch=lambda e, acc: print(
                f"  epoch {e:2d}  held-out accuracy {acc:.4f}  {time.perf_counter() - start:5.0f}s",
                flush=True,
            ),
        )
        print(f"wrote {metrics.save_classifier(clf, benchmark=benchmark)}", flush=True)

    info = demo_model_info(benchmark)
    print(
        f"{benchmark} DiT: {info['parameters']:,} parameters, config {info['config']}", flush=True
    )
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
        benchmark,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        on_step=report,
    )
    path = save_demo_weights(result.model, benchmark, args.out)
    print(
        f"trained {result.steps} steps in {result.seconds:.0f}s; final loss "
        f"{result.final_loss:.4f} (mse {result.final_mse:.4f}, mean of the last 100 steps)",
        flush=True,
    )
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)", flush=True)
    if not args.no_check:
        _check(result.model, benchmark)
    return 0


if __name__ == "__main__":
    sys.exit(main())
