"""RouterBank: every router of a converted model, and the routing state of each thread's call.

The bank is attached to the converted model as the submodule ``dynconvert``, so its parameters
are saved, moved, wrapped by DDP and copied by EMA like any others. Width masks are a function
of the timestep alone: in evaluation they come from a per-timestep table computed once per t.
What one call decides lives in its :class:`~dynconvert.runtime.call.RoutingCall`, one per
thread (call.py), so threads calling one model at once never see each other's routing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dynconvert.config import ConvertConfig
from dynconvert.errors import TimestepError
from dynconvert.inputs import batch_of, timestep_slot
from dynconvert.plan import MlpSite, Plan, Site
from dynconvert.runtime.budgets import (
    BudgetInputs,
    BudgetRange,
    check_call_budget,
    shift_grid,
)
from dynconvert.runtime.call import CallStore, RoutingCall, SharedLock
from dynconvert.runtime.checkpointing import wrap_checkpointing
from dynconvert.runtime.deferred import Deferred
from dynconvert.runtime.dynamic import SiteRuntime
from dynconvert.runtime.interfaces import Decision, MlpCall
from dynconvert.runtime.modes import ExecutionMode, execution_mode
from dynconvert.runtime.planned.planner import Planner
from dynconvert.runtime.routers import (
    BudgetEncoder,
    TimestepEncoder,
    TokenRouter,
    budget_offset,
    gumbel_sigmoid,
    no_autocast,
    width_router,
)
from dynconvert.runtime.settings import RoutingSettings, settings_of
from dynconvert.runtime.slices import SliceCache
from dynconvert.runtime.table import EvalTable
from dynconvert.runtime.timesteps import router_timesteps

MODES = ("train", "eval", "full")


class RouterBank(EvalTable, BudgetInputs, nn.Module):
    """The routers of all sites, the caches they share, and each thread's current call.

    Life of one forward call: the model's pre-hook (:meth:`root_pre_hook`) reads t and calls
    :meth:`begin`, which makes the thread's new :class:`RoutingCall`; each site's runtime
    (dynamic.py) then asks for its masks (:meth:`width_mask`, :meth:`token_mask`) the first
    time one of its Linears runs, and what it used is left in the call's ``records`` (masks and
    token counts per site), which the FLOPs accountant (flops.py) reads after the call, in the
    same thread. The per-call methods here answer for the calling thread's current call.
    """

    def __init__(
        self,
        plan: Plan,
        config: ConvertConfig,
        budget: float,
        budget_range: BudgetRange | None = None,
    ):
        super().__init__()
        self.plan = plan
        self.config = config
        # The budget calls run at when none is chosen (set_budget changes it; for a single-budget
        # model the one it was converted for), and the range a budget-conditioned model was
        # converted for (budgets.py; None: a single-budget model, whose routers read t alone).
        self.budget = budget
        self.budget_range = tuple(budget_range) if budget_range is not None else None
        # Width routers see only an embedding of t (docs/method.md, "Timestep-wise dynamic
        # width"): one shared sinusoidal encoder, then one Linear per site to its units' logits.
        self.t_embed = TimestepEncoder(config.router_embed_dim)
        self.width = nn.ModuleDict()  # str(site index) -> Linear(embed, units)
        self.token = nn.ModuleDict()  # str(site index) -> TokenRouter (D -> D/r -> 1), MLPs only
        for s in plan.sites:
            if s.units > 1:  # a single unit is always on: nothing to route
                self.width[str(s.index)] = width_router(
                    config.router_embed_dim, s.units, config.width_bias_init
                )
            if isinstance(s, MlpSite) and s.token:
                self.token[str(s.index)] = TokenRouter(
                    s.in_features, config.token_reduction, config.token_bias_init
                )
        # A budget-conditioned model's routers also read the call's budget: its embedding is
        # added to t's for the width routers, and gives each token router a logit offset.
        self.b_embed = BudgetEncoder(config.router_embed_dim) if self.budget_range else None
        self.token_budget = nn.ModuleDict()  # str(site index) -> Linear(embed, 1), ranges only
        if self.budget_range:
            for key in self.token:
                self.token_budget[key] = budget_offset(config.router_embed_dim)
            # The sampler fit's threshold shifts per budget of shift_grid (budgets.py):
            # (grid budgets, [token, width]) logits, zero until fitted (sampling/budget.py).
            grid = shift_grid(self.budget_range)
            self.register_buffer("budget_shift", torch.zeros(len(grid), 2))
        self.lora_gates = nn.ModuleDict()  # TD-LoRA gates (lora_run.py); empty unless trained
        # The unit of each site that is never switched off (chosen by importance at convert
        # time); a buffer so it is saved, moved and loaded with the routers.
        self.register_buffer("always_on", torch.zeros(len(plan.sites), dtype=torch.long))
        # The model's defaults (set_routing); a thread's `with routing(...)` overrides them.
        self.mode: str | None = None  # routing.MODES, or None: follow model.training
        # The evaluation execution mode (modes.py), by name in ``execution``.
        self._execution: ExecutionMode = execution_mode("fast")
        self.runtimes: list[SiteRuntime] = []  # one per site, in plan order (set by convert)
        self._calls = CallStore()  # each thread's current RoutingCall
        self.lock = SharedLock()  # guards what every thread's calls fill: table, planner
        # Evaluation width masks (table.py) per (budget, t): {(budget or None, t): (cpu masks,
        # device masks)}, valid while _table_key (router parameter versions) is unchanged.
        self._table: dict[tuple, tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]] = {}
        self._table_key: tuple | None = None
        self.slices = SliceCache(self.cache_limit)
        self.planner = Planner(self)  # patterns, pre-sliced weights and capacities (planned path)
        self.model_params = 0  # parameter count of the whole model: sizes the slice cache
        # Converted on the meta device: what convert does once the weights arrive (routers
        # seeded, always-on units, the fast-path check); None once done (state.py).
        self.deferred: Deferred | None = None

    # -- per call --------------------------------------------------------------------------
    def set_timestep_spec(self, model: nn.Module) -> None:
        """Remember where the timestep sits in the model's forward signature."""
        self.t_spec = (self.plan.timestep_arg, *timestep_slot(model, self.plan.timestep_arg))

    # Under torch.compile this hook runs eagerly: reading t on the host is the one graph break
    # of a forward (and the planned path keeps it the only one, see planner.py).
    @torch.compiler.disable
    def root_pre_hook(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        """Forward pre-hook of the converted model: read t (and the call's ``dynconvert_budget``
        keyword, which the model's own forward never sees) and start the call."""
        if "dynconvert_budget" in kwargs:
            kwargs = dict(kwargs)
            budget = check_call_budget(
                kwargs.pop("dynconvert_budget"), self.budget_range, self.budget
            )
            self._begin_hooked(model, args, kwargs, budget)
            return args, kwargs
        self._begin_hooked(model, args, kwargs, None)
        return None

    def _begin_hooked(self, model: nn.Module, args: tuple, kwargs: dict, budget: Any) -> None:
        """The pre-hook's work: t from the call's arguments, then :meth:`begin`."""
        if self.deferred is not None:  # converted on meta: the weights may have arrived since
            bank = self.deferred.finish(model)  # convert may have redone it: its bank then
            if bank is not self:
                return bank._begin_hooked(model, args, kwargs, budget)
        name, pos, default = self.t_spec
        in_args = pos is not None and pos < len(args)
        t = kwargs[name] if name in kwargs else (args[pos] if in_args else default)
        # The batch: the FLOPs accountant maps folded rows back to it; per-frame t reduce to it.
        self.begin(t, model.training, model, batch_of(args, kwargs), budget)
        if torch.is_grad_enabled():  # a checkpointed block must recompute with this call's routing
            wrap_checkpointing(model, self)

    def current_call(self) -> RoutingCall:
        """This thread's call: the one running, else its last (before its first: a full one)."""
        return self._calls.call

    def set_call(self, call: RoutingCall) -> RoutingCall:
        """Make ``call`` the calling thread's current call; returns the one it replaces (a
        checkpointed block's recomputation runs under its own call, checkpointing.py)."""
        outer, self._calls.call = self._calls.call, call
        return outer

    def settings_now(self) -> RoutingSettings:
        """What a call begun now in this thread runs with (settings.py): the thread's
        ``with routing(...)`` override, else the model's defaults (``set_routing``)."""
        return settings_of(self, RoutingSettings(self.mode, self._execution))

    def begin(
        self,
        t: Any,
        training: bool,
        model: nn.Module | None = None,
        batch: int | None = None,
        budget: float | None = None,
    ) -> RoutingCall:
        """Start one forward call of the model at timestep(s) ``t`` in this thread (``model``:
        the converted model, which the planned path needs to see its weights; ``batch``: its
        batch size, None if unknown; ``budget``: the call's own, checked, else the thread's
        ``with budget(...)`` or the model's). Returns the call, now the thread's current one."""
        settings = self.settings_now()
        self.set_call(call := RoutingCall(settings, len(self.runtimes), self._calls.call))
        call.batch = batch or 0
        call.mode = settings.mode or ("train" if training else "eval")
        if self.budget_range is not None:  # only a range's routers read the budget
            call.budget = budget if budget is not None else (settings.budget or self.budget)
        if batch == 0 or self.runs_full(call.budget):  # nothing to route, or the range's 1.0
            call.mode = "full"
        if call.mode == "full" and not len(self.lora_gates):  # TD-LoRA gates read t
            return call
        if t is None:
            raise TimestepError(
                f"the model was called without its timestep argument {self.plan.timestep_arg!r}; "
                "dynconvert routers need it"
            )
        device = self.always_on.device
        call.t = t = router_timesteps(t, call.batch, self.plan, self.config, device)  # (Bt,)
        if call.mode == "full":
            return call
        # Training masks are drawn here, before any block: a checkpointed block's recomputation
        # must not be the one that draws them, and the draw order then does not depend on it.
        self.ensure_train_masks()
        if len(self.token_budget):  # the token routers' budget embedding and shift too: made
            self._budget_emb(call, device)  # on the host side, outside any checkpointed or
            self._token_shift(call, device)  # captured block
        if call.mode == "eval":
            call.eval_cpu, call.eval_masks, values = self._lookup(t, call.budget)
            if self.config.fast_path:  # off: evaluation stays masked (the debugging reference)
                call.execution = settings.execution.resolve(device.type)
            call.execution.begin(self, values, model)
        return call

    @property
    def execution(self) -> str:
        """The name of the evaluation execution mode ("fast", "masked", "planned", "auto" or
        one registered since; modes.py). Setting an unknown name raises ConfigError."""
        return self._execution.name

    @execution.setter
    def execution(self, mode: str | ExecutionMode) -> None:
        self._execution = execution_mode(mode)

    # -- the calling thread's current call ------------------------------------------------------
    @property
    def mode_now(self) -> str:
        """The routing mode of the current call ("train", "eval" or "full")."""
        return self._calls.call.mode

    @property
    def execution_now(self) -> ExecutionMode:
        """How the current call computes: its resolved execution mode (masked unless eval)."""
        return self._calls.call.execution

    @property
    def records(self) -> dict[int, dict[str, Any]]:
        """What each site used in the current call (read by the FLOPs accountant)."""
        return self._calls.call.records

    @records.setter
    def records(self, value: dict[int, dict[str, Any]]) -> None:
        self._calls.call.records = value  # a replayed CUDA graph's records (graphs.py)

    def fast_for(self, site: Site) -> bool:
        """Whether this site runs sliced (fast or planned path) in the current call."""
        return self._calls.call.execution.sliced and site.fast

    @property
    def planned_now(self) -> bool:
        """Whether the current call has static shapes (the planned path, planner.py)."""
        return self._calls.call.execution.static_shapes

    def decision(self, runtime: SiteRuntime, device: torch.device) -> Decision | None:
        """The units a sliced site computes in this call, from the call's execution mode."""
        return self._calls.call.execution.decision(self, runtime, device)

    def begin_mlp(self, runtime: SiteRuntime, x: torch.Tensor) -> MlpCall | None:
        """A sliced MLP call begun by the execution mode, or None: the runtime begins it."""
        return self._calls.call.execution.begin_mlp(self, runtime, x)

    def record(self, index: int) -> dict[str, Any]:
        """What site ``index`` used in this call: "width" (Bt, U), "tokens" (B, N), "n"/"m"
        (query / key-value token counts), read by the FLOPs accountant."""
        return self._calls.call.records.setdefault(index, {})

    # -- masks ------------------------------------------------------------------------------
    def width_mask(self, index: int) -> torch.Tensor | None:
        """(Bt, units) mask of one site for this call; None when every unit is on."""
        call = self._calls.call
        rec = call.records.setdefault(index, {})
        if "width" in rec:
            return rec["width"]
        key = str(index)
        if call.mode == "full" or key not in self.width:
            mask = None
        elif call.mode == "train":
            if call.train_masks is None:
                call.train_masks = self._all_train_masks(call)
            mask = call.train_masks[index]
        else:
            mask = call.eval_masks.get(index)
        rec["width"] = mask
        return mask

    def _all_train_masks(self, call: RoutingCall) -> dict[int, torch.Tensor]:
        """Training masks of every site at once: one matmul and one Gumbel draw for all routers
        (the same as running each router alone, with far fewer kernel launches)."""
        keys = list(self.width.keys())
        call.emb = self.width_embedding(call.t, call.budget)  # (Bt, embed)
        weight = torch.cat([self.width[k].weight for k in keys])
        bias = torch.cat([self.width[k].bias for k in keys])
        sizes = [self.width[k].out_features for k in keys]
        # Cast: stored in float8 under layerwise casting, the routers compute in emb's dtype.
        weight, bias = weight.to(call.emb.dtype), bias.to(call.emb.dtype)
        bias = bias + self.shifts_at(call.budget)[1]  # the sampler fit's (ranges only; else 0)
        with no_autocast(call.emb.device):  # in the routers' dtype under autocast too
            logits = torch.nn.functional.linear(call.emb, weight, bias)  # (B, sum of units)
        on = self._always_on_positions(keys, sizes, logits.device)
        masks = gumbel_sigmoid(logits, self.config.tau)
        masks = torch.where(on, torch.ones_like(masks), masks)
        return {int(k): m for k, m in zip(keys, masks.split(sizes, dim=-1))}

    def _always_on_positions(
        self, keys: list[str], sizes: list[int], device: torch.device
    ) -> torch.Tensor:
        """(sum of units,) bool: the always-on unit of each router in the concatenated logits
        (cached: rebuilding it every training step would sync the device)."""
        stamp = (self.always_on._version, device, tuple(keys))
        cached = getattr(self, "_on_cache", None)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        pos, offset = [], 0
        for k, n in zip(keys, sizes):
            pos.append(offset + int(self.always_on[int(k)]))
            offset += n
        on = torch.zeros(offset, dtype=torch.bool)
        on[pos] = True
        on = on.to(device)
        self._on_cache = (stamp, on)
        return on

    def width_mask_cpu(self, index: int) -> torch.Tensor | None:
        """The evaluation width mask of a site on the CPU (decisions without a device sync)."""
        return self._calls.call.eval_cpu.get(index)

    def token_mask(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """Mask over the leading dims of ``x`` (batch, tokens); None when tokens are not routed."""
        key = str(index)
        call = self._calls.call
        if call.mode == "full" or key not in self.token:
            return None
        logits = self.token_logits(index, x)  # (B, N): one logit per token
        if call.mode == "train":
            # Inside a checkpointed block the noise is kept and replayed by its recomputation.
            noise = call.replay.noise(index, logits) if call.replay is not None else None
            return gumbel_sigmoid(logits, self.config.tau, noise=noise)
        return logits > 0

    def ensure_train_masks(self) -> None:
        """Draw this training call's width masks now, if not yet drawn (checkpointing.py)."""
        call = self._calls.call
        if call.mode == "train" and len(self.width) and call.train_masks is None:
            call.train_masks = self._all_train_masks(call)

    # -- weight slices ------------------------------------------------------------------------
    def sliced(
        self, lin: nn.Linear, axis: str, units: tuple[int, ...], index: torch.Tensor
    ) -> tuple:
        """Weight (and bias) of ``lin`` restricted to ``index`` rows/cols, from the call's
        execution mode (:class:`SliceCache`; on the planned path the planner's slices)."""
        return self._calls.call.execution.weights(self, lin, axis, units, index)

    @property
    def slice_bytes(self) -> int:
        """Bytes the weight-slice cache and the planned path's pre-sliced weights hold now."""
        return self.slices.nbytes + self.planner.store_bytes

    def cache_limit(self, element_size: int = 4) -> float:
        """Bytes the weight-slice cache may hold: ``slice_cache_mb``, or by default 20% of the
        model's parameter bytes (so a converted model stays within 1.25x the original's memory)."""
        if self.config.slice_cache_mb is not None:
            return self.config.slice_cache_mb * 2**20
        return 0.2 * self.model_params * element_size

    def clear_cache(self) -> None:
        """Drop cached weight slices, timestep tables and planned patterns (frees their memory)."""
        with self.lock:
            self.slices.clear()
            self._table, self._table_key = {}, None
            self.planner.clear()
