"""A run's memory: refused before the weights exist when it will not fit, and a heartbeat in
``run.json`` so that a run the kernel killed anyway says so on the next start.

:func:`check_run_memory` plans the calibration on a meta-device skeleton of the model (no
weights are allocated; ``calibration/memory.py``), with the processes and sharding of the
launch (``WORLD_SIZE``, an accelerate FSDP config) and this process's device, and raises
``MemoryPlanError`` naming the estimate and what would fit. ``calibrate`` checks again with the
converted model before its first step.

:class:`Heartbeat` rewrites ``run.json``'s ``heartbeat`` entry every ``HEARTBEAT_SECONDS`` while
the run calibrates: time, last step, this process's resident memory and the machine's available
memory. A process killed with SIGKILL (the kernel's OOM killer) cannot say anything; the next
start reads the last heartbeat (:func:`stop_note`).

Example:
    >>> stop_note({"status": "running"})
    ''
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HEARTBEAT_SECONDS = 15.0
"""How often a running calibration rewrites its heartbeat."""

EARLY_CHECK_PARAMETERS = 100_000_000
"""Models at least this big are planned on a meta-device skeleton before their weights are
built (the analysis costs about what convert's does: some 20 s for DiT-XL/2 on 2 cores);
smaller ones are built and converted first, which is quicker, and ``calibrate`` checks them
before its first step."""


def launch_processes() -> tuple[int, str]:
    """(processes, sharding) of this launch: ``WORLD_SIZE`` and whether accelerate asks for FSDP.

    Example:
        >>> launch_processes()[1] in ("none", "fsdp")
        True
    """
    from dynconvert.calibration.distributed import fsdp_requested

    world = max(1, int(os.environ.get("WORLD_SIZE", "1")))
    return world, "fsdp" if fsdp_requested() and world > 1 else "none"


def launch_device(device: str) -> torch.device:
    """This process's device in a launch: ``cuda:LOCAL_RANK`` on GPUs, else the CPU."""
    if device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def meta_skeleton(source: Any) -> torch.nn.Module:
    """The run's base model on the meta device (its architecture, no weights)."""
    with torch.device("meta"):
        return source.skeleton()


def check_run_memory(source: Any, recipe: Any, calibration: Any, device: str) -> Any:
    """Refuse, before building the weights, a calibration whose plan exceeds the device.

    Args:
        source: The run's ``ModelSource``.
        recipe: The run's recipe (its convert settings shape the routers).
        calibration: The run's ``CalibrationConfig`` (``check_memory=False`` skips the check).
        device: "cpu" or "cuda" (``pipeline.resolve_device``).

    Returns:
        The estimate (``MemoryEstimate``), or None when the check is off or left to
        ``calibrate`` (models under ``EARLY_CHECK_PARAMETERS``).

    Raises:
        MemoryPlanError: It does not fit; the message gives the estimate and what would.
    """
    if not calibration.check_memory:
        return None
    from dynconvert.calibration.fit import check_fits, resident_bytes, settings_for
    from dynconvert.calibration.memory_facts import skeleton_facts

    try:
        skeleton = meta_skeleton(source)
    except (TypeError, ValueError):  # bad model_kwargs: the build says so, in its words
        return None
    if sum(p.numel() for p in skeleton.parameters()) < EARLY_CHECK_PARAMETERS:
        return None  # calibrate checks it, once converted, before its first step
    _, facts = skeleton_facts(skeleton, recipe.convert_config())
    processes, sharding = launch_processes()
    where = launch_device(device)
    settings = settings_for(calibration, processes, sharding, where)
    return check_fits(facts, settings, where, resident_bytes(facts, settings, False))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Heartbeat:
    """Rewrites ``run.json``'s ``heartbeat`` every ``every`` seconds from a daemon thread.

    Use as a context manager around calibration on the main process; :meth:`wrap` passes
    ``on_step`` through, recording the step. Stopped (and joined) on exit, so the run's final
    ``run.json`` is never overwritten by a late beat.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "run.json"
        >>> _ = path.write_text('{"status": "running"}')
        >>> with Heartbeat(path, every=60) as beat:
        ...     beat.wrap(None)(type("Info", (), {"step": 3})())
        >>> json.loads(path.read_text())["heartbeat"]["step"]
        3
    """

    def __init__(self, path: Path, every: float = HEARTBEAT_SECONDS):
        self.path, self.every = Path(path), every
        self.step = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """Write the heartbeat now (run.json is read and rewritten whole, atomically)."""
        import psutil

        from dynconvert.io.save import atomic_write_bytes

        with self._lock:
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                return  # no run.json (yet): nothing to add a heartbeat to
            vm = psutil.virtual_memory()
            data["heartbeat"] = {
                "time": _now(), "step": self.step, "pid": os.getpid(),
                "rss_bytes": psutil.Process().memory_info().rss,
                "available_bytes": int(vm.available), "total_bytes": int(vm.total),
            }  # fmt: skip
            atomic_write_bytes(self.path, (json.dumps(data, indent=2) + "\n").encode())

    def wrap(self, on_step: Callable[[Any], None] | None) -> Callable[[Any], None]:
        """``on_step`` that also records the step the heartbeat reports."""

        def step(info: Any) -> None:
            self.step = int(info.step)
            if on_step is not None:
                on_step(info)

        return step

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.beat()

    def __enter__(self) -> Heartbeat:
        self.beat()
        self._thread = threading.Thread(target=self._run, name="dynconvert-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def stop_note(previous: dict[str, Any] | None) -> str:
    """What the last heartbeat of a run that is still marked running says about how it stopped.

    Example:
        >>> beat = {"time": "2026-01-01T00:00:00+00:00", "step": 0, "rss_bytes": 16 * 2**30,
        ...         "available_bytes": 2**28, "total_bytes": 24 * 2**30}
        >>> stop_note({"status": "running", "heartbeat": beat})[:40]
        '; it stopped without a word after its l'
    """
    if not previous or previous.get("status") != "running" or not previous.get("heartbeat"):
        return ""
    beat = previous["heartbeat"]
    gib = 2**30
    rss, avail = beat.get("rss_bytes", 0) / gib, beat.get("available_bytes", 0) / gib
    total = beat.get("total_bytes", 0) / gib
    low = total > 0 and (avail < 0.05 * total or avail < 1.0)
    why = (
        "most likely killed by the kernel for lack of memory (exit 137): see `dynconvert inspect "
        "--calibration` and the calibration.* settings that fit"
        if low
        else "killed or crashed"
    )
    return (
        f"; it stopped without a word after its last heartbeat at {beat.get('time')} (step "
        f"{beat.get('step')}, {rss:.1f} GiB resident, {avail:.1f} of {total:.1f} GiB available): "
        f"{why}"
    )
