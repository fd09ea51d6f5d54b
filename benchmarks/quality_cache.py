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
from dynconvert.flops import call_costs, other_macs_per_sample


class _Rest(nn.Module):
    """Blocks 1..L-1 of a DiT that, on a cached step, add the residual of the last full step."""

    def __init__(self, blocks: list[nn.Module], reuse: list[bool]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.reuse = reuse  # per sampling step of a chunk
        self.calls = 0
        self.residual: torch.Tensor | None = None
        self.last_reused = False  # whether the last call skipped blocks 1..L-1

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        step = self.calls % len(self.reuse)
        self.calls += 1
        self.last_reused = bool(self.reuse[step] and self.residual is not None)
        self.last_reused = self.last_reused and self.residual.shape == x.shape
        if self.last_reused:
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


def cached_call_ratio(model: nn.Module) -> float:
    """The FLOPs ratio of a converted DiT's last call when it was a cached step: what ran (the
    embeddings, the final layer and the first block's sites as routed in that call) over the
    original's full step. The later blocks' records are stale (they did not run), so only their
    static cost is read."""
    bank = dynconvert.get_state(model)
    first = bank.plan.sites[0].block  # the first block's name ("blocks.0"): the one that ran
    other = other_macs_per_sample(bank.plan)
    costs = call_costs(bank)
    ran = sum(c.dynamic + c.router for s, c in costs if s.block == first)
    return float(((other + ran) / (other + sum(c.static for _, c in costs))).mean())
