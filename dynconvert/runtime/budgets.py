"""FLOPs budgets: one number, or a range for a budget-conditioned model, and the checks on both.

A model converted with a single budget (``convert(model, 0.5)``) is calibrated for that budget
alone. A model converted with a range (``convert(model, (0.3, 1.0))``, CLI ``--target-flops
0.3:1.0``) has routers that also read the budget of each call; calibration samples a budget in
the range per step, and at inference a call may ask for any budget inside it
(``set_budget``, ``with budget(...)``, ``dynconvert_budget=``; routing.py). A range whose top
is 1.0 gives back the original's compute and outputs exactly at 1.0: that call runs every unit
and every token (``RouterBank.runs_full``). :class:`BudgetInputs` is what the routers read of a
call's budget (mixed into RouterBank).

Example:
    >>> parse_budget(0.5), parse_budget("0.3:1.0"), parse_budget((0.3, 0.9))
    ((0.5, None), (0.3, (0.3, 1.0)), (0.3, (0.3, 0.9)))
    >>> check_call_budget(0.4, (0.3, 1.0), 0.3)
    0.4
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any

import torch

from dynconvert.errors import BudgetError

if TYPE_CHECKING:
    from dynconvert.runtime.call import RoutingCall

BudgetRange = tuple[float, float]

SHIFT_STEP = 0.1
"""Widest gap between two budgets of the sampler fit's grid (:func:`shift_grid`)."""


def _number(value: Any, what: str) -> float:
    """A budget number in (0, 1] (BudgetError otherwise)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BudgetError(
            f"{what} must be a number in (0, 1], e.g. 0.5 for half the FLOPs; got {value!r}"
        )
    b = float(value)
    if not 0.0 < b <= 1.0:  # also refuses NaN
        raise BudgetError(
            f"{what} must be in (0, 1] (a fraction of the original FLOPs, e.g. 0.5); got {b}"
        )
    return b


def parse_budget(value: Any) -> tuple[float, BudgetRange | None]:
    """A budget as given to convert or the CLI -> (the model's default budget, the range or None).

    Accepts a number in (0, 1], a pair ``(low, high)`` with ``0 < low < high <= 1``, or their
    text forms ``"0.5"`` and ``"0.3:1.0"``. A range's default budget is its low end (the speed
    it was converted for); ``set_budget`` changes it.

    Example:
        >>> parse_budget([0.4, 0.8])
        (0.4, (0.4, 0.8))
    """
    if isinstance(value, str):
        parts = value.split(":")
        try:
            nums = [float(p) for p in parts]
        except ValueError:
            raise BudgetError(
                f"budget must be a number in (0, 1] like 0.5 or a range like 0.3:1.0; got {value!r}"
            ) from None
        value = nums[0] if len(nums) == 1 else tuple(nums)
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise BudgetError(
                f"a budget range is two numbers (low, high), e.g. (0.3, 1.0); got {value!r}"
            )
        lo, hi = _number(value[0], "a budget range's low end"), _number(value[1], "its high end")
        if not lo < hi:
            raise BudgetError(f"a budget range needs low < high, e.g. (0.3, 1.0); got ({lo}, {hi})")
        return lo, (lo, hi)
    return _number(value, "budget"), None


def check_call_budget(value: Any, budget_range: BudgetRange | None, calibrated: float) -> float:
    """The budget one call (or a model's default) may run at, or BudgetError naming what may.

    ``budget_range``: the model's range (None: a single-budget model, which runs only at
    ``calibrated``, the budget it was converted for).

    Example:
        >>> check_call_budget(0.5, None, 0.5)
        0.5
    """
    if budget_range is not None and isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not budget_range[0] - 1e-9 <= float(value) <= budget_range[1] + 1e-9:
            lo, hi = budget_range
            raise BudgetError(
                f"budget {float(value):g} is outside the range this model was calibrated for, "
                f"{lo:g}..{hi:g}; choose a budget in it"
            )
    b = _number(value, "budget")
    if budget_range is None:
        if abs(b - calibrated) > 1e-9:
            raise BudgetError(
                f"this model was calibrated for the single budget {calibrated:g} and cannot run "
                f"at {b:g}; convert it with a range, e.g. convert(model, ({min(b, calibrated):g}, "
                "1.0)) or --target-flops 0.3:1.0, and calibrate it again"
            )
        return b
    return round(b, 4)  # the evaluation table and planned patterns key on it


def budget_range_of(record: dict[str, Any]) -> BudgetRange | None:
    """A saved record's budget range (a budget-conditioned model), None for a single budget (and
    for records written before ranges existed). BudgetError for a range that is not one.

    Example:
        >>> budget_range_of({"budget": 0.3, "budget_range": [0.3, 1.0]})
        (0.3, 1.0)
    """
    value = record.get("budget_range")
    return None if value is None else parse_budget(value)[1]


def shift_grid(budget_range: BudgetRange) -> list[float]:
    """The budgets at which a budget-conditioned model's sampler fit stores threshold shifts
    (sampling/budget.py): the range's ends and equal steps of at most :data:`SHIFT_STEP`
    between them; a call's shift is interpolated linearly between its two neighbours.

    Example:
        >>> [round(b, 2) for b in shift_grid((0.3, 1.0))]
        [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    """
    lo, hi = budget_range
    n = max(2, math.ceil((hi - lo) / SHIFT_STEP - 1e-9) + 1)
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def interpolate(x: float, xs: list[float], ys: list[float]) -> float:
    """Piecewise-linear ``y(x)`` through the points (``xs`` increasing), constant outside.

    Example:
        >>> round(interpolate(0.35, [0.3, 0.4], [1.0, 3.0]), 6)
        2.0
    """
    if x <= xs[0]:
        return ys[0]
    for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


class BudgetInputs:
    """What the routers of a RouterBank read of the call's budget, mixed into RouterBank (which
    provides ``budget``, ``budget_range``, ``t_embed``, ``b_embed``, ``token``,
    ``token_budget``, ``lock`` and each thread's call)."""

    def runs_full(self, budget: float | None) -> bool:
        """Whether a call at ``budget`` runs every unit and token: a budget-conditioned model's
        calls at 1.0 (its range's top), which so give back the original's compute exactly."""
        return self.budget_range is not None and budget is not None and budget >= 1.0

    def shifts_at(self, budget: float | None) -> tuple[float, float]:
        """The (token, width) logit shifts of a budget-conditioned model at ``budget`` (None:
        the model's): its ``budget_shift`` table (set by the sampler fit, sampling/budget.py),
        interpolated between the grid's budgets. (0, 0) for a single-budget model, whose fit
        moves the biases themselves."""
        table = getattr(self, "budget_shift", None)
        if table is None:
            return 0.0, 0.0
        b = self.budget if budget is None else budget
        stamp = (table._version, b)
        with self.lock:
            kept = self.__dict__.setdefault("_shifts", {})
            if stamp not in kept:
                if len(kept) > 1024:  # budgets turned per request: bounded
                    kept.clear()
                grid, rows = shift_grid(self.budget_range), table.detach().cpu().tolist()
                kept[stamp] = tuple(interpolate(b, grid, [r[j] for r in rows]) for j in (0, 1))
            return kept[stamp]

    def _token_shift(self, call: RoutingCall, device: torch.device) -> None:
        """Set the call's (1,) token logit shift (kept per budget and device: a CUDA graph
        replays the tensor it captured; None where it is 0)."""
        shift = self.shifts_at(call.budget)[0]
        if shift == 0.0:
            call.shift = None
            return
        with self.lock:
            kept = self.__dict__.setdefault("_shift_tensors", {})
            if (shift, device) not in kept:
                if len(kept) > 1024:
                    kept.clear()
                kept[(shift, device)] = torch.tensor([shift], device=device)
            call.shift = kept[(shift, device)]

    def width_embedding(self, t: torch.Tensor, budget: float | None) -> torch.Tensor:
        """(Bt,) timesteps -> (Bt, embed): what the width routers read (t's embedding, plus
        the budget's for a budget-conditioned model; ``budget`` None: the model's)."""
        emb = self.t_embed(t)  # (Bt, embed)
        if self.b_embed is None:
            return emb
        b = self.budget if budget is None else budget
        return emb + self.b_embed(torch.tensor([b], device=t.device)).to(emb.dtype)  # (1, embed)

    def _budget_emb(self, call: RoutingCall, device: torch.device) -> torch.Tensor:
        """The call's (1, embed) budget embedding (made once per call; token routers read it).
        Without grad it is kept per budget: a CUDA graph replays the tensor it captured."""
        if call.b_emb is None:
            b = self.budget if call.budget is None else call.budget
            if torch.is_grad_enabled():
                call.b_emb = self.b_embed(torch.tensor([b], device=device))
                return call.b_emb
            stamp = (b, device, sum(p._version for p in self.b_embed.parameters()))
            with self.lock:
                kept = self.__dict__.setdefault("_b_embs", {})
                if stamp not in kept:
                    if len(kept) > 1024:  # budgets turned per request: bounded
                        kept.clear()
                    kept[stamp] = self.b_embed(torch.tensor([b], device=device))
                call.b_emb = kept[stamp]
        return call.b_emb

    def token_logits(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Site ``index``'s token router on tokens (..., N, D) -> (..., N) logits, plus the
        call's budget offset on a budget-conditioned model (one per call: a batch has one)."""
        key = str(index)
        logits = self.token[key](x)  # (..., N)
        if key in self.token_budget:
            emb = self._budget_emb(self._calls.call, logits.device)  # (1, embed)
            logits = logits + self.token_budget[key](emb).reshape(1).to(logits.dtype)
            shift = self._calls.call.shift  # the sampler fit's, at this budget
            if shift is not None:
                logits = logits + shift.to(logits.dtype)
        return logits
