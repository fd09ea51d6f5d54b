"""Gradient checkpointing of a converted model: a recomputed block routes as it did the first time.

diffusers checkpoints a block by calling ``module._gradient_checkpointing_func(block, *args)``
(set by ``enable_gradient_checkpointing()``); backward then runs the block a second time to
rebuild its activations, and that recomputation must save exactly the tensors the first run
saved, with the same values. Routing breaks both unless the second run sees the first run's
routing state:

- the training width masks of a call are drawn once, lazily, by the first block that asks:
  drawn inside a checkpointed block, the recomputation (which finds them drawn) saves fewer
  tensors. They are drawn before the first checkpointed block instead;
- the token routers draw Gumbel noise in every block: the recomputation must add the same
  noise, so each checkpointed block call keeps its draws (:class:`NoiseReplay`) and replays them;
- backward may run after later forward calls of the model (two calls, one loss), and in
  another thread (the autograd engine's, on a GPU): the recomputation makes its own call (masks,
  records) the running thread's current one and puts that thread's back afterwards;
- what the recomputation records (token masks, with the recomputed graph behind them) goes
  into copies of the call's records, dropped with it: kept in the call's own records they
  would hold every recomputed block's activations until the next forward.

:func:`wrap_checkpointing` wraps the checkpointing function of every module that has one, once;
the RouterBank calls it at the start of every forward call with autograd on.
"""

from __future__ import annotations

import copy
from typing import Any, Protocol

import torch
from torch import nn

from dynconvert.runtime.routers import logistic_noise

_BANK = "_dynconvert_bank"  # attribute of our wrapper: the bank it routes for
FUNC = "_gradient_checkpointing_func"
"""The attribute diffusers' ``enable_gradient_checkpointing`` sets on the modules it checkpoints."""


class NoiseReplay:
    """The token-router noise of one checkpointed block call: drawn on the first run, replayed on
    the recomputation (keyed by site and by how often the site ran in this block call)."""

    def __init__(self):
        self.draws: dict[tuple[int, int], torch.Tensor] = {}
        self.seen: dict[int, int] = {}

    def start(self) -> NoiseReplay:
        """Begin a run of the block (the first or the recomputation)."""
        self.seen = {}
        return self

    def noise(self, index: int, logits: torch.Tensor) -> torch.Tensor:
        """Logistic noise for site ``index``'s logits: the stored draw, or a new one stored."""
        n = self.seen.get(index, 0)
        self.seen[index] = n + 1
        key = (index, n)
        draw = self.draws.get(key)
        if draw is None or draw.shape != logits.shape:
            draw = self.draws[key] = logistic_noise(logits)
        return draw


class CheckpointedBank(Protocol):
    """What checkpointing asks of the RouterBank (bank.py, which imports this module)."""

    def ensure_train_masks(self) -> None:
        """Draw this training call's width masks now, if not yet drawn."""
        ...

    def current_call(self) -> Any:
        """The calling thread's current RoutingCall (call.py); its ``replay`` is the noise of
        the checkpointed block running, if any."""
        ...

    def set_call(self, call: Any) -> Any:
        """Make ``call`` the calling thread's current call; returns the one it replaces."""
        ...


def wrap_checkpointing(model: nn.Module, bank: CheckpointedBank) -> None:
    """Wrap the checkpointing function of every module of ``model`` that has one (idempotent).

    Cheap when nothing changed: the modules that can hold one are found once, and a function
    already wrapped for this bank is left alone.

    Example:
        >>> model.enable_gradient_checkpointing()   # doctest: +SKIP
        >>> wrap_checkpointing(model, get_state(model))  # the bank does this on every call
    """
    owners = bank.__dict__.get("_ckpt_owners")
    if owners is None:
        # diffusers sets the function on the modules that have a `gradient_checkpointing` flag
        owners = [
            m
            for m in model.modules()
            if "gradient_checkpointing" in m.__dict__ or FUNC in m.__dict__
        ]
        bank.__dict__["_ckpt_owners"] = owners
    for m in owners:
        func = m.__dict__.get(FUNC)
        if func is None or getattr(func, _BANK, None) is bank:
            continue
        while getattr(func, _BANK, None) is not None:  # wrapped for another bank (a deepcopy)
            func = func.__wrapped__
        m.__dict__[FUNC] = _wrap(func, bank)


def _wrap(func: Any, bank: CheckpointedBank) -> Any:
    """``func(block, *args)`` -> the same, with the block run under its own call's routing."""

    def checkpointed(block: Any, *args: Any, **kwargs: Any) -> Any:
        bank.ensure_train_masks()  # drawn outside the checkpointed region (see the module doc)
        call = bank.current_call()  # this forward call's routing, for the recomputation too
        replay = NoiseReplay()
        runs = []  # one entry per run of the block: the first, then the recomputation

        def run(*a: Any, **k: Any) -> Any:
            # The recomputation records into copies: what it records (token masks) holds its
            # own graph, which would keep the recomputed activations alive until the next call.
            mine = call if not runs else _recomputing(call)
            runs.append(1)
            outer = bank.set_call(mine)
            outer_replay, mine.replay = mine.replay, replay.start()
            try:
                return block(*a, **k)
            finally:
                mine.replay = outer_replay
                bank.set_call(outer)

        return func(run, *args, **kwargs)

    checkpointed.__wrapped__ = func
    setattr(checkpointed, _BANK, bank)
    return checkpointed


def _recomputing(call: Any) -> Any:
    """A copy of ``call`` for a block's recomputation: its records are copies, one level deep."""
    mine = copy.copy(call)
    mine.records = _copies(call.records)
    return mine


def _copies(records: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """A copy of a call's records, one level deep (the recomputation's writes stay in it)."""
    return {i: dict(r) for i, r in records.items()}
