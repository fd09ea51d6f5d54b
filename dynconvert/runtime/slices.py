"""SliceCache: contiguous copies of the active rows / columns of weights, kept while unchanged.

On the fast path a Linear computes only its active heads or channel groups, which needs the
weight restricted to their rows (q, k, v, fc1) or columns (out-projection, fc2). Gathering them
on every call would cost as much memory traffic as the matmul saves, so slices are cached per
(Linear, axis) for the unit set they were cut for, and dropped when the weight changes (training
step, load, dtype or device move, a LoRA merged: ``runtime/lora.py`` bumps the version peft's
``.data`` writes leave as it was) or the unit set does. A LoRA's A and B are cut the same way.

Under ``torch.compile`` a lookup runs eagerly (:meth:`SliceCache.get` is excluded from
compilation): the slices it returns enter the graph as inputs, so dynamo does not guard on the
cache's byte count or entries. That alone does not stop recompiles: the fast path's per-site
head counts and call progress are still Python ints dynamo guards on, so a model with more than
8 sites of one kind reaches dynamo's recompile limit (a known gap: the strict xfail in
tests/test_reliability_third.py; the planned path compiles once per pattern).

The cache is bounded: by ``ConvertConfig.slice_cache_mb``, or by default 20% of the model's
parameter bytes (so a converted model stays within about 1.25x the original's memory). Column
slices are strided gathers, the costly kind, so they may push cached row slices out; row
slices are plain contiguous copies and only fill what the budget leaves.

Threads calling one model share its cache: a hit is one dict read; a miss updates the entries
and the byte count under a lock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from dynconvert.runtime.shared import SharedLock


class _Entry(NamedTuple):
    stamp: tuple  # (unit set, weight version, data pointer, dtype): valid while all equal
    weight: torch.Tensor
    bias: torch.Tensor | None
    nbytes: int


class SliceCache:
    """Weight slices of the fast path, by (Linear, axis), within a byte budget.

    Example:
        >>> lin = nn.Linear(4, 6)
        >>> cache = SliceCache(limit=lambda element_size: 1e6)
        >>> with torch.no_grad():  # under autograd a trainable weight's slice is not cached
        ...     w, b = cache.get(lin, "rows", (0, 2), torch.tensor([0, 1, 4, 5]))
        >>> w.shape, cache.nbytes > 0
        (torch.Size([4, 4]), True)
    """

    def __init__(self, limit: Callable[[int], float] = lambda element_size: 0.0):
        self.limit = limit  # bytes allowed, given the element size (asked only on a miss)
        self._entries: dict[tuple[int, str], _Entry] = {}
        self.nbytes = 0
        self._lock = SharedLock()  # held while entries and nbytes change (threads share them)

    @torch.compiler.disable
    def get(self, lin: nn.Linear, axis: str, units: tuple[int, ...], index: torch.Tensor) -> tuple:
        """Weight (and bias) of ``lin`` restricted to ``index`` rows or cols.

        ``units`` (a tuple) identifies the unit set the index was built for; ``index`` lives on
        the weight's device. Under autograd with a trainable weight nothing is cached (the
        slice must stay in the graph).
        """
        w = lin.weight
        if getattr(lin, "_diffusers_hook", None) is not None:
            # diffusers' layerwise casting and offloading swap the weight's storage on every call
            # (an address can come back with other values): a cached slice cannot be trusted.
            ws = w.index_select(0 if axis == "rows" else 1, index)
            bs = (
                lin.bias.index_select(0, index)
                if axis == "rows" and lin.bias is not None
                else lin.bias
            )
            return ws, bs
        key = (id(lin), axis)
        stamp = (units, w._version, w.data_ptr(), w.dtype)
        hit = self._entries.get(key)
        if hit is not None and hit.stamp == stamp:
            return hit.weight, hit.bias
        if axis == "rows":  # q/k/v/fc1: output features of the active units, with their bias
            ws = w.index_select(0, index)  # (rows on, in)
            bs = lin.bias.index_select(0, index) if lin.bias is not None else None
        else:  # out-projection/fc2: input features of the active units; the bias is whole
            ws = w.index_select(1, index)  # (out, cols on)
            bs = lin.bias
        with self._lock:  # another thread may have refreshed or dropped it since the read above
            if key in self._entries and self._entries[key].stamp != stamp:  # stale
                self._drop(key)
            if torch.is_grad_enabled() and w.requires_grad:
                return ws, bs
            nbytes = ws.numel() * ws.element_size()
            if axis == "rows" and bs is not None:
                nbytes += bs.numel() * bs.element_size()
            limit = self.limit(ws.element_size())
            if axis == "cols":  # column gathers are the costly ones: they may push out rows
                for k in [k for k in self._entries if k[1] == "rows"]:
                    if self.nbytes + nbytes <= limit:
                        break
                    self._drop(k)
            if key not in self._entries and self.nbytes + nbytes <= limit:
                self._entries[key] = _Entry(stamp, ws, bs, nbytes)
                self.nbytes += nbytes
        return ws, bs

    def _drop(self, key: tuple[int, str]) -> None:
        self.nbytes -= self._entries.pop(key).nbytes

    def clear(self) -> None:
        """Drop every slice (frees their memory)."""
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)
