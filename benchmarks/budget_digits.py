"""One budget-conditioned model against one model per budget, on the digits demo (issue 26).

Every model starts from the shipped digits DiT and calibrates with the digits recipe (its
optimiser, batch, schedule, router settings):

- ``range``: converted with the budget range ``--range`` (default 0.3:1.0), calibrated for
  ``--range-steps`` steps (default: the single models' steps times their number, so that it
  gets the same total calibration steps as all of them together), each step at a budget drawn
  from the range; evaluated at each of ``--budgets`` and ``--between`` with
  ``with dynconvert.budget(...)``.
- ``single``: one model per budget in ``--budgets`` below 1.0, each converted for that budget
  alone and calibrated for ``--steps`` steps (the recipe's 400 by default).

Each is scored as ``dynconvert.demo.evaluate_digits`` scores the demo: ``--per-class`` samples
of each class from the same noise (DDIM, 25 steps, guidance 1.5), classifier accuracy and the
Frechet distance (FD) of the classifier's features to all 1797 real digits, and the realised
FLOPs ratio (the mean whole-model ratio over the sampler's calls): first as calibrated
(``*_raw``), then after the recipe's sampler fit (``report.sampling_budget`` held-out samples on
other noise, as ``dynconvert convert`` runs it: ``match_sampling_budget`` for a single budget,
``match_budget_grid`` for the range). The training ratio is the batch mean over the last 50
steps (a range model: the mean of |ratio - that step's target| there). Rows go to ``--out`` as
they finish (rows already there are skipped: an interrupted study resumes); ``--plot`` writes
the FD-vs-FLOPs picture.

Run (the committed results, docs/budgets.md; one process, under ``nice -n 5``)::

    python benchmarks/budget_digits.py --steps 200 --per-class 10 \
        --out benchmarks/results/budget_digits.json --plot benchmarks/results/budget_digits.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import dynconvert
from dynconvert.calibration.schedule import range_lambda
from dynconvert.demo.evaluate import evaluate_digits
from dynconvert.models import build_model
from dynconvert.recipes import load_recipe
from dynconvert.runs.samples import match_run_budget


def _calibrated(budget: Any, steps: int, seed: int) -> tuple[torch.nn.Module, float, float]:
    """The digits DiT converted for ``budget`` (a number or a range) and calibrated; its CPU
    seconds and its training ratio (see the module docstring)."""
    recipe = load_recipe("digits")
    low = budget[0] if isinstance(budget, tuple) else budget
    cfg = recipe.calibration_config(low)
    cfg = dynconvert.CalibrationConfig(
        **{**cfg.__dict__, "steps": steps, "seed": seed, "output_dir": None, "resume": False}
    )
    model = dynconvert.convert(
        build_model("digits"), budget, config=recipe.convert_config(), seed=seed
    )
    t0 = time.process_time()
    result = dynconvert.calibrate(model, "digits", cfg)
    last = range(steps - 50, steps)
    if isinstance(budget, tuple):
        hold, warm = cfg.lambda_hold_steps, cfg.warmup_steps
        lams = [range_lambda(i, seed, budget, hold, warm)[0] for i in last]
        train = sum(abs(result.flops_ratios[i] - lam) for i, lam in zip(last, lams)) / 50
    else:
        train = sum(result.flops_ratios[i] for i in last) / 50
    return model.eval(), time.process_time() - t0, train


def _score(model: torch.nn.Module, per_class: int, seed: int, tag: str = "") -> dict[str, Any]:
    """Accuracy, FD and realised FLOPs ratio of ``model`` at the budget in effect."""
    r = evaluate_digits(None, model, per_class=per_class, steps=25, seed=seed)
    return {
        f"accuracy{tag}": r["classifier_accuracy"]["dynamic"],
        f"fd{tag}": r["frechet_distance"]["dynamic"],
        f"flops_ratio{tag}": r["flops_ratio"]["dynamic"],
    }


def _fit(model: torch.nn.Module, target: float) -> dict[str, Any]:
    """The recipe's sampler fit (``dynconvert convert``'s), on held-out noise."""
    recipe = load_recipe("digits")
    return match_run_budget(model, recipe.samples, recipe.report, target)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Calibrate and score every model the arguments name; the rows (also written to --out)."""
    out = Path(args.out)
    rows: list[dict[str, Any]] = json.loads(out.read_text())["rows"] if out.exists() else []
    done = {(r["model"], r["budget"]) for r in rows}
    budgets = [float(b) for b in args.budgets.split(",")]
    between = [float(b) for b in args.between.split(",") if b]
    lo, hi = (float(v) for v in args.range.split(":"))
    singles = sorted((b for b in budgets if b < 1.0), key=lambda b: abs(b - 0.5))  # 0.5 first
    range_steps = args.range_steps or args.steps * len(singles)

    def save(row: dict[str, Any]) -> None:
        rows.append(row)
        meta = {
            "command": "python benchmarks/budget_digits.py " + " ".join(args.argv),
            "steps": args.steps, "range_steps": range_steps, "range": [lo, hi],
            "per_class": args.per_class, "seed": args.seed, "torch": torch.__version__,
        }  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")

    torch.set_num_threads(1)
    scored = budgets + [b for b in between if b not in budgets]
    if args.only != "single" and any(("range", b) not in done for b in scored):
        model, cpu, train = _calibrated((lo, hi), range_steps, args.seed)
        if args.save:  # for later looks (dynconvert.load)
            dynconvert.save(model, args.save)
        raw = {}
        for b in scored:
            with dynconvert.budget(model, b):
                raw[b] = _score(model, args.per_class, args.seed, "_raw")
        t0 = time.process_time()
        fit = _fit(model, lo)
        fit_s = time.process_time() - t0
        for b in scored:
            with dynconvert.budget(model, b):
                row = _score(model, args.per_class, args.seed)
            save({"model": "range", "budget": b, "steps": range_steps, "cpu_s": cpu,
                  "train_tracking_error": train, "fit_cpu_s": fit_s, **raw[b], **row,
                  "fit": next((m for m in fit["budgets"] if m["budget"] == b), None)})  # fmt: skip
    for b in singles:
        if ("single", b) in done or args.only == "range":
            continue
        model, cpu, train = _calibrated(b, args.steps, args.seed)
        raw = _score(model, args.per_class, args.seed, "_raw")
        fit = _fit(model, b)
        row = _score(model, args.per_class, args.seed)
        save({"model": "single", "budget": b, "steps": args.steps, "cpu_s": cpu,
              "train_flops_ratio": train, **raw, **row, "fit": fit})  # fmt: skip
    return rows


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """FD against the realised FLOPs ratio, one line per kind of model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 4))
    lines = (("range", "", "o-", "one model, range 0.3-1.0, fitted"),
             ("range", "_raw", "o:", "the same, as calibrated"),
             ("single", "", "s--", "one model per budget, fitted"))  # fmt: skip
    for kind, tag, style, label in lines:
        pts = sorted((r["flops_ratio" + tag], r["fd" + tag], r["budget"])
                     for r in rows if r["model"] == kind and "fd" + tag in r)  # fmt: skip
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
            for x, y, b in pts if not tag else ():
                ax.annotate(f"{b:g}", (x, y), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("realised FLOPs ratio (sampling)")
    ax.set_ylabel("Frechet distance to real digits")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, run the study, write the plot."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--plot")
    p.add_argument("--budgets", default="0.3,0.5,0.7,1.0")
    p.add_argument("--between", default="0.45,0.85", help="range model only: more budgets")
    p.add_argument("--save", help="also save the calibrated range model (before its fit) here")
    p.add_argument("--range", default="0.3:1.0")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--range-steps", type=int, default=0)
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=("range", "single"), help="run one kind of model only")
    p.add_argument("--merge", nargs="*", default=[], help="add the rows of these result files")
    args = p.parse_args(argv)
    import sys

    args.argv = sys.argv[1:] if argv is None else argv
    rows = run(args)
    for extra in args.merge:  # another process's rows (the kinds can run side by side)
        data = json.loads(Path(extra).read_text())
        rows += [r for r in data["rows"] if (r["model"], r["budget"]) not in
                 {(q["model"], q["budget"]) for q in rows}]  # fmt: skip
        main_meta = json.loads(Path(args.out).read_text())["meta"]
        Path(args.out).write_text(json.dumps({"meta": main_meta, "rows": rows}, indent=1) + "\n")
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
