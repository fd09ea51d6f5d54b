"""The real-size support table: every shipped published configuration converted on meta.

Run: python benchmarks/support_matrix.py --real-size [--only NAME ...] [--out DIR] [--note TEXT]

One fresh process per family (``dynconvert.measure.realsize.real_size_row``), one after the
other so that seconds and peak memory are each family's own: the configuration is built on the
meta device, converted at its pipeline's usual resolution with head-locality decided on its
probe. Writes ``support_matrix_real_size.json`` and ``.md`` (``_partial`` with ``--only``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from dynconvert.measure.realsize import real_size_row
from dynconvert.testing.configs import REAL_CONFIGS

FULL = "python benchmarks/support_matrix.py --real-size"  # the whole table's command
ROUTABLE, MINIMUM = 0.9, 0.4  # issue 20's bar: routable share and reachable minimum


def _row(name: str) -> dict:
    torch.set_num_threads(2)
    load = os.getloadavg()[0]  # a shared machine's wall times say little: each row says so
    return {**real_size_row(name), "load": round(load, 1)}


def _reason(r: dict) -> str:
    """One line: why a family misses the bar (its error, else its first skipped site)."""
    if r["error"]:
        return r["error"]
    if r["routable"] >= ROUTABLE and r["min_ratio"] <= MINIMUM:
        return ""
    return r["first_skip"] or "the routable sites hold too few of the MACs"


def _num(x: float, unit: float, spec: str) -> str:
    return "-" if x is None else format(x / unit, spec)


def _calib(r: dict) -> str:
    gb = r.get("calibration_gb")
    return f"{gb['all']:.0f} / {gb['routers']:.0f}" if gb else "-"


def markdown(rows: list[dict], command: str, seconds: float, note: str) -> str:
    """The table as markdown, with the command and the machine."""
    lines = [
        "# Support matrix at real size",
        "",
        f"Command: `{command}`  ",
        f"torch {torch.__version__}, {platform.machine()}, {seconds:.0f} s in all.",
        *([note, ""] if note else [""]),
        "Each published configuration built on the meta device (no weights) and converted at "
        "its pipeline's usual resolution; head-locality decided on a probe of a few tokens. "
        "params in billions; tokens = the most queries of one attention (all its streams); s = "
        "build + analyse + convert seconds (wall clock); cpu = their CPU seconds (user + "
        "system, 2 threads): on an idle machine the wall time lies between cpu / 2 and cpu; "
        "load = the machine's 1-minute load average when the row started (2 cores); GB "
        "= peak resident memory of the process (imports included); sites = attention/MLP sites "
        "found in that many blocks; routable = converted sites' share of the MACs; min = lowest"
        " reachable budget (whole model); MACs per sample; calib GB = what a calibration run "
        "holds besides activations with bf16 weights, training every parameter / the routers "
        "only (dynconvert/calibration/memory.py).",
        "",
        "| family | class | pixels (h x w x frames) | params | tokens | s | cpu | load | GB "
        "| sites | skipped "
        "| TMACs | routable | min | calib GB | why not (one line) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        h, w, f = r["pixels"]
        sites = f"{r.get('attention_sites', '-')}/{r.get('mlp_sites', '-')} in {r.get('blocks')}"
        why = _reason(r).replace("|", "\\|")[:160]
        lines.append(
            f"| {r['name']} | {r['class_name']} | {h} x {w} x {f} "
            f"| {_num(r.get('params'), 1e9, '.2f')} | {r.get('tokens', '-')} | {r['seconds']} "
            f"| {r.get('cpu_s', '-')} | {r.get('load', '-')} "
            f"| {r['peak_rss_gb']} | {sites} | {r.get('skipped', '-')} "
            f"| {_num(r.get('static_macs'), 1e12, '.1f')} "
            f"| {_num(r.get('routable'), 0.01, '.1f')}% "
            f"| {_num(r.get('min_ratio'), 1, '.3f')} | {_calib(r)} | {why} |"
        )
    return "\n".join(lines) + "\n"


def main(only: list[str] | None, out: Path, note: str, update: bool = False) -> None:
    """Run the table (one process per family, one at a time), writing its files after each.

    ``update``: the rows of ``only`` replace theirs in the full table (one family at a time
    under a shared lock, the others' rows kept); else ``only`` writes a ``_partial`` table.
    """
    names = only or list(REAL_CONFIGS)
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")  # a fresh process: its own peak memory
    command = "python benchmarks/support_matrix.py " + shlex.join(sys.argv[1:])
    stem = "support_matrix_real_size" + ("_partial" if only and not update else "")
    table = out / f"{stem}.json"
    old = json.loads(table.read_text()) if update and table.exists() else {}
    kept = {r["name"]: r for r in old.get("rows", [])}
    rows = []
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            row = pool.submit(_row, name).result()
        kept[row["name"]] = row
        rows = [kept[n] for n in REAL_CONFIGS if n in kept] if update else [*rows, row]
        print(
            f"{row['name']:18s} {row['seconds']:7.1f} s {row['peak_rss_gb']:5.2f} GB "
            f"{row.get('routable', 0):.3f} {row.get('min_ratio', 0) or 0:.3f} {_reason(row)}"[:200],
            flush=True,
        )
        seconds = time.perf_counter() - t0  # written after every family: a long run keeps rows
        if update:  # the table's own command and note; the rows say how each was measured
            command, note = old.get("command", FULL), old.get("note", note)
            seconds += old.get("seconds", 0.0)
        data = {"command": command, "note": note, "seconds": round(seconds, 1), "rows": rows}
        (out / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
        (out / f"{stem}.md").write_text(markdown(rows, command, seconds, note))
    print(f"wrote {out / stem}.{{json,md}}")
