"""The study's training-free cache: first-block-cache style reuse of the later blocks' residual.

Part of ``benchmarks/quality_digits.py``: on a cached sampling step only the first block of the
DiT runs and the other blocks' residual from the last full step is added; which steps are cached
is chosen so the mean cost is the target.
"""

from __future__ import annotations

import contextlib
import math

import torch
from quality_methods import _BENCH
from torch import nn

import dynconvert
from dynconvert.demo.models import demo_spec


class _Rest(nn.Module):
    """Blocks 1..L-1 of a DiT that, on a cached step, add the residual of the last full step."""

    def __init__(self, blocks: list[nn.Module], reuse: list[bool]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.reuse = reuse  # per sampling step of a chunk
        self.calls = 0
        self.residual: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        step = self.calls % len(self.reuse)
        self.calls += 1
        if self.reuse[step] and self.residual is not None and self.residual.shape == x.shape:
            return x + self.residual
        out = x
        for block in self.blocks:
            out = block(out, c)
        self.residual = out - x
        return out


@contextlib.contextmanager
def first_block_cache(model: nn.Module, reuse: list[bool]):
    """Run ``model`` (a DiT) with blocks 1..L-1 cached on the sampling steps ``reuse`` marks."""
    blocks = list(model.blocks)
    rest = _Rest(blocks[1:], reuse)
    model.blocks = nn.ModuleList([blocks[0], rest])
    try:
        yield rest
    finally:
        model.blocks = nn.ModuleList(blocks)


def cache_schedule(steps: int, target: float, cached_cost: float) -> list[bool]:
    """Which sampling steps reuse the cache so the mean cost is closest to ``target`` (the first
    step always runs in full; full steps are spread evenly)."""
    best = None
    for n_full in range(1, steps + 1):
        ratio = (n_full + (steps - n_full) * cached_cost) / steps
        if best is None or abs(ratio - target) < abs(best[1] - target):
            best = (n_full, ratio)
    n_full = best[0]
    full = {int(math.floor(j * steps / n_full)) for j in range(n_full)}
    return [i not in full for i in range(steps)]


def cached_step_cost(model: nn.Module) -> float:
    """MACs of a cached step (first block, embeddings, final layer) over a full step's, counted
    by ``dynconvert.measure_macs``."""
    size = demo_spec(_BENCH["name"]).image_size
    inputs = (torch.zeros(1, 1, size, size), torch.tensor([500]), torch.tensor([0]))
    full = dynconvert.measure_macs(model, inputs)
    with first_block_cache(model, [False, True]) as rest:
        model(*inputs)  # fills the residual
        cached = dynconvert.measure_macs(model, inputs)
        rest.calls = 0
    return cached / full
