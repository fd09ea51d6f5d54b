"""The quality study's files: rows on disk, the seed summary, the Markdown table and plots.

Part of ``benchmarks/quality_digits.py``: rows are written atomically as each finishes (so an
interrupted study resumes), summarised over seeds, merged from parts run in parallel, and drawn
(FD against the measured FLOPs ratio; the dynamic model's per-timestep profile).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
from pathlib import Path
from typing import Any

from quality_methods import METHODS


def load_rows(path: Path) -> dict[str, Any]:
    """The study file (rows and metadata), or an empty one."""
    if path.exists():
        return json.loads(path.read_text())
    return {"rows": []}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically (a resumed study never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread (min..max and sample std) over seeds of each (method, target)."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("frechet_distance") is not None:
            groups.setdefault((r["method"], r["target_flops"]), []).append(r)
    out = []
    for (m, t), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], METHODS.index(kv[0][0]))):
        fd = [r["frechet_distance"] for r in rs]
        acc = [r["accuracy"] for r in rs]
        out.append({
            "method": m, "target_flops": t, "seeds": len(rs),
            "flops_ratio": round(statistics.mean(r["flops_ratio"] for r in rs), 4),
            "fd_mean": round(statistics.mean(fd), 3), "fd_min": min(fd), "fd_max": max(fd),
            "fd_std": round(statistics.stdev(fd), 3) if len(fd) > 1 else None,
            "acc_mean": round(statistics.mean(acc), 4), "acc_min": min(acc), "acc_max": max(acc),
        })  # fmt: skip
    return out


def table(rows: list[dict[str, Any]]) -> str:
    """The summary as a Markdown table."""
    lines = ["| method | target | FLOPs ratio | seeds | FD (mean, min..max) "
             "| accuracy (mean, min..max) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for s in summary(rows):
        spread = f" ({s['fd_min']:.2f}..{s['fd_max']:.2f})" if s["seeds"] > 1 else ""
        aspread = f" ({s['acc_min']:.3f}..{s['acc_max']:.3f})" if s["seeds"] > 1 else ""
        lines.append(f"| {s['method']} | {s['target_flops']:g} | {s['flops_ratio']:.3f} "
                     f"| {s['seeds']} | {s['fd_mean']:.2f}{spread} "
                     f"| {s['acc_mean']:.3f}{aspread} |")  # fmt: skip
    return "\n".join(lines)


def plot(data: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """FD against FLOPs ratio for every method, and the dynamic model's per-timestep width and
    token keep rate; PNGs next to the JSON. Needs matplotlib (``pip install dynconvert[study]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in METHODS:
        pts = [s for s in summary(rows) if s["method"] == m]
        if not pts:
            continue
        pts.sort(key=lambda s: s["flops_ratio"])
        x = [s["flops_ratio"] for s in pts]
        y = [s["fd_mean"] for s in pts]
        lo = [max(0.0, s["fd_mean"] - s["fd_min"]) for s in pts]
        hi = [max(0.0, s["fd_max"] - s["fd_mean"]) for s in pts]
        ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=m,
                    linestyle="-" if len(x) > 1 else "none")  # fmt: skip
    ax.set_xlabel("FLOPs ratio (MACs of the sampler's calls / original's)")
    ax.set_ylabel("Frechet distance to real digits (lower is better)")
    ax.set_yscale("log")
    bench = (data.get("settings") or {}).get("benchmark", "digits")
    ax.set_title(f"{bench}: quality against compute (bars: min..max over seeds)")
    written.append(_save(fig, ax, out_dir / f"{stem}_fd.png"))
    prof_rows = [r for r in rows if r["method"] == "dynamic" and r.get("profile")]
    if prof_rows:
        r = min(prof_rows, key=lambda r: (abs(r["target_flops"] - 0.5), r["seed"]))
        p = r["profile"]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(p["timesteps"], p["width"], marker=".", label="width (fraction of heads/groups on)")
        ax.plot(p["timesteps"], p["token_keep"], marker=".", label="token keep rate")
        ax.plot(p["timesteps"], p["flops_ratio_per_t"], linestyle="--", label="FLOPs ratio")
        ax.set_xlabel("timestep t (0 = clean, 999 = pure noise)")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"dynamic (width + tokens), target {r['target_flops']:g}, seed {r['seed']}")
        written.append(_save(fig, ax, out_dir / f"{stem}_profile.png"))
    return written


def _save(fig: Any, ax: Any, path: Path) -> Path:
    """Legend, layout, write and close one figure (every plot of the study ends the same way)."""
    import matplotlib.pyplot as plt

    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def merge(parts: list[str], out: Path, plots: bool = True, quiet: bool = False) -> dict[str, Any]:
    """Combine study files run in parallel (disjoint rows) into ``out``, with summary and plots."""
    data: dict[str, Any] = {"rows": [], "parts": []}
    seen = set()
    for part in parts:
        d = load_rows(Path(part))
        data.setdefault("settings", d.get("settings"))
        data["parts"].append(
            {"command": d.get("command"), "elapsed_seconds": d.get("elapsed_seconds")}
        )
        for r in d["rows"]:
            key = (r["method"], r["target_flops"], r["seed"])
            if key not in seen:
                seen.add(key)
                data["rows"].append(r)
    data["summary"] = summary(data["rows"])
    write_json(out, data)
    if plots:
        with contextlib.suppress(ImportError):
            plot(data, out.parent, out.stem)
    if not quiet:
        print(table(data["rows"]))
    return data
