"""Quality at equal FLOPs on a demo benchmark: dynconvert against the alternatives.

``--benchmark digits`` (default) or ``translated`` (the digits on an empty 32x32 canvas). Every
method starts from the benchmark's shipped DiT, trains (where it trains) on the same data with
the digits recipe's optimiser, batch, schedule and number of steps, and is evaluated the same
way: ``--samples`` class-balanced samples from the same initial noise (DDIM, guidance 1.5), scored
by the digits classifier (accuracy) and the Frechet distance of its features to all 1797 real
digits (``dynconvert.demo.metrics``). Methods:

- ``original``: the shipped model, full sampling steps.
- ``fine-tuned``: the original trained for the same steps on the same data, no routing (the
  control: calibration trains the weights too).
- ``fewer-steps``: the original with ``round(target * steps)`` sampling steps.
- ``dynamic``: dynconvert, width + tokens (the digits recipe); ``width-only``; ``tokens-only``.
  After calibration their router thresholds are shifted on held-out samples of the evaluation's
  sampler so that it spends the target (``dynconvert.sampling.budget``; ``--no-match-budget``
  turns it off, as the studies before it ran).
- ``static-pruning``: the same heads and MLP channel groups removed at every timestep, ranked by
  the importance score convert uses (``dynconvert.analysis.importance.magnitude``), the same
  fraction in every site, then fine-tuned for the same steps.
- ``cache``: training-free, first-block-cache style: on a "cached" sampling step only the first
  block runs, and the residual of the other blocks from the last full step is reused; the cached
  steps are spread evenly so the mean cost matches the target.

Rows go to ``--out`` (one per evaluated model, written as each finishes; rows already there are
skipped, so an interrupted study resumes). Plots are written next to it.

Run (the committed results): see docs/quality.md.
Smoke (under a minute; in the default tests):
``python benchmarks/quality_digits.py --smoke --out /tmp/q.json``
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its modules, beside it

from quality_cache import (  # noqa: E402, F401
    cache_schedule,
    cached_call_ratio,
    cached_step_cost,
    first_block_cache,
)
from quality_methods import (  # noqa: E402, F401
    EVAL_SEED,
    METHODS,
    ROUTED,
    ROW_KEYS,
    TRAINED,
    build_trained,
    static_keep,
)
from quality_output import load_rows, merge, plot, summary, table, write_json  # noqa: E402, F401
from quality_rows import evaluate, infeasible_row, row_job, run_row  # noqa: E402, F401

from dynconvert.demo.models import demo_spec  # noqa: E402


# -- settings ------------------------------------------------------------------------------
def study_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The sizes of the study (what docs/quality.md states), from the command line."""
    common = dict(benchmark=getattr(args, "benchmark", "digits"),
                  match_budget=getattr(args, "match_budget", True))  # fmt: skip
    if args.smoke:
        return dict(targets=[0.5], seeds={0.5: [0]}, calibration_steps=6, batch_size=16,
                    samples=50, sample_steps=5, profile_points=5, **common)  # fmt: skip
    seeds = {t: list(args.seeds) if args.seeds else [0] for t in args.targets}
    if 0.5 in seeds and not args.seeds:
        seeds[0.5] = list(range(args.seeds_at_half))
    return dict(targets=list(args.targets), seeds=seeds, calibration_steps=args.calibration_steps,
                batch_size=args.batch_size, samples=args.samples, sample_steps=args.sample_steps,
                profile_points=20, **common)  # fmt: skip


def plan_rows(settings: dict[str, Any], methods: list[str]) -> list[tuple[str, float, int]]:
    """(method, target, seed) of every row, in the order they run: every seed at 0.5 first
    (seed 0, then 1, ...), then the other targets; so an interrupted study has the most
    informative rows. ``original`` and ``fine-tuned`` are evaluated at target 1.0 (fine-tuned
    once per seed at 0.5); the training-free methods are deterministic and run for seed 0 only."""
    seeds = settings["seeds"]
    groups = [(0.5, s) for s in seeds.get(0.5, [])]
    groups += [(t, s) for t in sorted(settings["targets"]) if t != 0.5 for s in seeds.get(t, [0])]
    rows: list[tuple[str, float, int]] = []
    for target, seed in groups:
        for m in methods:
            if m == "original":
                row = ("original", 1.0, 0)
            elif m == "fine-tuned":
                row = ("fine-tuned", 1.0, seed)
            elif m in ("fewer-steps", "cache") and seed != 0:
                continue
            else:
                row = (m, target, seed)
            if row not in rows:
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the study (or the rows of it not yet in ``--out``); returns the study file's dict."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--benchmark", default="digits", choices=["digits", "translated"])
    parser.add_argument(
        "--out", default=None, help="default: benchmarks/results/quality_<benchmark>.json"
    )
    parser.add_argument(
        "--no-match-budget", dest="match_budget", action="store_false",
        help="keep the calibrated thresholds (the sampler may spend more or less than the target)",
    )  # fmt: skip
    parser.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--seeds-at-half", type=int, default=3)
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="the seeds of every target (default: 0, and --seeds-at-half at 0.5)",
    )
    parser.add_argument("--calibration-steps", type=int, default=400, help="the recipe's 400")
    parser.add_argument("--batch-size", type=int, default=64, help="the recipe's 64")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--sample-steps", type=int, default=25, help="DDIM steps (the recipe's 25)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per row")
    parser.add_argument(
        "--jobs", type=int, default=1,
        help="rows run at once, each in its own process (2 on a 2-core machine)",
    )  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: under a minute")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument(
        "--merge", nargs="+", metavar="JSON",
        help="run nothing: merge the rows of these study files (parts run in parallel) into --out",
    )  # fmt: skip
    args = parser.parse_args(argv)
    out = Path(args.out or f"benchmarks/results/quality_{args.benchmark}.json")
    if args.merge:
        return merge(args.merge, out, plots=not args.no_plots, quiet=args.quiet)
    torch.set_num_threads(args.threads)
    settings = study_settings(args)
    data = load_rows(out)
    data["settings"] = {**{k: v for k, v in settings.items() if k != "seeds"},
                        "seeds": {str(k): v for k, v in settings["seeds"].items()},
                        "evaluation_seed": EVAL_SEED, "sampler": "ddim",
                        "cfg_scale": demo_spec(args.benchmark).sampling["cfg_scale"]}  # fmt: skip
    data["command"] = "python benchmarks/quality_digits.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    done = {(r["method"], r["target_flops"], r["seed"]) for r in data["rows"]}
    todo = [key for key in plan_rows(settings, args.methods) if key not in done]
    t_start = time.perf_counter()

    def record(row: dict[str, Any]) -> None:  # written as each row finishes: a stop loses one
        data["rows"].append(row)
        data["elapsed_seconds"] = round(data.get("elapsed_seconds", 0) + row["seconds"], 1)
        write_json(out, data)
        if not args.quiet:
            print(f"[{time.perf_counter() - t_start:7.0f} s] {row['method']:15s} target "
                  f"{row['target_flops']:g} seed {row['seed']}: ratio {row['flops_ratio']} "
                  f"acc {row['accuracy']} FD {row['frechet_distance']} ({row['seconds']} s)",
                  flush=True)  # fmt: skip

    if args.jobs > 1 and len(todo) > 1:
        # Rows are independent (each seeds its own training and uses the fixed evaluation
        # noise), so they give the same numbers in parallel; spawn: no forked torch threads.
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            futures = [pool.submit(row_job, *key, settings, args.threads) for key in todo]
            for fut in concurrent.futures.as_completed(futures):
                record(fut.result())
    else:
        shared: dict[str, Any] = {}
        for key in todo:
            record(row_job(*key, settings, args.threads, shared))
    data["summary"] = summary(data["rows"])
    write_json(out, data)
    if not args.no_plots:
        with contextlib.suppress(ImportError):
            plot(data, out.parent, out.stem)
    if not args.quiet:
        print(table(data["rows"]))
    return data


if __name__ == "__main__":
    main()
