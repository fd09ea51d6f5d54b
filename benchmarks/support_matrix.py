"""The support matrix: convert every tiny model of the zoo and write what happened.

Run: python benchmarks/support_matrix.py [--only NAME ...] [--jobs N] [--out benchmarks/results]
(``--real-size``: the published configurations on meta instead, benchmarks/real_size.py)

For each entry of ``dynconvert.testing.zoo.ZOO`` (every image and video transformer class of the
installed diffusers, the built-in DiT and U-ViT, a timm DiT): sites found and skipped (with
reasons), static MACs, the lowest reachable budget, the executed FLOPs ratio under
``randomize_routing(keep=0.5)`` (FlopCounterMode, math attention), whether a fresh conversion
reproduces the original output and the fast path the masked path, and the analyze + convert time.
Writes ``support_matrix.json`` and ``support_matrix.md`` (``--only`` runs write
``support_matrix_partial.*`` so the committed full table is kept).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from dynconvert.measure.support import reason_groups, summary, support_row
from dynconvert.testing.zoo import ZOO, ZOO_EXCLUDED


def _fmt(x: object, spec: str = ".3f") -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "**NO**"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def _macs(x: int | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1e6:.2f}M" if x >= 1e5 else f"{x / 1e3:.1f}k"


def _first_problem(row: dict) -> str:
    if row["error"]:
        return row["error"].replace("|", "\\|")[:160]
    if row.get("flops_error"):
        return row["flops_error"].replace("|", "\\|")[:160]
    texts = [f"{s['name']}: {s['reason']}" for s in row["skipped"]] + row["site_notes"]
    return (
        (
            texts[0].replace("|", "\\|")[:160]
            + (f" (+{len(texts) - 1} more)" if len(texts) > 1 else "")
        )
        if texts
        else ""
    )


def markdown(rows: list[dict], command: str, seconds: float, note: str = "") -> str:
    """The table, the summary line, the reason groups and the excluded classes, as markdown."""
    s = summary(rows)
    lines = [
        "# Support matrix",
        "",
        f"Command: `{command}`  ",
        f"torch {torch.__version__}, diffusers {_version('diffusers')}, timm {_version('timm')}, "
        f"{platform.machine()}, {torch.get_num_threads()} threads, {seconds:.0f} s in all.",
        *([note, ""] if note else [""]),
        f"**{s['image_video_within']} of {s['image_video']} image/video models have an executed "
        "FLOPs ratio "
        f"<= {s['threshold']} under randomize_routing(keep=0.5)**; {s['converted']} of {s['rows']} "
        "converted, "
        f"{s['errors']} errors, {s['flops_errors']} where PyTorch's FLOP counter could not run, "
        f"{s['fresh_failures']} fresh-conversion mismatches, "
        f"{s['fast_masked_failures']} fast != masked.",
        "",
        "Columns: sites = attention/MLP sites found, skipped = candidate sites left out; MACs per "
        "sample of the "
        "original model (analytic); min = lowest reachable budget; exec = executed / original MACs "
        "under "
        "randomize_routing(keep=0.5) with the whole batch at one timestep, as pipelines call the "
        "model (both "
        "counted by FlopCounterMode, math attention); gap = executed / analytic - 1 there (should "
        "be 0); "
        "per-t exec and per-t gap = the same with 2 samples at 2 timesteps (a batched call "
        "computes the union "
        "of the samples' units, so it exceeds the per-sample analytic mean); static gap = analytic "
        "/ counted "
        "MACs of the original - 1; fresh = fresh conversion "
        "equals the original (rel. err <= 1e-5); fast = fast path equals masked path; a+c s = "
        "analyze + "
        "convert seconds.",
        "",
        "| name | class | family | status | sites | skipped | MACs | min | budget | exec | gap | "
        "per-t exec "
        "| per-t gap | static gap | fresh | fast | a+c s | first problem |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sites = "-" if r["attention"] is None else f"{r['attention']}/{r['mlp']}"
        lines.append(
            f"| {r['name']} | {r['class_name']} | {r['family']} | {r['status']} | {sites} | "
            f"{len(r['skipped'])} "
            f"| {_macs(r['static_macs'])} | {_fmt(r['min_ratio'])} | {_fmt(r['budget'], '.2f')} "
            f"| {_fmt(r['executed_ratio'])} | {_fmt(r['fixed_gap'], '+.3f')} | "
            f"{_fmt(r.get('executed_ratio_per_t'))} "
            f"| {_fmt(r['analytic_gap'], '+.3f')} "
            f"| {_fmt(r['static_gap'], '+.3f')} | {_fmt(r['fresh_ok'])} "
            f"| {_fmt(r['fast_masked_ok'])} | {_fmt(r['convert_s'], '.2f')} | {_first_problem(r)} |"
        )
    lines += [
        "",
        "## Reasons and errors, by how many models each affects",
        "",
        "| models | reason (names and numbers blanked) | which |",
        "|---|---|---|",
    ]
    for reason, n, names in reason_groups(rows):
        text = reason.replace("|", "\\|")
        lines.append(f"| {n} | {text} | {', '.join(names)} |")
    lines += ["", "## Classes without a zoo entry", ""]
    lines += [f"- {k}: {v}" for k, v in sorted(ZOO_EXCLUDED.items())] or ["- none"]
    return "\n".join(lines) + "\n"


def _version(pkg: str) -> str:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:  # noqa: BLE001
        return "?"


def _row(name: str) -> dict:
    torch.set_num_threads(1)
    return support_row(name)


def main() -> None:
    """Run the matrix and write the JSON and markdown files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="zoo entries to run (default: all)"
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="worker processes (1 thread each when > 1)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--note", default="", help="a line for the markdown header (e.g. the commit measured)"
    )
    parser.add_argument(
        "--real-size",
        action="store_true",
        help="the published configurations on meta at their usual resolution (real_size.py)",
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="with --real-size --only: replace those rows in the full real-size table",
    )
    args = parser.parse_args()
    if args.real_size:
        from real_size import main as real_size_main  # benchmarks/ is the script's folder

        real_size_main(args.only, args.out, args.note, args.update)
        return
    names = args.only or list(ZOO)
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        parser.error(f"unknown zoo entries: {', '.join(unknown)}; known: {', '.join(ZOO)}")
    t0 = time.perf_counter()
    rows = []
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            for row in pool.map(_row, names):
                rows.append(row)
                print(
                    f"{row['name']:24s} {row['status']:10s} {row['error'] or ''}"[:200], flush=True
                )
    else:
        for name in names:
            row = support_row(name)
            rows.append(row)
            print(f"{row['name']:24s} {row['status']:10s} {row['error'] or ''}"[:200], flush=True)
    seconds = time.perf_counter() - t0
    command = "python benchmarks/support_matrix.py " + shlex.join(sys.argv[1:])
    stem = "support_matrix" if not args.only else "support_matrix_partial"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(
        json.dumps(
            {
                "command": command.strip(),
                "note": args.note,
                "seconds": round(seconds, 1),
                "summary": summary(rows),
                "rows": rows,
                "excluded": ZOO_EXCLUDED,
            },
            indent=1,
            default=str,
        )
        + "\n"
    )
    (args.out / f"{stem}.md").write_text(markdown(rows, command.strip(), seconds, args.note))
    s = summary(rows)
    print(
        f"{s['image_video_within']}/{s['image_video']} image/video models with executed ratio <= "
        "0.75; "
        f"{s['converted']}/{s['rows']} converted; {s['errors']} errors; wrote "
        f"{args.out / stem}.{{json,md}}"
    )


if __name__ == "__main__":
    main()
