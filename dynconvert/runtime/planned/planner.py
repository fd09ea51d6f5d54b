"""Planned execution: a static-shape inference plan per timestep, for GPUs (and any device).

(The runtime of the "planned" execution mode, modes.py; the user-facing functions are in
controls.py.)

The fast path decides per call and per site (Python work on the host) and gathers the selected
tokens with ``nonzero`` (a host sync per site): shapes depend on data, so it can be neither
captured in a CUDA graph nor compiled without a graph break per site. The planned path fixes
every shape on the host before the call:

- **Width patterns.** Width routers read only t, so the heads and channel groups of every site
  are a function of t. At the start of a call (the one host read: the timestep values) the
  timesteps are mapped to a *pattern*, shared by every t with the same width masks and the
  same token capacities. Per pattern each site's decision (units, rows, columns) is built once,
  and the weights are sliced once into contiguous copies per (Linear, unit set), shared by the
  patterns that reuse a unit set, within a byte cap (default: the model's own parameter bytes).
  Beyond the cap a pattern's weights are gathered inside the forward (``index_select``: the
  same static shapes, slower, never a crash).
- **Fixed-capacity token routing.** Each token-routed MLP site has a capacity per t: a fraction
  of the tokens of the call, measured on real data (calibration's FLOPs profile, stored in the
  saved record) or by ``randomize_routing`` on its example inputs. With ``k`` rows of capacity
  the site takes the top-k token logits over batch x tokens, gathers them, runs the MLP, keeps
  only the rows whose logit passes the threshold (> 0) and scatters back into zeros. Whenever
  the number of tokens over the threshold fits ``k`` this equals the threshold rule exactly;
  tokens beyond it (the lowest logits) are dropped and counted on the device
  (:func:`token_overflow` reads the count once, e.g. after a sampling call).
- **Where gathering cannot pay** (no capacity known, fewer rows than ``min_gather_rows``, or a
  capacity above ``max_gather_fraction`` of the rows) the site runs the MLP on every token and
  zeroes the skipped ones (exactly the threshold rule); the FLOPs accountant counts what ran
  (``executed_tokens`` in the site's record: the capacity, or all tokens).

Nothing after the timestep read depends on data: no ``nonzero``, no ``.item()``, no shape
that varies with the input values. That is what CUDA graphs (graphs.py) and torch.compile need.

Threads: patterns and pre-sliced weights are shared by every thread calling the model, and
built under the bank's lock; the pattern a call runs is kept in its RoutingCall (call.py), and
each thread counts its overflow on a counter of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from dynconvert.plan import ROUTER_TIMESTEPS, MlpSite
from dynconvert.runtime.dynamic import DynamicConv, DynamicLinear, SiteRuntime
from dynconvert.runtime.interfaces import PATTERN_CACHE_LIMIT, CallRouting, Decision, MlpCall
from dynconvert.runtime.lora_run import adapter_cuts, adapters_stamp, base_of
from dynconvert.runtime.mlp import MlpRuntime, record_mlp_call, record_mlp_tokens
from dynconvert.runtime.planned.overflow import OverflowCounters, TokenOverflow

CAPACITY_STEPS = 32
"""Capacities are rounded up to multiples of 1/32 of the tokens, so nearby timesteps share a
pattern (and a CUDA graph)."""


@dataclass
class PlannedOptions:
    """Settings of the planned path (change them with :func:`configure_planned`).

    Attributes:
        cache_mb: MiB of pre-sliced weights the planned path may keep (None: the model's own
            parameter bytes, so a converted model stays within about 2x the original's memory).
        min_gather_rows: below this many rows (batch x tokens) a site runs its MLP on every
            token (masked) instead of gathering: gather and scatter do not pay on so few.
        max_gather_fraction: a capacity above this fraction of the rows runs masked too.
        capacity_margin: added to measured keep rates when capacities are set from data.
    """

    cache_mb: float | None = None
    min_gather_rows: int = 256
    max_gather_fraction: float = 0.85
    capacity_margin: float = 0.05


PAIR_LIMIT = 8192
"""(budget, t) pairs whose pattern ids are kept before patterns and slices start again."""


class PlannerBank(CallRouting, Protocol):
    """What the planner reads of its RouterBank (bank.py) besides a call's masks."""

    runtimes: list[SiteRuntime]  # one per site, in plan order
    token: nn.ModuleDict  # str(site index) -> TokenRouter
    model_params: int  # parameter count of the whole model: sizes the store of slices
    lock: Any  # held while the patterns and the store of slices change (threads share them)

    def token_logits(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Site ``index``'s token logits (..., N) in this call (the budget's offset included)."""
        ...

    def eval_masks_cpu(self, value: float, budget: float | None = None) -> dict[int, torch.Tensor]:
        """``{site: (1, units) bool}`` CPU width masks at one looked-up timestep value (and the
        call's budget, for a budget-conditioned model)."""
        ...


@dataclass
class SitePlan:
    """What one site computes under one pattern."""

    decision: Decision | None  # the runtime's decision (units, rows, cols, sub); None: all units
    capacity: float | None  # fraction of the call's rows the MLP may compute (token sites)


@dataclass
class Pattern:
    """One routing of a whole call: every site's decision and capacity."""

    key: tuple[int, ...]  # the pattern id of each sample's t (one id when all share it)
    sites: dict[int, SitePlan]
    sliced: bool = False  # its weights were cut into the store before a call


class Planner:
    """The planned path's state on one RouterBank: patterns, pre-sliced weights, overflow.

    The bank calls :meth:`begin` at the start of every planned call with the call's timestep
    values; the site runtimes then ask for their decision (:meth:`decision`), their weights
    (:meth:`sliced`) and, for MLPs, the token gather (:meth:`begin_mlp`), each for the calling
    thread's call.
    """

    def __init__(self, bank: PlannerBank):
        self.bank = bank
        self.options = PlannedOptions()
        self.capacity: dict[int, torch.Tensor] = {}  # site index -> (1000,) fraction per t
        # The budget the capacities hold for (a budget-conditioned model; None: every call's).
        # At another budget the token sites have no capacity: they run every token, masked.
        self.capacity_budget: float | None = None
        self.capacity_version = 0
        self.epoch = 0  # bumps whenever patterns and slices are rebuilt (graphs drop with it)
        self.calls = 0
        self._reset_state()
        self._linears: tuple[int, list[nn.Linear]] | None = None
        self._named: tuple[int, dict[str, nn.Module]] | None = None
        self._stamp: tuple | None = None
        self.overflow = OverflowCounters()  # (dropped, wanted) per thread, on the device

    def _reset_state(self) -> None:
        self.patterns: dict[tuple[int, ...], Pattern] = {}
        self._ids: dict[tuple, int] = {}  # signature of a (budget, t) -> pattern id
        self._id_of_t: dict[tuple, int] = {}  # (budget or None, t) -> pattern id
        self._rep: dict[int, tuple] = {}  # pattern id -> one (budget, t) that has it
        self.store: dict[
            tuple[str, str, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor | None]
        ] = {}
        self.store_bytes = 0
        self.uncached_slices = 0  # slices beyond the cap, gathered in the forward

    def clear(self) -> None:
        """Drop every pattern and pre-sliced weight (rebuilt on the next planned call)."""
        self._reset_state()
        self._stamp = None
        self.epoch += 1

    # -- per call -------------------------------------------------------------------------------
    def begin(self, values: list[float], table_key: tuple | None, model: nn.Module | None) -> None:
        """Pick the pattern of a call whose samples have DDPM timesteps ``values`` (host floats).

        ``table_key`` identifies the router parameters (the bank's width table key); patterns
        and slices are rebuilt whenever it, the weights, the device or the capacities change.
        The pattern becomes the calling thread's call's (:attr:`current`).
        """
        call = self.bank.current_call()
        device = self.bank.always_on.device
        with self.bank.lock:  # threads share the patterns and the store
            stamp = (table_key, self._weights_stamp(model), self.capacity_version)
            # Budgets turned per request give many (budget, t) pairs: bounded like the patterns.
            if stamp != self._stamp or len(self._id_of_t) > PAIR_LIMIT:
                self._reset_state()
                self._stamp = stamp
                self.epoch += 1
            ids = tuple(self._pattern_id((call.budget, v)) for v in values)
            key = ids[:1] if all(i == ids[0] for i in ids) else ids
            pattern = self.patterns.get(key)
            if pattern is None:
                if len(self.patterns) > PATTERN_CACHE_LIMIT:  # many mixed-t batches: bound it
                    self.patterns.clear()
                pattern = self.patterns[key] = self._build(key)
            if not pattern.sliced and not torch.is_grad_enabled():
                self._preslice(pattern, model)  # now: not inside a compiled or captured call
                pattern.sliced = True
            self.calls += 1
            counter = self.overflow.counter(device)  # made here, not in a compiled region
        call.pattern, call.counter = pattern, counter

    @property
    def current(self) -> Pattern | None:
        """The pattern of the calling thread's current call (None before a planned call)."""
        return self.bank.current_call().pattern

    def _weights_stamp(self, model: nn.Module) -> tuple:
        """Changes when any converted Linear's weight is changed, replaced or moved."""
        if self._linears is None or self._linears[0] != id(model):
            self._linears = (
                id(model),
                [m for m in model.modules() if isinstance(m, (DynamicLinear, DynamicConv))],
            )
        lins = self._linears[1]
        if not lins:
            return ()
        w0 = lins[0].weight
        return (
            sum(m.weight._version for m in lins),
            sum(m.weight.data_ptr() for m in lins),
            w0.dtype,
            w0.device,
            adapters_stamp(lins),  # LoRA layers added, edited, merged, switched or rescaled
        )

    def _pattern_id(self, bt: tuple) -> int:
        """The id of the pattern at one (budget, timestep value) (masks from the bank's eval
        table; budget None for a single-budget model)."""
        pid = self._id_of_t.get(bt)
        if pid is not None:
            return pid
        masks = self.bank.eval_masks_cpu(bt[1], bt[0])  # {site: (1, U) bool}
        sig = (
            tuple((i, m.numpy().tobytes()) for i, m in sorted(masks.items())),
            tuple((i, self._capacity_at(i, bt)) for i in sorted(self.capacity)),
            bt[0] if len(getattr(self.bank, "token_budget", ())) else None,  # token offsets
        )
        pid = self._ids.get(sig)
        if pid is None:
            pid = self._ids[sig] = len(self._ids)
            self._rep[pid] = bt
        self._id_of_t[bt] = pid
        return pid

    def _capacity_at(self, index: int, bt: tuple) -> float | None:
        """Site ``index``'s capacity at (budget, t): None where none is known."""
        table = self.capacity.get(index)
        budget, t = bt
        if table is None or (self.capacity_budget is not None and budget != self.capacity_budget):
            return None
        return float(table[min(ROUTER_TIMESTEPS - 1, max(0, int(round(t))))])

    def _build(self, key: tuple[int, ...]) -> Pattern:
        """Every site's decision and capacity for the samples' pattern ids ``key``."""
        bank = self.bank
        device = bank.always_on.device
        reps = [self._rep[i] for i in key]
        tables = [bank.eval_masks_cpu(t, b) for b, t in reps]
        sites: dict[int, SitePlan] = {}
        for rt in bank.runtimes:
            site = rt.site
            d = None
            if site.index in tables[0]:
                mask = (
                    torch.cat([tb[site.index] for tb in tables])
                    if len(reps) > 1
                    else tables[0][site.index]
                )
                d = rt.decide(mask, device)
            cap = None
            if isinstance(site, MlpSite) and site.token:
                caps = [self._capacity_at(site.index, t) for t in reps]
                cap = None if any(c is None for c in caps) else sum(caps) / len(caps)
            sites[site.index] = SitePlan(d, cap)
        return Pattern(key, sites)

    def _preslice(self, pattern: Pattern, model: nn.Module) -> None:
        """Cut the pattern's weight slices into the store (within the cap) before the call."""
        modules = self._named[1] if self._named and self._named[0] == id(model) else None
        if modules is None:
            modules = dict(model.named_modules())
            self._named = (id(model), modules)
        for rt in self.bank.runtimes:
            d = pattern.sites[rt.site.index].decision
            if d is None:
                continue
            site = rt.site
            cols = (
                d.cols
                if isinstance(d.cols, dict)
                else {getattr(site, "out", None) or site.fc2: d.cols}
            )
            for axis, items in (("rows", d.rows), ("cols", cols)):
                for name, index in items.items():
                    if name in modules:
                        lin = base_of(modules[name])  # under a LoRA layer: the routed Linear
                        if not isinstance(lin, (DynamicLinear, DynamicConv)):
                            continue  # a partial site's cut module: its output is cut, no weight
                        for mod in (lin, *adapter_cuts(lin, axis)):  # a LoRA's B rows, A cols
                            self.sliced(mod, axis, d.key, index)

    def decision(self, index: int) -> Decision | None:
        """The current pattern's decision for site ``index`` (None: compute every unit)."""
        return self.current.sites[index].decision

    # -- weights --------------------------------------------------------------------------------
    def sliced(
        self, lin: nn.Linear, axis: str, units: tuple[int, ...], index: torch.Tensor
    ) -> tuple:
        """Contiguous rows/cols of ``lin`` for a unit set: kept per (Linear, units) within the
        cap, else gathered in this forward (same shapes, no host read either way)."""
        key = (getattr(lin, "_dc_name", None) or id(lin), axis, units)  # a LoRA's A, B: by id
        hit = self.store.get(key)
        if hit is not None:
            return hit
        w = lin.weight
        if axis == "rows":
            ws = w.index_select(0, index)  # (rows on, in)
            bs = lin.bias.index_select(0, index) if lin.bias is not None else None
        else:
            ws = w.index_select(1, index)  # (out, cols on)
            bs = lin.bias
        if torch.is_grad_enabled() and w.requires_grad:
            return ws, bs
        nbytes = ws.numel() * ws.element_size() + (
            bs.numel() * bs.element_size() if axis == "rows" and bs is not None else 0
        )
        with self.bank.lock:  # outside pre-slicing (autograd on), threads may fill it at once
            if key not in self.store and self.store_bytes + nbytes <= self._limit(
                ws.element_size()
            ):
                self.store[key] = (ws, bs)
                self.store_bytes += nbytes
            elif key not in self.store:
                self.uncached_slices += 1
        return ws, bs

    def _limit(self, element_size: int) -> float:
        if self.options.cache_mb is not None:
            return self.options.cache_mb * 2**20
        return float(self.bank.model_params * element_size)

    # -- tokens ---------------------------------------------------------------------------------
    def capacity_rows(self, capacity: float | None, rows: int) -> int | None:
        """Rows the MLP computes at a site, or None: run it on every row (masked)."""
        if capacity is None or rows < self.options.min_gather_rows:
            return None
        k = min(rows, max(1, math.ceil(capacity * rows - 1e-6)))
        if k >= rows or k > self.options.max_gather_fraction * rows:
            return None
        return k

    def begin_mlp(self, rt: MlpRuntime, x: torch.Tensor) -> MlpCall:
        """Start a planned MLP call at its input x (B, N, D), sliced as the pattern says.

        As on the fast path, plus ``keep``: a (K, 1) or (B, N, 1) multiplier that zeroes the
        computed rows whose token is under the threshold (None: tokens are not routed here).
        """
        site, bank = rt.site, self.bank
        rec = bank.record(site.index)
        lead = x.shape[:-1]  # (B, N) or (B, H, W)
        rows = math.prod(lead)
        record_mlp_call(site, rec, lead)
        plan = self.current.sites[site.index]
        width = bank.width_mask(site.index) if site.width else None
        call = MlpCall(x=x, sliced=True, lead=lead, width=width, decision=plan.decision, x_sel=x)
        if site.token and str(site.index) in bank.token:
            logits = bank.token_logits(site.index, x)  # (B, N): one logit per token
            on = logits > 0
            call.tokens = on
            k = self.capacity_rows(plan.capacity, rows)
            if k is None:  # every row computed, skipped tokens zeroed: the threshold rule
                call.keep = on.unsqueeze(-1)
                record_mlp_tokens(site, rec, on, 1.0)
            else:
                top, idx = torch.topk(logits.reshape(-1), k, sorted=False)  # (K,), (K,)
                keep = top > 0
                call.idx = idx
                call.x_sel = x.reshape(-1, x.shape[-1]).index_select(0, idx)  # (K, D)
                call.keep = keep.unsqueeze(-1)
                record_mlp_tokens(site, rec, on, k / rows)
                wanted = on.sum()  # (): tokens over the threshold
                self._count(torch.stack([wanted - keep.sum(), wanted]))
        return call

    @property
    def distinct_t_patterns(self) -> int:
        """Distinct per-timestep patterns seen (a mixed-t call combines several)."""
        return len(self._ids)

    def _count(self, delta: torch.Tensor) -> None:
        """Add (dropped, wanted) to this thread's device counter (no host read)."""
        counter = self.bank.current_call().counter
        counter.add_(delta.to(counter.device))

    def read_overflow(self, reset: bool = True) -> TokenOverflow:
        """The overflow counted since the last reset, by every thread (overflow.py)."""
        with self.bank.lock:
            out = self.overflow.read(self.calls, reset)
        if reset:
            self.calls = 0
        return out
