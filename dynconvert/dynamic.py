"""The dynamic modules: Linears that route through their site, and the per-site runtimes.

Converting a site changes the class of its Linears from ``nn.Linear`` to :class:`DynamicLinear`
in place: the same object, the same ``weight`` and ``bias`` Parameters under the same names.
Its forward asks the site's runtime what to do in the current call:

- masked path (training, and the reference in evaluation): full-width compute; a switched-off
  head's output is zeroed before the out-projection, a switched-off channel group before fc2,
  and a skipped token's MLP output (fc2 bias included) is zeroed;
- fast path (evaluation): q/k/v and fc1 compute only the active rows, the out-projection and fc2
  only the active columns, and the MLP runs only the selected tokens, gathered over
  batch x tokens and scattered back into zeros.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynconvert.plan import AttentionSite, MlpSite, UnitMap


class DynamicLinear(nn.Linear):
    """An nn.Linear routed by its site (same parameters, same names as the original)."""

    _dc_rt: Any
    _dc_role: str
    _dc_name: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._dc_rt.linear_forward(self, x)


def make_dynamic(lin: nn.Linear, runtime: Any, role: str, name: str) -> None:
    """Turn an nn.Linear into a DynamicLinear in place (``name`` is its fqn in the model)."""
    lin.__class__ = DynamicLinear
    lin._dc_rt = runtime
    lin._dc_role = role
    lin._dc_name = name


def make_static(lin: nn.Linear) -> None:
    """Undo :func:`make_dynamic`."""
    lin.__class__ = nn.Linear
    for attr in ("_dc_rt", "_dc_role", "_dc_name"):
        lin.__dict__.pop(attr, None)


def unit_table(m: UnitMap) -> torch.Tensor:
    """(parts, units, size) table of indices; ``table[:, units].reshape(-1)`` slices a unit set."""
    if m.explicit is not None:
        return torch.tensor(m.explicit, dtype=torch.long)
    rows = []
    for base, stride, size in m.parts:
        u = torch.arange(m.units)[:, None] * stride + torch.arange(size)[None, :]
        rows.append(base + u)
    return torch.stack(rows)


def unit_of_index(m: UnitMap, width: int) -> torch.Tensor:
    """For each of ``width`` indices, the unit that owns it."""
    owner = torch.full((width,), -1, dtype=torch.long)
    table = unit_table(m)
    for u in range(m.units):
        owner[table[:, u].reshape(-1)] = u
    if (owner < 0).any():
        raise ValueError(f"{m.linear}: some {m.axis} belong to no unit")
    return owner


def _expand_rows(mask: torch.Tensor, owner: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample unit mask (Bt, U) -> a multiplier broadcastable against x (B, ..., C)."""
    cols = mask.to(x.dtype).index_select(1, owner.to(mask.device))  # (Bt, C)
    bt = cols.shape[0]
    if bt == 1 or x.dim() == 1:
        return cols.reshape(*([1] * (x.dim() - 1)), -1) if bt == 1 else cols
    if x.shape[0] != bt:
        raise RuntimeError(
            f"the batch of this call ({x.shape[0]}) differs from the number of timesteps ({bt}); "
            "pass one timestep per sample"
        )
    return cols.reshape(bt, *([1] * (x.dim() - 2)), -1)


def _active(mask: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Fast-path choice from a (Bt, U) bool mask: (units to compute, per-sample sub-mask).

    Returns (None, None) when every unit is on for every sample (plain full-width compute).
    """
    if mask is None:
        return None, None
    union = mask.any(0)
    same = bool((mask == union).all())
    if same and bool(union.all()):
        return None, None
    units = union.nonzero().squeeze(1)
    return units, None if same else mask[:, units]


class AttentionRuntime:
    """Routes one attention site: head masks (masked path) or sliced heads (fast path)."""

    def __init__(self, site: AttentionSite, bank: Any, module: nn.Module):
        self.site = site
        self.bank = bank
        self.tables = {m.linear: unit_table(m) for m in site.in_maps}
        self.out_table = unit_table(site.out_map)
        self.out_owner = unit_of_index(site.out_map, site.heads * site.v_head_dim)
        self.fast: tuple | None = None
        self.saved: dict[str, int] = {}
        self.module_class = type(module)

    def pre_hook(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        self.fast = None
        if not self.bank.fast_for(self.site):
            return
        units, sub = _active(self.bank.width_mask(self.site.index))
        if units is None:
            return
        self.fast = (units, sub)
        for attr, per in self.site.head_attrs.items():
            self.saved[attr] = getattr(module, attr)
            setattr(module, attr, int(units.numel()) * per)

    def post_hook(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        for attr, value in self.saved.items():
            setattr(module, attr, value)
        self.saved.clear()
        self.fast = None

    def linear_forward(self, lin: DynamicLinear, x: torch.Tensor) -> torch.Tensor:
        site, bank = self.site, self.bank
        if lin._dc_role == "in":
            name = self._name_of(lin)
            rec = bank.record(site.index)
            tokens = math.prod(x.shape[1:-1]) if x.dim() > 2 else x.shape[0]
            if name == site.q:
                rec["n"] = tokens
            if name == site.k:
                rec["m"] = tokens
            if self.fast is None:
                return F.linear(x, lin.weight, lin.bias)
            units = self.fast[0]
            table = self.tables[name]
            w, b = bank.sliced(lin, "rows", units, table[:, units.to(table.device)].reshape(-1))
            return F.linear(x, w, b)
        # out-projection
        if self.fast is not None:
            units, sub = self.fast
            if sub is not None:
                owner = torch.arange(units.numel()).repeat_interleave(site.v_head_dim)
                x = x * _expand_rows(sub, owner, x)
            w, b = bank.sliced(lin, "cols", units, self.out_table[:, units.to(self.out_table.device)].reshape(-1))
            return F.linear(x, w, b)
        mask = bank.width_mask(site.index)
        if mask is not None:
            x = x * _expand_rows(mask, self.out_owner, x)
        return F.linear(x, lin.weight, lin.bias)

    @staticmethod
    def _name_of(lin: DynamicLinear) -> str:
        return lin._dc_name


class MlpRuntime:
    """Routes one MLP site: channel groups and tokens, masked or sliced and gathered."""

    def __init__(self, site: MlpSite, bank: Any):
        self.site = site
        self.bank = bank
        self.tables = {m.linear: unit_table(m) for m in site.in_maps}
        self.out_table = unit_table(site.out_map)
        self.out_owner = unit_of_index(site.out_map, site.hidden)
        self.call: dict[str, Any] | None = None

    def _begin(self, x: torch.Tensor) -> dict[str, Any]:
        site, bank = self.site, self.bank
        rec = bank.record(site.index)
        lead = x.shape[:-1]
        rec["n"] = math.prod(lead[1:]) if len(lead) > 1 else 1
        width = bank.width_mask(site.index) if site.width else None
        tokens = bank.token_mask(site.index, x) if site.token else None
        rec["tokens"] = tokens
        call: dict[str, Any] = {"x": x, "lead": lead, "width": width, "tokens": tokens,
                                "fast": bank.fast_for(site)}
        if call["fast"]:
            units, sub = _active(width)
            call["units"], call["sub"] = units, sub
            idx = None
            if tokens is not None and not bool(tokens.all()):
                idx = tokens.reshape(-1).nonzero().squeeze(1)
                call["x_sel"] = x.reshape(-1, x.shape[-1]).index_select(0, idx)
            else:
                call["x_sel"] = x
            call["idx"] = idx
        self.call = call
        return call

    def linear_forward(self, lin: DynamicLinear, x: torch.Tensor) -> torch.Tensor:
        if lin._dc_role == "mlp_in":
            call = self.call
            if call is None or call["x"] is not x:
                call = self._begin(x)
            if not call["fast"]:
                return F.linear(x, lin.weight, lin.bias)
            units = call["units"]
            if units is None:
                return F.linear(call["x_sel"], lin.weight, lin.bias)
            table = self.tables[lin._dc_name]
            w, b = self.bank.sliced(lin, "rows", units, table[:, units.to(table.device)].reshape(-1))
            return F.linear(call["x_sel"], w, b)
        call, self.call = self.call, None
        if call is None:  # fc2 without fc1 in this call: nothing to route
            return F.linear(x, lin.weight, lin.bias)
        if call["fast"]:
            return self._fast_out(lin, x, call)
        width, tokens = call["width"], call["tokens"]
        if width is not None:
            x = x * _expand_rows(width, self.out_owner, x)
        y = F.linear(x, lin.weight, lin.bias)
        if tokens is not None:
            y = y * tokens.unsqueeze(-1).to(y.dtype)
        return y

    def _fast_out(self, lin: nn.Linear, h: torch.Tensor, call: dict[str, Any]) -> torch.Tensor:
        units, sub, idx, lead = call["units"], call["sub"], call["idx"], call["lead"]
        if sub is not None:
            per = self.site.hidden // self.site.groups
            owner = torch.arange(units.numel()).repeat_interleave(per)
            cols = sub.to(h.dtype).index_select(1, owner.to(sub.device))  # (Bt, C')
            n = math.prod(lead[1:]) if len(lead) > 1 else 1
            rows = idx if idx is not None else torch.arange(math.prod(lead), device=h.device)
            h = h.reshape(-1, h.shape[-1]) * cols.index_select(0, (rows // n).to(cols.device))
        if units is None:
            w, b = lin.weight, lin.bias
        else:
            w, b = self.bank.sliced(lin, "cols", units, self.out_table[:, units.to(self.out_table.device)].reshape(-1))
        y = F.linear(h, w, b)
        if idx is None:
            return y.reshape(*lead, -1)
        out = y.new_zeros(math.prod(lead), y.shape[-1])
        out.index_copy_(0, idx, y.reshape(-1, y.shape[-1]))
        return out.reshape(*lead, -1)
