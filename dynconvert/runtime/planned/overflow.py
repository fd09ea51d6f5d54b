"""Tokens the planned path's fixed capacities dropped: counted on the device, per thread.

A token-routed site under a fixed capacity computes the top-k tokens; tokens over the threshold
beyond k are dropped (planner.py). Each planned call adds (dropped, wanted) to a counter on the
device, with no host read, and :func:`~dynconvert.runtime.planned.controls.token_overflow`
reads the sum once. Each thread adds to a counter of its own: additions to one shared counter
by concurrent calls could be lost.

Example:
    >>> counters = OverflowCounters()
    >>> counters.counter(torch.device("cpu")).add_(torch.tensor([1, 4]))
    tensor([1, 4])
    >>> counters.read(calls=1).rate
    0.25
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch


@dataclass
class TokenOverflow:
    """Tokens the fixed capacities dropped since the last read (summed over sites and calls).

    Attributes:
        dropped: tokens over the threshold that did not fit their site's capacity.
        wanted: tokens over the threshold at gathered sites (the denominator of ``rate``).
        calls: planned forward calls counted.
    """

    dropped: int
    wanted: int
    calls: int

    @property
    def rate(self) -> float:
        """dropped / wanted (0.0 when nothing was wanted)."""
        return self.dropped / self.wanted if self.wanted else 0.0


class OverflowCounters:
    """One (2,) long counter (dropped, wanted) per thread and device."""

    def __init__(self):
        self._counters: dict[tuple[int, torch.device], torch.Tensor] = {}

    def counter(self, device: torch.device) -> torch.Tensor:
        """The calling thread's counter on ``device`` (made on first use: call this outside a
        compiled or captured region, as the planner's ``begin`` does)."""
        key = (threading.get_ident(), device)
        found = self._counters.get(key)
        if found is None:
            found = self._counters[key] = torch.zeros(2, dtype=torch.long, device=device)
        return found

    def read(self, calls: int, reset: bool = True) -> TokenOverflow:
        """The sum over every thread's counter (one host read each); ``reset`` zeroes them and
        forgets the counters of threads that have ended."""
        dropped = wanted = 0
        for counter in list(self._counters.values()):
            d, w = (int(v) for v in counter.tolist())
            dropped, wanted = dropped + d, wanted + w
            if reset:
                counter.zero_()
        if reset:
            alive = {t.ident for t in threading.enumerate()}
            self._counters = {k: c for k, c in self._counters.items() if k[0] in alive}
        return TokenOverflow(dropped, wanted, calls)
