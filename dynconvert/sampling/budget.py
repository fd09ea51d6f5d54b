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
model carries it. Where the token shift alone cannot get there (every token skipped and still
over the target: the token threshold saturates), the width routers' bias is bisected next. A
second round records the sampler's inputs under the first shifts (other thresholds change the
trajectory a little) and refits.

A budget-conditioned model (a range, runtime/budgets.py) shares its biases between budgets, so
:func:`match_budget_grid` fits the same two shifts at every budget of a grid (every 0.1 or
closer) into a table the model keeps (``budget_shift``), from which a call at any budget in the
range reads its shifts, interpolated.

Example:
    >>> import torch, dynconvert
    >>> from dynconvert.testing import tiny_dit
    >>> model = dynconvert.convert(tiny_dit(), 0.5).eval()
    >>> match = match_sampling_budget(model, 0.8, labels=torch.arange(4), steps=4)
    >>> abs(match.after - 0.8) < 0.01, match.kind
    (True, 'token')
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from dynconvert.errors import BudgetError
from dynconvert.flops import last_flops_ratio
from dynconvert.runtime.budgets import shift_grid
from dynconvert.runtime.routing import budget, routing
from dynconvert.runtime.state import get_state
from dynconvert.sampling.sampler import sample

_SPAN = 64.0
"""Half-width of the first bracket of the shift (logits of routers that start at +-35)."""


@dataclass
class BudgetMatch:
    """What :func:`match_sampling_budget` did (stored in the record as ``sampling_budget``).

    Attributes:
        target: The FLOPs ratio aimed at.
        kind: Which thresholds moved: ``"token"``, ``"width"``, ``"token+width"`` (the token
            shift alone could not reach the target, so the width routers' bias moved too) or
            ``"none"`` (nothing routes).
        shift: Total shift added to the first routers' output bias (token, else width).
        before: Mean executed ratio of the sampler's calls before the shift.
        after: The same on the last round's recorded calls, after the shift.
        calls: Sampler calls per round; ``rounds``: rounds run.
        reached: ``after`` is within ``tolerance`` of the target (False: the routers cannot
            move that far, e.g. every unit already off).
        sampler: The sampler settings (steps, guidance, scheduler, seed, samples).
        width_shift: Shift of the width routers' bias made after the token routers' (kind
            ``"token+width"``; 0 otherwise).
        budget: The budget the sampler ran at (a budget-conditioned model's grid; else None).
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
    width_shift: float = 0.0
    budget: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (ratios rounded to 6 digits)."""
        d = asdict(self)
        for k in ("shift", "before", "after", "width_shift"):
            d[k] = round(float(d[k]), 6)
        return d


Knob = Callable[[float], None]
"""Sets one kind of threshold shift (in logits, from where it was when the knob was made)."""


def _knob(tensors: list[torch.Tensor]) -> Knob:
    """A knob adding its shift to each of ``tensors`` (in place: the bank's mask tables key on
    parameter and buffer versions)."""
    base = [t.detach().clone() for t in tensors]

    def put(shift: float) -> None:
        for t, t0 in zip(tensors, base, strict=True):
            t.copy_(t0 + shift)

    return put


def _knobs(model: nn.Module, row: int | None) -> list[tuple[str, Knob]]:
    """The thresholds a fit may move, first to last: the token routers', then the width
    routers'. ``row``: a budget-conditioned model's grid row (its ``budget_shift`` table, not
    the biases every budget shares); None: the biases themselves."""
    bank = get_state(model)
    kinds = [k for k, routers in (("token", bank.token), ("width", bank.width)) if len(routers)]
    if row is not None:
        return [(k, _knob([bank.budget_shift[row, j : j + 1]]))
                for j, k in ((0, "token"), (1, "width")) if k in kinds]  # fmt: skip
    biases = {"token": [r.net[-1].bias for r in bank.token.values()],
              "width": [r.bias for r in bank.width.values()]}  # fmt: skip
    return [(k, _knob(biases[k])) for k in kinds]


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
def _fit(model: nn.Module, put: Knob, calls: list, target: float, tolerance: float,
         iterations: int, start: float, side: int = 0) -> tuple[float, float]:  # fmt: skip
    """Bisect the knob's shift that brings the replayed ratio to ``target`` (``start``: the
    ratio at shift 0); the knob keeps the best shift found. Returns (that shift, its ratio).
    Ratio rises with the shift. ``side`` +1 (-1): only a ratio at or over (under) the target
    counts as found, so that another knob can then close the gap from that side."""

    def ok(r: float) -> bool:
        return side == 0 or (r - target) * side >= 0

    lo, hi = -_SPAN, _SPAN
    best = (0.0, start) if ok(start) else None
    for _ in range(iterations):
        if best is not None and abs(best[1] - target) <= tolerance:
            break
        mid = (lo + hi) / 2
        put(mid)
        r = _replay(model, calls)
        if ok(r) and (best is None or abs(r - target) < abs(best[1] - target)):
            best = (mid, r)
        lo, hi = (mid, hi) if r < target else (lo, mid)
    best = best or (0.0, start)  # nothing on that side: as it was
    put(best[0])
    return best


def _match(model: nn.Module, target: float, run: Callable[[], Any], row: int | None,
           tolerance: float, rounds: int, iterations: int) -> dict[str, Any]:  # fmt: skip
    """Record the sampler's calls and fit, ``rounds`` times: the first knob (token, else width)
    to the target; where it cannot get there, the width knob to the target's far side (over it
    when every token kept spends too little, under it when every token skipped spends too
    much), then the token knob again from there. What was done, as BudgetMatch's fields."""
    knobs = dict(_knobs(model, row))
    names = list(knobs)
    calls, before = _record(model, run)
    shifts = dict.fromkeys(names, 0.0)
    after, done = before, 0

    def fit(name: str, start: float, side: int = 0) -> float:
        put = _knob_from(knobs[name], shifts[name])
        shift, ratio = _fit(model, put, calls, target, tolerance, iterations, start, side)
        shifts[name] += shift
        return ratio

    while names and done < rounds:
        if done:  # the trajectory under the shifts so far
            calls, after = _record(model, run)
            if abs(after - target) <= tolerance:
                break
        after = fit(names[0], after)
        if len(names) > 1 and abs(after - target) > tolerance:  # the token threshold saturates
            after = fit("width", after, side=1 if after < target else -1)
            after = fit("token", after)
        done += 1
    moved = [k for k in names if shifts[k]]
    first = names[0] if names else "none"
    return dict(
        kind="+".join(moved) or first, shift=shifts.get(first, 0.0), before=before, after=after,
        calls=len(calls), rounds=done, reached=abs(after - target) <= max(tolerance, 0.01),
        width_shift=shifts["width"] if first == "token" and "width" in shifts else 0.0,
    )  # fmt: skip


def _knob_from(put: Knob, offset: float) -> Knob:
    """``put`` with its shifts counted from ``offset`` (the shift a previous round left)."""
    return lambda shift: put(offset + shift)


def _sampler(model: nn.Module, labels: torch.Tensor, settings: dict) -> Callable[[], Any]:
    """The held-out sampler run a fit records."""
    return lambda: sample(model, labels=labels, **settings)


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

    The token routers' thresholds move first; where they alone cannot reach the target (every
    token already skipped, or all kept), the width routers' bias moves too. A budget-conditioned
    model is fitted at every budget of its grid instead: :func:`match_budget_grid`.

    Args:
        model: A converted, calibrated class-conditional model (its biases change in place).
        target: The FLOPs ratio the sampler's calls should execute on average.
        labels: Class labels of the held-out samples (their noise is drawn from ``seed``; use
            another seed than the evaluation's).
        steps: Sampler steps; ``cfg_scale``, ``scheduler``, ``clip_sample``: as ``sample``.
        seed: Seed of the held-out noise.
        tolerance: Stop bisecting within this of the target (on the recorded calls).
        rounds: Record-and-fit rounds (the second sees the trajectory under the first shift).
        iterations: Most bisection steps per knob and round.

    Returns:
        A :class:`BudgetMatch`; the model keeps the shift.

    Example:
        >>> match = match_sampling_budget(model, 0.5, labels=torch.arange(10))  # doctest: +SKIP
        >>> match.to_dict()["after"]  # doctest: +SKIP
        0.5
    """
    settings = dict(steps=steps, cfg_scale=cfg_scale, scheduler=scheduler, seed=seed,
                    clip_sample=clip_sample)  # fmt: skip
    row = None
    bank = get_state(model)
    if bank.budget_range is not None:  # one grid row: the one at the model's budget
        grid = shift_grid(bank.budget_range)
        row = min(range(len(grid)), key=lambda i: abs(grid[i] - bank.budget))
        if abs(grid[row] - bank.budget) > 1e-6:
            raise BudgetError(
                f"a budget-conditioned model's sampler fit runs at the budgets of its grid "
                f"{[round(g, 4) for g in grid]}; use match_budget_grid, or set_budget to one"
            )
    found = _match(model, target, _sampler(model, labels, settings), row, tolerance, rounds,
                   iterations)  # fmt: skip
    sampler = {**settings, "samples": len(labels)}
    return BudgetMatch(target=float(target), sampler=sampler, **found)


@dataclass
class BudgetGridMatch:
    """What :func:`match_budget_grid` did: one :class:`BudgetMatch` per budget of the grid
    (the range's top at 1.0 runs every unit and is not fitted)."""

    matches: list[BudgetMatch]

    @property
    def reached(self) -> bool:
        """Every grid budget's sampler spends its budget (within 0.01 on the recorded calls)."""
        return all(m.reached for m in self.matches)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values: ``{"kind": "grid", "reached", "budgets": [...]}``."""
        return {"kind": "grid", "reached": self.reached,
                "budgets": [m.to_dict() for m in self.matches]}  # fmt: skip


def match_budget_grid(model: nn.Module, *, labels: torch.Tensor, **options: Any) -> BudgetGridMatch:
    """Fit a budget-conditioned model's sampler at every budget of its grid.

    At each budget ``b`` of ``shift_grid(range)`` (every 0.1 or closer) the sampler runs on the
    held-out noise at ``b`` and the model's ``budget_shift`` row for ``b`` is fitted as
    :func:`match_sampling_budget` fits the biases of a single-budget model: token shift first,
    width shift where that alone cannot reach ``b``. A call at a budget between two grid
    budgets uses the shifts interpolated between theirs (budgets.py); the table is a buffer of
    the model, saved and loaded with it. ``labels`` and ``options`` (``steps``, ``cfg_scale``,
    ``scheduler``, ``seed``, ``clip_sample``, ``tolerance``, ``rounds``, ``iterations``): as
    :func:`match_sampling_budget`'s, with its defaults.

    Example:
        >>> from dynconvert.testing import tiny_dit
        >>> model = dynconvert.convert(tiny_dit(), (0.5, 1.0)).eval()  # doctest: +SKIP
        >>> match_budget_grid(model, labels=torch.arange(4), steps=4).reached  # doctest: +SKIP
        True
    """
    bank = get_state(model)
    if bank.budget_range is None:
        raise BudgetError(
            "match_budget_grid fits a budget-conditioned model (converted with a range, e.g. "
            "convert(model, (0.3, 1.0))); fit a single-budget model with match_sampling_budget"
        )
    defaults = inspect.signature(match_sampling_budget).parameters
    unknown = set(options) - set(defaults) - {"model", "target", "labels"}
    if unknown:
        raise TypeError(f"match_budget_grid got unexpected options {sorted(unknown)}")
    opts = {k: options.get(k, p.default) for k, p in defaults.items() if p.default is not p.empty}
    settings = {k: opts[k] for k in ("steps", "cfg_scale", "scheduler", "seed", "clip_sample")}
    tolerance, rounds, iterations = opts["tolerance"], opts["rounds"], opts["iterations"]
    sampler = {**settings, "samples": len(labels)}
    matches = []
    for row, b in enumerate(shift_grid(bank.budget_range)):
        b = round(b, 4)  # as a call's budget is keyed (check_call_budget)
        if bank.runs_full(b):  # the range's top at 1.0 runs every unit: nothing to fit; its
            with torch.no_grad():  # row is the last fitted one's, so that calls just below 1.0
                bank.budget_shift[row] = bank.budget_shift[row - 1]  # get that one's shifts
            continue
        with budget(model, b):  # this thread's calls, the sampler's included
            found = _match(model, b, _sampler(model, labels, settings), row, tolerance,
                           rounds, iterations)  # fmt: skip
        matches.append(BudgetMatch(target=b, sampler=sampler, budget=b, **found))
    return BudgetGridMatch(matches)
