"""The dynamic modules: Linears that route through their site, and what every site runtime shares.

Converting a site changes the class of its Linears from ``nn.Linear`` to :class:`DynamicLinear`
in place: the same object, the same ``weight`` and ``bias`` Parameters under the same names.
Its forward asks the site's runtime what to do in the current call:

- masked path (training, and the reference in evaluation): full-width compute; a switched-off
  head's output is zeroed before the out-projection, a switched-off channel group before fc2,
  and a skipped token's MLP output (fc2 bias included) is zeroed;
- fast path (evaluation): q/k/v and fc1 compute only the active rows, the out-projection and fc2
  only the active columns, and the MLP runs only the selected tokens, gathered over
  batch x tokens and scattered back into zeros.

Which of the two a call takes is the execution mode's to say (modes.py). The site runtimes are
in attention.py, mlp.py, conv.py and shared_out.py; :class:`SiteRuntime` here is what they share.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dynconvert.plan import AttentionSite, MlpSite, UnitMap
from dynconvert.runtime.compiled import eager_now, run_eagerly
from dynconvert.runtime.interfaces import (
    PATTERN_CACHE_LIMIT,
    CallRouting,
    ConvRoute,
    Decision,
    LinearRoute,
)


class DynamicLinear(nn.Linear):
    """An nn.Linear routed by its site (same parameters, same names as the original)."""

    # Only the class changes, never the Parameters: state-dict keys stay the original's, so an
    # original checkpoint loads, and optimisers or hooks that hold the Parameters stay valid.
    _dc_rt: LinearRoute  # the site's runtime (AttentionRuntime, MlpRuntime or SharedOutRuntime)
    _dc_role: str  # "in" (q/k/v), "out", "mlp_in" (fc1 or value/gate) or "mlp_out" (fc2)
    _dc_name: str  # fqn in the model: the key of this Linear's rows in the site's unit tables
    _dc_base: type = nn.Linear  # the class it had before (make_static restores it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> this Linear's output, as the site's runtime routes this call.

        Masked path: full width; switched-off units (and skipped tokens) are zeroed around the
        out-projection / fc2. Fast path: q/k/v and fc1 use only the active rows of the weight
        (fc1 only the selected tokens, gathered), the out-projection and fc2 only the active
        columns, giving (..., out_features) again. See the runtimes' ``linear_forward``.
        """
        rt = self._dc_rt
        if eager_now(rt.bank):  # traced fast call: its host routing stays out of the guards
            return run_eagerly(type(self).forward, self, x)
        return rt.linear_forward(self, x)

    def extra_repr(self) -> str:
        """From the weight: a routed module that only holds a weight and a bias (a model's own
        projection class calling F.linear) has no ``in_features`` of its own."""
        out_f, in_f = self.weight.shape
        return f"in_features={in_f}, out_features={out_f}, bias={self.bias is not None}"


class DynamicConv(nn.Module):
    """A pointwise or depthwise convolution of a convolutional MLP, routed by its site (same
    parameters, same names as the original)."""

    _dc_rt: ConvRoute  # the site's ConvMlpRuntime
    _dc_role: str  # "mlp_in" (pointwise fc1), "mlp_mid" (depthwise) or "mlp_out" (pointwise fc2)
    _dc_name: str
    _dc_base: type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, *spatial) -> this convolution's output, as the site's runtime routes it."""
        rt = self._dc_rt
        if eager_now(rt.bank):  # as DynamicLinear.forward
            return run_eagerly(type(self).forward, self, x)
        return rt.conv_forward(self, x)


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_DYNAMIC_CLASSES: dict[type, type] = {nn.Linear: DynamicLinear}


def make_dynamic(lin: nn.Module, runtime: LinearRoute | ConvRoute, role: str, name: str) -> None:
    """Turn an nn.Linear into a DynamicLinear in place (``name`` is its fqn in the model).

    A subclass of nn.Linear that keeps its forward (analysis only routes those), or a module
    of the model's own that holds only a weight and a bias and runs F.linear on them
    (``graph.linear_like``), becomes a class deriving from both, so ``isinstance(lin,
    TheirClass)`` still holds.
    """
    cls = type(lin)
    routed = issubclass(cls, (DynamicLinear, DynamicConv))
    dyn = cls if routed else _DYNAMIC_CLASSES.get(cls)  # re-routed
    if dyn is None:
        base = DynamicConv if isinstance(lin, _CONVS) else DynamicLinear
        dyn = _DYNAMIC_CLASSES[cls] = type(f"Dynamic{cls.__name__}", (base, cls), {"_dc_base": cls})
    lin.__class__ = dyn
    lin._dc_rt = runtime
    lin._dc_role = role
    lin._dc_name = name


def make_static(lin: nn.Linear) -> None:
    """Undo :func:`make_dynamic`: the original class again."""
    lin.__class__ = type(lin)._dc_base
    for attr in ("_dc_rt", "_dc_role", "_dc_name", "_dc_lora"):
        lin.__dict__.pop(attr, None)


def unit_table(m: UnitMap) -> torch.Tensor:
    """(parts, units, size) table of indices; ``table[:, units].reshape(-1)`` slices a unit set.

    Parts come first so that a slice is part-major: for a fused qkv (parts q, k, v) and heads
    {0, 2} it lists q0 q2 k0 k2 v0 v2, the layout ``reshape(B, N, 3, heads, d)`` expects of a
    qkv with two heads. The model's own reshaping code then works on the sliced output as is,
    once its head-count attribute is lowered.

    Example:
        >>> from dynconvert.plan import UnitMap
        >>> qkv = UnitMap("qkv", "rows", units=2, parts=[(0, 2, 2), (4, 2, 2), (8, 2, 2)])
        >>> unit_table(qkv)[:, [1]].reshape(-1).tolist()  # every row of head 1
        [2, 3, 6, 7, 10, 11]
    """
    if m.explicit is not None:
        return torch.tensor(m.explicit, dtype=torch.long)  # explicit[part][unit] = indices
    rows = []
    for base, stride, size in m.parts:
        u = torch.arange(m.units)[:, None] * stride + torch.arange(size)[None, :]  # (units, size)
        rows.append(base + u)
    return torch.stack(rows)  # (parts, units, size)


def unit_of_index(m: UnitMap, width: int) -> torch.Tensor:
    """For each of ``width`` indices, the unit that owns it (the masked path's lookup).

    Indices the map keeps outside every unit (``m.keep``) get ``m.units``: the masked path
    appends an always-on column to the mask for them (see :func:`pad_mask`).

    Example:
        >>> from dynconvert.plan import UnitMap
        >>> unit_of_index(UnitMap("proj", "cols", units=2, parts=[(0, 2, 2)]), 4).tolist()
        [0, 0, 1, 1]
    """
    owner = torch.full((width,), -1, dtype=torch.long)  # (width,)
    table = unit_table(m)
    for u in range(m.units):
        owner[table[:, u].reshape(-1)] = u
    if m.keep:
        owner[torch.tensor(m.keep, dtype=torch.long)] = m.units
    if (owner < 0).any():
        raise ValueError(f"{m.linear}: some {m.axis} belong to no unit")
    return owner


def pad_mask(mask: torch.Tensor) -> torch.Tensor:
    """(Bt, U) unit mask -> (Bt, U + 1) with an always-on last column (for kept indices)."""
    return torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)


def per_row(values: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-sample values (Bt, ...) for ``rows`` rows of a call: as they are when they match, else
    each sample's values repeated for its rows.

    Video and spatio-temporal models fold frames (or tokens) into the batch: a spatial block sees
    (batch x frames) rows, a temporal one (batch x tokens). Every such model folds sample-major
    ("b f n d -> (b f) n d"), so row r belongs to sample r // (rows / Bt).
    """
    bt = values.shape[0]
    if rows == bt or bt == 1:
        return values
    if rows % bt:
        raise RuntimeError(
            f"this call has {rows} rows for {bt} timesteps, not a multiple; pass one timestep "
            "per sample (or one for the whole batch)"
        )
    return values.repeat_interleave(rows // bt, 0)


def column_multiplier(
    cols: torch.Tensor, x: torch.Tensor, channels_first: bool = False
) -> torch.Tensor:
    """Per-sample column values (Bt, C) -> a multiplier broadcastable against x: (B, ..., C), or
    (B, C, ...) for channels-first convolution inputs.

    Bt is the number of timesteps of the call: 1 when the whole batch shares one t (it
    broadcasts over the batch), else one per sample (repeated for the rows a sample folds into).

    Example:
        >>> column_multiplier(torch.ones(1, 3), torch.zeros(2, 5, 3)).shape
        torch.Size([1, 1, 3])
        >>> column_multiplier(torch.ones(2, 3), torch.zeros(2, 3, 4, 4), channels_first=True).shape
        torch.Size([2, 3, 1, 1])
    """
    cols = per_row(cols.to(x.dtype), x.shape[0])  # (B, C) or (1, C)
    spatial = [1] * max(0, x.dim() - 2)
    if channels_first:
        return cols.reshape(cols.shape[0], -1, *spatial)
    return cols.reshape(cols.shape[0], *spatial, -1)


def _active(mask: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Fast-path choice from a (Bt, U) bool CPU mask: (units to compute, per-sample sub-mask).

    Returns (None, None) when every unit is on for every sample (plain full-width compute).
    """
    if mask is None:
        return None, None
    # Compute every unit some sample needs; samples whose timestep switches off part of that
    # union (a batch spanning several timesteps) zero their extra units with the sub-mask.
    union = mask.any(0)  # (U,)
    same = bool((mask == union).all())  # every sample has the union
    if same and bool(union.all()):
        return None, None
    units = union.nonzero().squeeze(1)
    return units, None if same else mask[:, units]  # (U',), (Bt, U') or None


class SiteRuntime:
    """Shared by attention and MLP runtimes: unit tables, owners per device, decision cache.

    A runtime is shared by every thread that calls the model: what one call has in progress at
    this site lives in that call (:attr:`in_progress`), never in the runtime.
    """

    def __init__(self, site: AttentionSite | MlpSite, bank: CallRouting, per_unit_out: int):
        self.site = site
        self.bank = bank  # the RouterBank: each thread's current call, slice cache
        self.tables = {m.linear: unit_table(m) for m in site.in_maps}  # (parts, units, size)
        # Per out-projection (several for a joint attention): its (1, units, per_unit_out)
        # table, the columns kept outside every unit, and the column -> unit owner table.
        self.out_tables = {m.linear: unit_table(m) for m in site.out_maps}
        self.out_keep = {m.linear: torch.tensor(m.keep, dtype=torch.long) for m in site.out_maps}
        self.out_owners = {
            m.linear: unit_of_index(m, site.units * per_unit_out + len(m.keep))
            for m in site.out_maps
        }
        self.per_unit_out = per_unit_out  # out-projection input columns a unit owns
        self._owners: dict[torch.device, torch.Tensor] = {}
        self._decisions: dict[tuple, Decision | None] = {}

    @property
    def in_progress(self) -> Any:
        """What this site has in progress in the calling thread's current call (an MLP call
        from fc1 to fc2, an attention call's sliced decision), or None."""
        return self.bank.current_call().progress.get(self.site.index)

    @in_progress.setter
    def in_progress(self, value: Any) -> None:
        self.bank.current_call().progress[self.site.index] = value

    def owner(self, name: str, device: torch.device) -> torch.Tensor:
        """The column -> unit table of out-projection ``name`` on ``device`` (copied once)."""
        o = self._owners.get((name, device))
        if o is None:
            o = self._owners[(name, device)] = self.out_owners[name].to(device)
        return o

    def masked_out(self, name: str, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Masked path: x (B, ..., C) with the switched-off units' columns of ``name`` zeroed."""
        if self.out_keep[name].numel():
            mask = pad_mask(mask)  # kept columns (a parallel block's MLP part) stay on
        return x * column_multiplier(mask.index_select(1, self.owner(name, mask.device)), x)

    @torch.compiler.disable  # host work on a CPU mask; compiled, its cache misses recompile
    def decide(self, mask_cpu: torch.Tensor | None, device: torch.device) -> Decision | None:
        """The fast-path decision for this call's CPU mask (None: compute every unit).

        Keyed by the mask's bytes: the few mask patterns of a sampling run repeat at many
        timesteps, so their index tensors are built and moved to the device once.
        """
        if mask_cpu is None:
            return None
        key = (tuple(mask_cpu.shape), mask_cpu.numpy().tobytes(), device)
        if key in self._decisions:
            return self._decisions[key]
        units, sub = _active(mask_cpu)
        d = None
        if units is not None:
            rows = {name: t[:, units].reshape(-1).to(device) for name, t in self.tables.items()}
            cols, sub_cols = {}, None if sub is None else {}
            for name, t in self.out_tables.items():
                keep = self.out_keep[name]
                # The units' columns, unit-major, then the kept ones: analysis only keeps
                # columns where the unit columns are ascending and come before them.
                cols[name] = torch.cat([t[:, units].reshape(-1), keep]).to(device)
                if sub is not None:
                    # Column c of the slice belongs to computed unit c // per_unit_out; kept
                    # columns to no unit (always on).
                    owner = torch.arange(units.numel()).repeat_interleave(self.per_unit_out)
                    on = sub.index_select(1, owner)
                    sub_cols[name] = torch.cat([on, on.new_ones(on.shape[0], keep.numel())], 1).to(
                        device
                    )
            d = Decision(units, rows, cols, sub_cols)
        if len(self._decisions) > PATTERN_CACHE_LIMIT:  # many mask patterns: bound the memory
            self._decisions.clear()
        self._decisions[key] = d
        return d
