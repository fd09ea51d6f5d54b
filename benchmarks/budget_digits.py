"""One budget-conditioned model against one model per budget, on the digits demo (issue 26).

Every model starts from the shipped digits DiT and calibrates with the digits recipe (its
optimiser, batch, schedule, router settings; ``report.sampling_budget``'s threshold shift is
not applied to any of them):

- ``range``: converted with the budget range ``--range`` (default 0.3:1.0), calibrated for
  ``--range-steps`` steps (default: the single models' steps times their number, so that it
  gets the same total calibration steps as all of them together), each step at a budget drawn
  from the range; evaluated at each of ``--budgets`` with ``with dynconvert.budget(...)``.
- ``single``: one model per budget in ``--budgets`` below 1.0, each converted for that budget
  alone and calibrated for ``--steps`` steps (the recipe's 400 by default).

Each is scored as ``dynconvert.demo.evaluate_digits`` scores the demo: ``--per-class`` samples
of each class from the same noise (DDIM, 25 steps, guidance 1.5), classifier accuracy and the
Frechet distance (FD) of the classifier's features to all 1797 real digits, and the realised
FLOPs ratio (the mean whole-model ratio over the sampler's calls). Rows go to ``--out`` as they
finish (rows already there are skipped: an interrupted study resumes); ``--plot`` writes the
FD-vs-FLOPs picture.

Run (the committed results, docs/budgets.md; the two kinds side by side, each under
``nice -n 5``, then merged; the same arguments on the merge keep the rows it has)::

    python benchmarks/budget_digits.py --only range --steps 200 --range-steps 200 \
        --per-class 10 --out benchmarks/results/budget_digits.json
    for b in 0.3 0.5 0.7; do python benchmarks/budget_digits.py --only single --budgets $b \
        --steps 200 --per-class 10 --out /tmp/single_$b.json; done
    python benchmarks/budget_digits.py --only range --steps 200 --range-steps 200 \
        --per-class 10 --out benchmarks/results/budget_digits.json \
        --merge /tmp/single_0.3.json /tmp/single_0.5.json /tmp/single_0.7.json \
        --plot benchmarks/results/budget_digits.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import dynconvert
from dynconvert.demo.evaluate import evaluate_digits
from dynconvert.models import build_model
from dynconvert.recipes import load_recipe


def _calibrated(budget: Any, steps: int, seed: int) -> tuple[torch.nn.Module, float]:
    """The digits DiT converted for ``budget`` (a number or a range) and calibrated."""
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
    dynconvert.calibrate(model, "digits", cfg)
    return model.eval(), time.process_time() - t0


def _score(model: torch.nn.Module, per_class: int, seed: int) -> dict[str, Any]:
    """Accuracy, FD and realised FLOPs ratio of ``model`` at the budget in effect."""
    r = evaluate_digits(None, model, per_class=per_class, steps=25, seed=seed)
    return {
        "accuracy": r["classifier_accuracy"]["dynamic"],
        "fd": r["frechet_distance"]["dynamic"],
        "fd_original_weights_full": r["frechet_distance"]["original"],
        "flops_ratio": r["flops_ratio"]["dynamic"],
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Calibrate and score every model the arguments name; the rows (also written to --out)."""
    out = Path(args.out)
    rows: list[dict[str, Any]] = json.loads(out.read_text())["rows"] if out.exists() else []
    done = {(r["model"], r["budget"]) for r in rows}
    budgets = [float(b) for b in args.budgets.split(",")]
    lo, hi = (float(v) for v in args.range.split(":"))
    singles = [b for b in budgets if b < 1.0]
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
    if args.only != "single" and any(("range", b) not in done for b in budgets):
        model, cpu = _calibrated((lo, hi), range_steps, args.seed)
        for b in budgets:
            if ("range", b) in done:
                continue
            with dynconvert.budget(model, b):
                row = _score(model, args.per_class, args.seed)
            save({"model": "range", "budget": b, "steps": range_steps, "cpu_s": cpu, **row})
    for b in singles:
        if ("single", b) in done or args.only == "range":
            continue
        model, cpu = _calibrated(b, args.steps, args.seed)
        row = _score(model, args.per_class, args.seed)
        save({"model": "single", "budget": b, "steps": args.steps, "cpu_s": cpu, **row})
    return rows


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """FD against the realised FLOPs ratio, one line per kind of model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for kind, style in (("range", "o-"), ("single", "s--")):
        pts = sorted((r["flops_ratio"], r["fd"], r["budget"]) for r in rows if r["model"] == kind)
        if pts:
            label = "one model, range 0.3-1.0" if kind == "range" else "one model per budget"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
            for x, y, b in pts:
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
