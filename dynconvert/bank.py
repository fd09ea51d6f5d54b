"""RouterBank: every router of a converted model, and the routing state of the current call.

The bank is attached to the converted model as the submodule ``dynconvert``, so its parameters
are saved, moved, wrapped by DDP and copied by EMA like any others. Width masks are a function
of the timestep alone: in evaluation they come from a per-timestep table computed once per t.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dynconvert.config import ConvertConfig
from dynconvert.errors import TimestepError
from dynconvert.inputs import timestep_slot
from dynconvert.plan import MlpSite, Plan, Site
from dynconvert.routers import TimestepEncoder, TokenRouter, gumbel_sigmoid, width_router
from dynconvert.slices import SliceCache

MODES = ("train", "eval", "full")


class RouterBank(nn.Module):
    """The routers of all sites plus the per-call routing state.

    Life of one forward call: the model's pre-hook (:meth:`root_pre_hook`) reads t and calls
    :meth:`begin`; each site's runtime (dynamic.py) then asks for its masks
    (:meth:`width_mask`, :meth:`token_mask`) the first time one of its Linears runs, and what
    it used is left in ``records`` (masks and token counts per site), which the FLOPs
    accountant (flops.py) reads after the call.
    """

    def __init__(self, plan: Plan, config: ConvertConfig, budget: float):
        super().__init__()
        self.plan = plan
        self.config = config
        self.budget = budget
        # Width routers see only an embedding of t (method.md, TDW): one shared sinusoidal
        # encoder, then one Linear per site to its units' logits.
        self.t_embed = TimestepEncoder(config.router_embed_dim)
        self.width = nn.ModuleDict()  # str(site index) -> Linear(embed, units)
        self.token = nn.ModuleDict()  # str(site index) -> TokenRouter (D -> D/r -> 1), MLPs only
        for s in plan.sites:
            if s.units > 1:  # a single unit is always on: nothing to route
                self.width[str(s.index)] = width_router(config.router_embed_dim, s.units, config.width_bias_init)
            if isinstance(s, MlpSite) and s.token:
                self.token[str(s.index)] = TokenRouter(s.in_features, config.token_reduction, config.token_bias_init)
        # The unit of each site that is never switched off (chosen by importance at convert
        # time); a buffer so it is saved, moved and loaded with the routers.
        self.register_buffer("always_on", torch.zeros(len(plan.sites), dtype=torch.long))
        self.mode: str | None = None  # routing.MODES, or None: follow model.training
        self.execution = "fast"  # evaluation path: "fast" (sliced) or "masked" (reference)
        self.runtimes: list[Any] = []  # one per site, in plan order (set by convert)
        self._reset_call()
        # Evaluation width masks per t value: {t: (cpu masks, device masks)}, valid while
        # _table_key (router parameter versions) is unchanged.
        self._table: dict[float, tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]] = {}
        self._table_key: tuple | None = None
        self.slices = SliceCache(self.cache_limit)
        self.model_params = 0  # parameter count of the whole model: sizes the slice cache

    # -- per call --------------------------------------------------------------------------
    def set_timestep_spec(self, model: nn.Module) -> None:
        """Remember where the timestep sits in the model's forward signature."""
        self.t_spec = (self.plan.timestep_arg, *timestep_slot(model, self.plan.timestep_arg))

    def root_pre_hook(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the converted model: read t and start the call."""
        name, pos, default = self.t_spec
        if name in kwargs:
            t = kwargs[name]
        elif pos is not None and pos < len(args):
            t = args[pos]
        else:
            t = default
        self.begin(t, model.training)

    def _reset_call(self) -> None:
        """Forget everything about the previous call (masks, records, embedding)."""
        self._t: torch.Tensor | None = None
        self._emb: torch.Tensor | None = None
        self._train_masks: dict[int, torch.Tensor] | None = None
        self._mode_now = "full"
        self.records: dict[int, dict[str, Any]] = {}
        self._eval_masks: dict[int, torch.Tensor] = {}
        self._eval_cpu: dict[int, torch.Tensor] = {}

    def begin(self, t: Any, training: bool) -> None:
        """Start one forward call of the model at timestep(s) ``t``."""
        self._reset_call()
        self._mode_now = self.mode or ("train" if training else "eval")
        if self._mode_now == "full":
            return
        if t is None:
            raise TimestepError(
                f"the model was called without its timestep argument {self.plan.timestep_arg!r}; "
                "dynconvert routers need it"
            )
        device = self.always_on.device
        t = torch.as_tensor(t, device=device).detach().float().reshape(-1)  # (Bt,): 1 or B values
        t = t * self.config.timestep_scale  # onto the DDPM 0..1000 scale the routers read
        if self.config.timestep_reverse:
            t = 1000.0 - t
        self._t = t
        if self._mode_now == "eval":
            self._eval_cpu, self._eval_masks = self._lookup(t)

    @property
    def mode_now(self) -> str:
        """The routing mode of the current call ("train", "eval" or "full")."""
        return self._mode_now

    def fast_for(self, site: Site) -> bool:
        """Whether this site runs the sliced fast path in the current call."""
        return self._mode_now == "eval" and self.execution == "fast" and self.config.fast_path and site.fast

    def record(self, index: int) -> dict[str, Any]:
        """What site ``index`` used in this call: "width" (Bt, U), "tokens" (B, N), "n"/"m"
        (query / key-value token counts), read by the FLOPs accountant."""
        return self.records.setdefault(index, {})

    # -- masks ------------------------------------------------------------------------------
    def width_mask(self, index: int) -> torch.Tensor | None:
        """(Bt, units) mask of one site for this call; None when every unit is on."""
        rec = self.record(index)
        if "width" in rec:
            return rec["width"]
        key = str(index)
        if self._mode_now == "full" or key not in self.width:
            mask = None
        elif self._mode_now == "train":
            if self._train_masks is None:
                self._train_masks = self._all_train_masks()
            mask = self._train_masks[index]
        else:
            mask = self._eval_masks.get(index)
        rec["width"] = mask
        return mask

    def _all_train_masks(self) -> dict[int, torch.Tensor]:
        """Training masks of every site at once: one matmul and one Gumbel draw for all routers
        (the same as running each router alone, with far fewer kernel launches)."""
        keys = list(self.width.keys())
        self._emb = self.t_embed(self._t)
        weight = torch.cat([self.width[k].weight for k in keys])
        bias = torch.cat([self.width[k].bias for k in keys])
        sizes = [self.width[k].out_features for k in keys]
        logits = torch.nn.functional.linear(self._emb, weight, bias)  # (B, sum of units)
        on = self._always_on_positions(keys, sizes, logits.device)
        masks = gumbel_sigmoid(logits, self.config.tau)
        masks = torch.where(on, torch.ones_like(masks), masks)
        return {int(k): m for k, m in zip(keys, masks.split(sizes, dim=-1))}

    def _always_on_positions(self, keys: list[str], sizes: list[int], device: torch.device) -> torch.Tensor:
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
        return self._eval_cpu.get(index)

    def token_mask(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """Mask over the leading dims of ``x`` (batch, tokens); None when tokens are not routed."""
        key = str(index)
        if self._mode_now == "full" or key not in self.token:
            return None
        logits = self.token[key](x)  # (B, N): one logit per token
        if self._mode_now == "train":
            return gumbel_sigmoid(logits, self.config.tau)
        return logits > 0

    # -- evaluation table -------------------------------------------------------------------
    def _params_key(self) -> tuple:
        """Changes whenever anything the width masks depend on changes (training, loading)."""
        params = [*self.t_embed.parameters(), *self.width.parameters()]
        return (
            sum(p._version for p in params),
            tuple(p.data_ptr() for p in params[:2]),
            self.always_on._version,
            self.always_on.device,
        )

    def _lookup(self, t: torch.Tensor) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Width masks of every site for the timesteps of this call, on CPU and on the device."""
        key = self._params_key()
        if key != self._table_key:
            self._table, self._table_key = {}, key
        values = [round(v, 4) for v in t.tolist()]  # the one host sync of an evaluation call
        uniq = list(dict.fromkeys(values))
        missing = [v for v in uniq if v not in self._table]
        if missing:
            self._fill(missing)
        if len(uniq) == 1:
            return self._table[uniq[0]]
        cpu = {i: torch.stack([self._table[v][0][i][0] for v in values]) for i in self._table[uniq[0]][0]}
        dev = {i: m.to(self.always_on.device, non_blocking=True) for i, m in cpu.items()}
        return cpu, dev

    def _fill(self, values: list[float]) -> None:
        """Add the masks of new t values to the table (one router pass for all of them)."""
        ons = self.width_table(torch.tensor(values))
        cpu = {i: on.cpu() for i, on in ons.items()}
        for j, v in enumerate(values):
            self._table[v] = ({i: m[j : j + 1] for i, m in cpu.items()}, {i: m[j : j + 1] for i, m in ons.items()})

    def width_table(self, timesteps: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """Evaluation width masks for each site at the given timesteps (default 0..999).

        Returns ``{site index: (T, units) bool}`` for every site with a width router.
        """
        t = torch.arange(1000, dtype=torch.float32) if timesteps is None else timesteps.float()
        t = t.to(self.always_on.device)
        with torch.no_grad():
            emb = self.t_embed(t)
            out = {}
            for key, router in self.width.items():
                on = router(emb) > 0
                on[:, int(self.always_on[int(key)])] = True
                out[int(key)] = on
        return out

    # -- weight slices ------------------------------------------------------------------------
    def sliced(self, lin: nn.Linear, axis: str, units: tuple[int, ...], index: torch.Tensor) -> tuple:
        """Weight (and bias) of ``lin`` restricted to ``index`` rows/cols (see :class:`SliceCache`)."""
        return self.slices.get(lin, axis, units, index)

    @property
    def slice_bytes(self) -> int:
        """Bytes the weight-slice cache holds now."""
        return self.slices.nbytes

    def cache_limit(self, element_size: int = 4) -> float:
        """Bytes the weight-slice cache may hold: ``slice_cache_mb``, or by default 20% of the
        model's parameter bytes (so a converted model stays within 1.25x the original's memory)."""
        if self.config.slice_cache_mb is not None:
            return self.config.slice_cache_mb * 2**20
        return 0.2 * self.model_params * element_size

    def clear_cache(self) -> None:
        """Drop cached weight slices and timestep tables (frees their memory)."""
        self.slices.clear()
        self._table, self._table_key = {}, None
