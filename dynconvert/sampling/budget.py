"""Budgets hit at sampling: after calibration, one shift of the routers' thresholds makes the
mean FLOPs ratio the sampler executes equal the target (issue 25, item 1).

Why a step after calibration: calibration pulls the batch-mean ratio of training batches (random
timesteps, real data noised in one jump, Gumbel noise on the routers) to the target, but the
sampler runs evaluation routing (hard thresholds, no noise) on its own inputs (its few
timesteps, its own x_t, guidance's unconditional half), and spends something else (the digits
study: 0.526 for a target of 0.5). So the sampler is run once on held-out noise with the calls'
inputs recorded; a bisection then finds the one shift ``s`` of the token routers' output bias
(a token runs its MLP iff ``logit + s > 0``), or of the width routers' bias when no site routes
tokens, whose mean ratio over those calls is the target, and adds it to the bias: the saved
model carries it. A second round records the sampler's inputs under the first shift (other
thresholds change the trajectory a little) and refits.

Example:
    >>> import torch, dynconvert
    >>> from dynconvert.testing import tiny_dit
    >>> model = dynconvert.convert(tiny_dit(), 0.5).eval()
    >>> match = match_sampling_budget(model, 0.8, labels=torch.arange(4), steps=4)
    >>> abs(match.after - 0.8) < 0.01, match.kind
    (True, 'token')
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from dynconvert.flops import last_flops_ratio
from dynconvert.runtime.routing import routing
from dynconvert.runtime.state import get_state
from dynconvert.sampling.sampler import sample

_SPAN = 64.0
"""Half-width of the first bracket of the shift (logits of routers that start at +-35)."""


@dataclass
class BudgetMatch:
    """What :func:`match_sampling_budget` did (stored in the record as ``sampling_budget``).

    Attributes:
        target: The FLOPs ratio aimed at.
        kind: Which thresholds moved: ``"token"`` or ``"width"`` (``"none"``: nothing routes).
        shift: Total shift added to those routers' output bias.
        before: Mean executed ratio of the sampler's calls before the shift.
        after: The same on the last round's recorded calls, after the shift.
        calls: Sampler calls per round; ``rounds``: rounds run.
        reached: ``after`` is within ``tolerance`` of the target (False: the routers cannot
            move that far, e.g. every token already skipped).
        sampler: The sampler settings (steps, guidance, scheduler, seed, samples).
    """

    target: float
    kind: str
    shift: float
    before: float
    after: float
    calls: int
    rounds: int
    reached: bool
    sampler: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (ratios rounded to 6 digits)."""
        d = asdict(self)
        for k in ("shift", "before", "after"):
            d[k] = round(float(d[k]), 6)
        return d


def _biases(model: nn.Module) -> tuple[str, list[torch.Tensor]]:
    """The output biases the shift moves: the token routers' (MLP sites), else the width
    routers'."""
    bank = get_state(model)
    if len(bank.token):
        return "token", [r.net[-1].bias for r in bank.token.values()]
    if len(bank.width):
        return "width", [r.bias for r in bank.width.values()]
    return "none", []


@torch.no_grad()
def _record(model: nn.Module, run: Callable[[], Any]) -> tuple[list[tuple], float]:
    """The inputs of every model call ``run`` makes and the mean executed ratio over them."""
    bank = get_state(model)
    calls: list[tuple] = []
    ratios: list[float] = []

    def pre(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append((args, dict(kwargs)))  # the sampler's own tensors: not modified after

    def post(*_: Any) -> None:
        ratios.append(float(last_flops_ratio(bank).mean()))

    hooks = [model.register_forward_pre_hook(pre, with_kwargs=True),
             model.register_forward_hook(post)]  # fmt: skip
    try:
        with routing(model, "eval"):
            run()
    finally:
        for h in hooks:
            h.remove()
    return calls, sum(ratios) / max(1, len(ratios))


@torch.no_grad()
def _replay(model: nn.Module, calls: list[tuple]) -> float:
    """Mean executed ratio of the recorded calls under the current thresholds."""
    bank = get_state(model)
    total = 0.0
    with routing(model, "eval"):
        for args, kwargs in calls:
            model(*args, **kwargs)
            total += float(last_flops_ratio(bank).mean())
    return total / max(1, len(calls))


@torch.no_grad()
def _fit(model: nn.Module, biases: list[torch.Tensor], calls: list, target: float,
         tolerance: float, iterations: int) -> tuple[float, float]:  # fmt: skip
    """Bisect the shift of ``biases`` that brings the replayed ratio to ``target``; the biases
    keep the best shift found. Returns (that shift, its ratio). Ratio rises with the shift."""
    base = [b.detach().clone() for b in biases]

    def at(shift: float) -> float:
        for b, b0 in zip(biases, base, strict=True):
            b.copy_(b0 + shift)  # in place: the bank's mask tables key on parameter versions
        return _replay(model, calls)

    lo, hi = -_SPAN, _SPAN
    best = (0.0, at(0.0))
    for _ in range(iterations):
        if abs(best[1] - target) <= tolerance:
            break
        mid = (lo + hi) / 2
        r = at(mid)
        if abs(r - target) < abs(best[1] - target):
            best = (mid, r)
        lo, hi = (mid, hi) if r < target else (lo, mid)
    at(best[0])
    return best


def match_sampling_budget(
    model: nn.Module,
    target: float,
    *,
    labels: torch.Tensor,
    steps: int = 25,
    cfg_scale: float = 1.5,
    scheduler: str = "ddim",
    seed: int = 1,
    clip_sample: bool = False,
    tolerance: float = 0.002,
    rounds: int = 2,
    iterations: int = 24,
) -> BudgetMatch:
    """Shift a converted model's router thresholds so its sampler spends ``target``.

    Args:
        model: A converted, calibrated class-conditional model (its biases change in place).
        target: The FLOPs ratio the sampler's calls should execute on average.
        labels: Class labels of the held-out samples (their noise is drawn from ``seed``; use
            another seed than the evaluation's).
        steps: Sampler steps; ``cfg_scale``, ``scheduler``, ``clip_sample``: as ``sample``.
        seed: Seed of the held-out noise.
        tolerance: Stop bisecting within this of the target (on the recorded calls).
        rounds: Record-and-fit rounds (the second sees the trajectory under the first shift).
        iterations: Most bisection steps per round.

    Returns:
        A :class:`BudgetMatch`; the model keeps the shift.

    Example:
        >>> match = match_sampling_budget(model, 0.5, labels=torch.arange(10))  # doctest: +SKIP
        >>> match.to_dict()["after"]  # doctest: +SKIP
        0.5
    """
    kind, biases = _biases(model)
    settings = dict(steps=steps, cfg_scale=cfg_scale, scheduler=scheduler, seed=seed,
                    clip_sample=clip_sample)  # fmt: skip

    def run() -> Any:
        return sample(model, labels=labels, **settings)

    calls, before = _record(model, run)
    total, after, done = 0.0, before, 0
    while biases and done < rounds:
        if done:  # the trajectory under the shift so far
            calls, after = _record(model, run)
            if abs(after - target) <= tolerance:
                break
        shift, after = _fit(model, biases, calls, target, tolerance, iterations)
        total, done = total + shift, done + 1
    return BudgetMatch(
        target=float(target), kind=kind, shift=total, before=before, after=after,
        calls=len(calls), rounds=done, reached=abs(after - target) <= max(tolerance, 0.01),
        sampler={**settings, "samples": len(labels)},
    )  # fmt: skip
