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
rest of the process (mallopt cannot restore the adaptive threshold); ``calibrate`` calls it
when it trains on the CPU. Elsewhere (another C library, macOS, CUDA) it does nothing. The
price is CPU time (each large tensor is fresh pages the kernel zeroes): the same DiT-S/2 run
took 34% more CPU seconds (docs/large-models.md).

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
