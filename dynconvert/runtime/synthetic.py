"""Routing set by hand: routers fixed at a keep rate or a FLOPs ratio, with no calibration.

Benchmarks time a converted model at a chosen FLOPs ratio, and tests need converted models whose
routers really switch heads, groups and tokens off; both use these functions.

Example:
    >>> import dynconvert
    >>> from dynconvert.testing import tiny_dit
    >>> model = dynconvert.convert(tiny_dit(), budget=0.5)
    >>> randomize_routing(model, keep=0.5)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from dynconvert.flops import solve_keep
from dynconvert.inputs import default_inputs, split_inputs
from dynconvert.plan import ROUTER_TIMESTEPS, MlpSite
from dynconvert.runtime.bank import RouterBank
from dynconvert.runtime.planned.controls import planner_of, set_token_capacity
from dynconvert.runtime.routing import routing
from dynconvert.runtime.state import get_state


def randomize_routing(
    model: nn.Module,
    keep: float = 0.5,
    seed: int = 0,
    *,
    tokens: float | None = None,
    vary_with_t: bool = True,
    example_inputs: Any = None,
) -> None:
    """Set the routers so that roughly ``keep`` of heads and groups (and ``tokens`` of tokens,
    default ``keep``) are on in evaluation.

    With ``vary_with_t`` the width masks change with the timestep (each unit on for about
    ``keep`` of the timesteps); without it exactly ``round(keep * units)`` units are on at every
    t. Token routers get random weights and a bias at the quantile that keeps the requested
    fraction of tokens of ``example_inputs`` (default: the model's own example inputs), and a
    capacity for the planned path: that fraction plus ``PlannedOptions.capacity_margin`` (so
    an uncalibrated model runs planned, with no overflow on those inputs). A budget-conditioned
    model is set at its budget now (``set_budget``; the budget's embedding and token offsets
    count), with its sampler-fit shifts cleared; other budgets keep other fractions.
    """
    bank = get_state(model)
    tokens = keep if tokens is None else tokens
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if getattr(bank, "budget_shift", None) is not None:  # a sampler fit's: set by hand now
            bank.budget_shift.zero_()
        grid = torch.arange(ROUTER_TIMESTEPS, dtype=torch.float32, device=bank.always_on.device)
        emb = bank.width_embedding(grid, None)  # (1000, embed): a range's at its budget too
        for key, router in bank.width.items():
            units = router.out_features
            on = int(bank.always_on[int(key)])
            if vary_with_t:
                router.weight.copy_(
                    torch.randn(router.weight.shape, generator=g)
                    * 3
                    / math.sqrt(router.in_features)
                )
                raw = (emb @ router.weight.T).cpu()  # (1000, U): each unit on for `keep` of the t
                router.bias.copy_(_threshold(raw, keep, dim=0))
            else:
                router.weight.zero_()
                k = max(1, min(units, round(keep * units)))
                others = [u for u in torch.randperm(units, generator=g).tolist() if u != on]
                chosen = set([on, *others[: k - 1]])
                router.bias.copy_(
                    torch.tensor([1.0 if u in chosen else -1.0 for u in range(units)])
                )
        if bank.token:
            _randomize_tokens(model, bank, tokens, g, example_inputs)
    bank.clear_cache()


def _threshold(raw: torch.Tensor, keep: float, dim: int | None = None) -> torch.Tensor:
    """The bias that puts ``keep`` of the ``raw`` logits above 0 (along ``dim``, or overall)."""
    if keep >= 1:
        low = raw.min() if dim is None else raw.min(dim).values
        return 1.0 - low
    if keep <= 0:
        high = raw.max() if dim is None else raw.max(dim).values
        return -1.0 - high
    return -torch.quantile(raw, 1.0 - keep, dim=dim)


def _randomize_tokens(
    model: nn.Module, bank: RouterBank, keep: float, g: torch.Generator, example_inputs: Any
) -> None:
    """Random token routers whose thresholds keep ``keep`` of the tokens each site really sees.

    One evaluation call sets them site by site: just before each MLP runs, its router's bias is
    put at the quantile of the logits of the tokens reaching it (so later blocks see the effect
    of earlier skips, as they will at run time).
    """
    inputs = split_inputs(example_inputs) if example_inputs is not None else default_inputs(model)
    modules = dict(model.named_modules())
    for router in bank.token.values():
        router.net[0].bias.fill_(1.0)  # keep the hidden ReLUs mostly active: no ties at logit 0
        last = router.net[2]
        last.weight.copy_(
            torch.randn(last.weight.shape, generator=g) * 2 / math.sqrt(last.in_features)
        )
        last.bias.zero_()
    handles = []
    kept: dict[int, float] = {}  # site -> fraction of the tokens kept on these inputs
    for s in bank.plan.sites:
        if isinstance(s, MlpSite) and s.token:
            router = bank.token[str(s.index)]

            def set_bias(
                mod: nn.Module, args: tuple, router: nn.Module = router, index: int = s.index
            ) -> None:
                with torch.no_grad():
                    last = router.net[2]
                    last.bias.zero_()  # the logits as the call reads them (a range's offset)
                    logits = bank.token_logits(index, args[0]).flatten().float().cpu()
                    last.bias.copy_(_threshold(logits, keep))
                    kept[index] = float((bank.token_logits(index, args[0]) > 0).float().mean())

            handles.append(modules[s.fc1[0]].register_forward_pre_hook(set_bias))
    try:
        with routing(model, "eval", "masked"), torch.no_grad():
            _output(model, inputs)
    finally:
        for h in handles:
            h.remove()
    margin = planner_of(model).options.capacity_margin
    set_token_capacity(model, {i: min(1.0, f + margin) for i, f in kept.items()})


def synthetic_routing(
    model: nn.Module, ratio: float, tokens: float = 0.7, inputs: Any = None, seed: int = 0
) -> dict[str, float]:
    """Set fixed routing (the same at every t) whose whole-model FLOPs ratio is about ``ratio``.

    Heads and channel groups get the same kept fraction, chosen so that with ``tokens`` of the
    tokens kept the ratio is met; the token keep rate is then re-solved for the rounded unit
    counts and the token routers' thresholds are set on ``inputs``.

    Returns the fractions used (``width``, ``tokens``).
    """
    bank = get_state(model)
    if ratio >= 1.0:  # everything on: the cost of a converted model that skips nothing
        randomize_routing(
            model, keep=1.0, tokens=1.0, vary_with_t=False, seed=seed, example_inputs=inputs
        )
        return {"width": 1.0, "tokens": 1.0}
    width, token_keep = solve_keep(bank.plan, bank.config.token_reduction, ratio, tokens)
    randomize_routing(
        model, keep=width, tokens=token_keep, vary_with_t=False, seed=seed, example_inputs=inputs
    )
    return {"width": width, "tokens": token_keep}


def _output(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Run a model on (args, kwargs) or a tuple/dict and return its output tensor."""
    args, kwargs = split_inputs(inputs)
    out = model(*args, **kwargs)
    return out.sample if hasattr(out, "sample") else out
