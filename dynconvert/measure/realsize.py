"""One row of the real-size support table: a published configuration converted on meta.

Each shipped configuration (:data:`dynconvert.testing.configs.REAL_CONFIGS`) is built on the
meta device (no memory for its weights) and converted at its usual resolution, with
head-locality decided on its probe (a few tokens, the same graph: analysis/reduced.py). The
row says what a user would learn before downloading the weights: parameters, tokens, sites,
the routable share of the MACs, the lowest reachable budget, and what the analysis cost here
(seconds, peak memory of the process). ``benchmarks/support_matrix.py --real-size`` runs one
row per process, so that each peak is its own.

Example:
    >>> row = real_size_row("dit-xl-2")  # doctest: +SKIP
    >>> row["routable"] > 0.9, row["min_ratio"] < 0.4  # doctest: +SKIP
    (True, True)
"""

from __future__ import annotations

import resource
import sys
import time
import traceback
from typing import Any

from dynconvert.calibration.memory import memory_plan
from dynconvert.config import ConvertConfig
from dynconvert.convert import convert
from dynconvert.flops import min_ratio
from dynconvert.plan import AttentionSite
from dynconvert.runtime.state import get_state
from dynconvert.testing.configs import Size, build, real_config


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far, in bytes (Linux reports KiB, macOS bytes).

    Example:
        >>> peak_rss_bytes() > 0
        True
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def cpu_seconds() -> float:
    """CPU time of this process so far (user + system), in seconds: on a shared machine, what
    the wall time would be with the cores to itself (at most, for one thread).

    Example:
        >>> cpu_seconds() > 0
        True
    """
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def real_size_row(name: str, size: Size | None = None, probe: bool = True) -> dict[str, Any]:
    """Build a shipped configuration on meta, convert it and describe it; never raises.

    Args:
        name: a shipped configuration or alias (``flux-dev``, ``wan2.1-t2v-14b``...).
        size: the size in latent cells (default: the family's usual one).
        probe: decide head-locality at the probe's size (False: at the real one, the slow path).

    Returns:
        A JSON-ready dict: ``name``, ``class_name``, ``pixels`` (height, width, frames),
        ``params``, ``tokens`` (the most queries of one attention, over all its streams),
        ``seconds`` (build, analyse and convert; ``cpu_s``: its CPU time, user and system),
        ``peak_rss_gb`` (the whole process, imports included), ``attention_sites``,
        ``mlp_sites``, ``blocks``, ``skipped`` (count) and ``first_skip`` (one reason),
        ``routable`` (converted sites' share of the MACs), ``min_ratio``, ``calibration_gb``
        (calibration/memory.py, bf16 weights, per ``trainable`` setting), ``coverage`` and
        ``error`` (one line, or None).
    """
    entry = real_config(name)
    size = size or entry.size
    row: dict[str, Any] = {"name": entry.name, "class_name": entry.class_name,
                           "pixels": entry.pixels(size), "error": None}  # fmt: skip
    t0, c0 = time.perf_counter(), cpu_seconds()
    try:
        model = build(entry.class_name, entry.config())
        row["params"] = sum(p.numel() for p in model.parameters())
        inputs = entry.inputs(model, size)
        small = entry.inputs(model, entry.probe) if probe else None
        convert(model, 1.0, example_inputs=inputs, probe_inputs=small)
        plan = get_state(model).plan
        row["seconds"] = round(time.perf_counter() - t0, 1)
        row["cpu_s"] = round(cpu_seconds() - c0, 1)
        attention = [s for s in plan.sites if isinstance(s, AttentionSite)]
        static = plan.static_macs_per_sample
        row.update(
            tokens=max((sum(st.tokens_q for st in s.every_stream()) for s in attention), default=0),
            attention_sites=len(attention),
            mlp_sites=len(plan.sites) - len(attention),
            blocks=len(plan.blocks),
            skipped=len(plan.skipped),
            first_skip=f"{plan.skipped[0].name}: {plan.skipped[0].reason}" if plan.skipped else "",
            static_macs=static,
            routable=plan.blocks_macs_per_sample / static if static else 0.0,
            min_ratio=min_ratio(plan, ConvertConfig().token_reduction),
            coverage=plan.coverage,
        )
        routers = sum(p.numel() for p in get_state(model).parameters())
        plan_bytes = memory_plan(row["params"] + routers, routers, weight_bytes=2)
        row["calibration_gb"] = {k: round(v / 2**30, 1) for k, v in plan_bytes.items()}
    except Exception as e:  # noqa: BLE001 - the table reports every failure, it never stops
        row["seconds"] = round(time.perf_counter() - t0, 1)
        last = traceback.extract_tb(e.__traceback__)[-1]
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]} ({last.name})"
    row["peak_rss_gb"] = round(peak_rss_bytes() / 2**30, 2)
    return row
