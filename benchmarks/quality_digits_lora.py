"""The digits demo calibrated with ``trainable=lora`` next to full calibration (issue 21).

For each seed, runs ``dynconvert convert --model digits --target-flops 0.5`` twice, with
``--set calibration.trainable=lora`` and with the default ``all``, the recipe's sizes otherwise
(400 steps of batch 64; the recipe's ``lora_rank`` and ``lora_alpha``, and the LoRA path's
32-wide router embedding), and collects each run's report: FLOPs ratio, trainable and total
parameters, classifier accuracy and Frechet distance (200 samples, 25 DDIM steps, the recipe's
evaluation seed). Writes one JSON file with a row per run and the
mean per calibration (rows ``lora`` and ``all``):

    python benchmarks/quality_digits_lora.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "quality_digits_lora.json"
FIELDS = ("flops_ratio", "flops_ratio_sampling", "classifier_accuracy", "frechet_distance")


def one_run(trainable: str, seed: int, root: Path, steps: int | None) -> dict:
    """One demo run in a subprocess (or a finished one already in ``root``); its figures."""
    out = root / f"{trainable}-{seed}"
    if (out / "report.json").is_file():
        return figures(trainable, seed, out, None)
    cmd = [sys.executable, "-m", "dynconvert", "convert", "--model", "digits",
           "--target-flops", "0.5", "--out", str(out), "--set", f"calibration.seed={seed}",
           "--set", f"calibration.trainable={trainable}",
           "--set", "report.bench=false"]  # fmt: skip
    if steps is not None:
        cmd += ["--steps", str(steps)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=dict(os.environ))
    return figures(trainable, seed, out, round(time.perf_counter() - t0, 1))


def figures(trainable: str, seed: int, out: Path, seconds: float | None) -> dict:
    """The figures of one run folder's report.json."""
    report = json.loads((out / "report.json").read_text())
    cal = report["calibration"]
    return {
        "trainable": trainable, "seed": seed, "steps": report["steps"],
        "flops_ratio": report["flops_ratio"],
        "flops_ratio_sampling": report["flops_ratio_sampling"],
        "trainable_params": cal["trainable_params"], "total_params": cal["total_params"],
        "trainable_share": cal["trainable_params"] / cal["total_params"],
        "classifier_accuracy": report["classifier_accuracy"]["dynamic"],
        "frechet_distance": report["frechet_distance"]["dynamic"],
        "original": {k: report[k]["original"] for k in ("classifier_accuracy", "frechet_distance")},
        "seconds": seconds,
    }  # fmt: skip


def summary(rows: list[dict], trainable: str) -> dict:
    """Mean (and spread over seeds) of one calibration's rows."""
    mine = [r for r in rows if r["trainable"] == trainable]
    out = {"runs": len(mine), "seeds": [r["seed"] for r in mine]}
    for k in (*FIELDS, "trainable_share"):
        values = [r[k] for r in mine if r[k] is not None]
        out[k] = statistics.mean(values) if values else None
        out[k + "_min_max"] = [min(values), max(values)] if values else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--runs", type=Path, default=None, help="keep the run folders here")
    parser.add_argument("--note", default=None, help="a line on the machine and the settings")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.runs or Path(tmp)
        for seed in args.seeds:
            for trainable in ("lora", "all"):  # alternating: the machine's load hits both alike
                rows.append(one_run(trainable, seed, root, args.steps))
                print(json.dumps(rows[-1]), flush=True)
    result = {
        "note": args.note,
        "command": "python benchmarks/quality_digits_lora.py --seeds "
        + " ".join(map(str, args.seeds)),
        "target_flops": 0.5,
        "lora": summary(rows, "lora"),
        "all": summary(rows, "all"),
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
