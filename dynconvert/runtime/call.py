"""The routing state of one forward call, kept per thread.

A converted model is one object that several threads may call at once (a server answering
requests, an evaluation on a thread pool). Nothing a call decides is therefore kept in
attributes of the model, its RouterBank or its site runtimes, which every caller shares:
:class:`RoutingCall` holds everything one forward call decides and records (its settings, its
routing and execution mode, its timesteps and masks, the per-site records the FLOPs accountant
reads, the planned path's pattern, and what each site has in progress: an MLP call from fc1 to
fc2, an attention call's sliced decision). The RouterBank keeps each thread's current call in a
:class:`CallStore` (a thread-local): a call begun in one thread is never seen by another, and
it stays readable after the forward returns (``last_flops_ratio``, ``bank.records``) until that
thread's next call of the model. What a call runs with is resolved when it begins
(settings.py).

Example:
    >>> call = RoutingCall()
    >>> call.mode, call.execution.name, call.records
    ('full', 'masked', {})
    >>> RoutingCall(sites=2).records
    {0: {}, 1: {}}
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from dynconvert.runtime.modes import ExecutionMode, execution_mode
from dynconvert.runtime.settings import RoutingSettings
from dynconvert.runtime.shared import PerThread, SharedLock

__all__ = ["CallStore", "PerThread", "RoutingCall", "SharedLock"]


class RoutingCall:
    """Everything one forward call of a converted model decides and records (one thread's)."""

    __slots__ = (
        "settings", "mode", "execution", "t", "emb", "train_masks", "eval_masks", "eval_cpu",
        "records", "batch", "replay", "pattern", "counter", "progress", "ran", "budget",
        "b_emb", "shift",
    )  # fmt: skip

    def __init__(self, settings: RoutingSettings | None = None, sites: int = 0, last: Any = None):
        """``sites``: the model's number of sites; their records and progress entries are made
        now, so these dicts keep one size through the call (torch.compile guards on a dict's
        size: growing site by site, it recompiled each site's code for every size)."""
        self.settings = settings or RoutingSettings()
        self.mode = "full"  # "train", "eval" or "full": how this call routes
        # How it computes: the resolved execution mode in evaluation, full width (masked) else.
        self.execution: ExecutionMode = execution_mode("masked")
        self.t: torch.Tensor | None = None  # (Bt,) timesteps on the routers' 0..1000 scale
        self.emb: torch.Tensor | None = None  # (Bt, embed) timestep embedding (training)
        # The call's FLOPs budget (a budget-conditioned model; None for a single-budget one: its
        # routers do not read it) and its (1, embed) embedding, made once per call.
        self.budget: float | None = None
        self.b_emb: torch.Tensor | None = None
        # Its token logit shift from the sampler fit at that budget ((1,); None: none).
        self.shift: torch.Tensor | None = None
        self.train_masks: dict[int, torch.Tensor] | None = None  # site -> (Bt, units), drawn once
        self.eval_masks: dict[int, torch.Tensor] = {}  # site -> (Bt, units) bool, device
        self.eval_cpu: dict[int, torch.Tensor] = {}  # the same on the CPU (host decisions)
        # What each site used: "width", "tokens", "n", "rows", ... (read by flops.py).
        self.records: dict[int, dict[str, Any]] = {i: {} for i in range(sites)}
        self.batch = 0  # the model's batch (blocks that fold frames into it see more rows)
        self.replay: Any = None  # NoiseReplay of the checkpointed block running, if any
        self.pattern: Any = None  # the planned path's Pattern of this call
        self.counter: torch.Tensor | None = None  # planned: this thread's (dropped, wanted)
        # Site index -> what it has in progress: an MlpCall from fc1 to fc2, or an attention
        # call's sliced Decision between its pre- and post-hook.
        self.progress: dict[int, Any] = dict.fromkeys(range(sites))
        # Site index -> the decision of this thread's last call whose attention projections ran
        # (a cache hook may hand back an older output): carried over from ``last``, the
        # thread's previous call.
        self.ran: dict[int, Any] = (
            last.ran if last is not None and len(last.ran) == sites else dict.fromkeys(range(sites))
        )


class CallStore(threading.local):
    """The current :class:`RoutingCall` of each thread (a fresh, full one before any call).

    A copy (``copy.deepcopy`` of the model, as EMA makes) or a pickle starts empty: calls belong
    to the threads that made them, not to the object.
    """

    def __init__(self):
        self.call = RoutingCall()

    def __reduce__(self) -> tuple:
        return (CallStore, ())
