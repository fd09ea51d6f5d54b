"""Freed tensors go back to the system while a calibration runs on the CPU (glibc's malloc).

glibc serves a large allocation with its own ``mmap`` and returns it on ``free``, but only
above a threshold that it raises, by default, to the size of every such block freed (up to
32 MiB). After a step's first few activations are freed, every tensor under that size comes
from the heap instead, and freed heap is kept by the process: a calibrating process's resident
memory then grows step by step above what its tensors hold. Measured on DiT-S/2, batch 16,
gradient checkpointing, 3 steps (benchmarks/memory_phases.py): 2.279 GiB peak with the
default, 1.567 GiB with the threshold fixed, against an estimate of 1.456 GiB; the memory plan
(``memory.py``) counts the tensors, so it is only an honest bound with the threshold fixed.

:func:`release_freed_memory` fixes the threshold at glibc's starting value (128 KiB) for the
rest of the process (mallopt cannot restore the adaptive threshold). Elsewhere (another C
library, macOS, CUDA) it does nothing. The price is CPU time (each large tensor is fresh pages
the kernel zeroes): the same DiT-S/2 run took 34% more CPU seconds (docs/large-models.md). So
``calibrate`` pays it only where memory is what limits the run: :func:`release_when_tight`
fixes the threshold when the memory plan needs more than ``TIGHT_SHARE`` of the memory the
process may use (then the plan's bound is what keeps the run alive); a small run keeps glibc's
faster default, and the process's allocator is left as the user had it.

Example:
    >>> import torch
    >>> release_freed_memory(torch.device("cuda"))
    False
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's starting threshold, kept instead of raised
TIGHT_SHARE = 0.5
"""Share of the free memory above which a calibration's plan counts as tight."""


def release_freed_memory(device: Any) -> bool:
    """Fix glibc's mmap threshold when calibrating on the CPU; whether it was set.

    Args:
        device: The device calibration runs on (``torch.device`` or its type as a string).

    Returns:
        True when the threshold is now fixed (Linux with glibc, CPU), else False.

    Example:
        >>> release_freed_memory("cpu") in (True, False)
        True
    """
    kind = getattr(device, "type", device)
    if kind != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # another C library (musl): its allocator is left alone
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def release_when_tight(device: Any, needed: int | None, free: int | None = None) -> bool:
    """:func:`release_freed_memory` when a calibration needing ``needed`` bytes (its memory
    plan's total; None: not planned) would use more than ``TIGHT_SHARE`` of ``free`` bytes
    (default: what ``fit.device_free`` gives this process on ``device``).

    Example:
        >>> release_when_tight("cpu", needed=1 << 20, free=1 << 30)  # 1 MiB of 1 GiB: left alone
        False
    """
    if needed is None:
        return False
    if free is None:
        from dynconvert.calibration.fit import device_free

        free = device_free(device)[0]
    if needed <= TIGHT_SHARE * free:
        return False
    return release_freed_memory(device)
