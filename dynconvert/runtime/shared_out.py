"""The runtime of an out-projection shared by two sites (parallel single-stream blocks).

Flux's single blocks feed one Linear with concat(attention output, activated MLP hidden): its
input columns are the attention's heads and the MLP's channel groups, each routed by its own
site. :class:`SharedOutRuntime` slices (or masks) both sets of columns in one call; columns of a
site that is not converted are computed in full. When the MLP's tokens are routed (Flux 2's
fused projection, shared_in.py), a skipped token's MLP columns are zero: the masked path
multiplies them by the token mask, the sliced path computes them on the selected tokens only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dynconvert.runtime.dynamic import DynamicLinear, per_row
from dynconvert.runtime.interfaces import MlpCall, OutColumnsOwner, cached
from dynconvert.runtime.lora_run import lora_of, routed_linear


class SharedOutRuntime:
    """The out-projection of a parallel block, read by two sites: it consumes
    concat(attention output, activated MLP hidden), so its columns are the attention's heads
    and the MLP's channel groups (Flux's single-stream blocks), or one site's and others
    computed in full (``rest``: the other site is not converted).

    Each owner contributes its columns of this call: on the fast path only its active units'
    (the input arrives sliced the same way), on the masked path all of them times its mask.
    """

    def __init__(self, owners: list[OutColumnsOwner], name: str, cols: int = 0):
        # Owners in the order their columns come in the input (the concatenation's order).
        self.owners = sorted(owners, key=lambda rt: int(rt.out_tables[name].min()))
        self.bank = self.owners[0].bank
        width = cols or sum(int(rt.out_tables[name].numel()) for rt in self.owners)
        free = torch.ones(width, dtype=torch.bool)
        for rt in self.owners:
            free[rt.out_tables[name].reshape(-1)] = False
        self.rest = free.nonzero().squeeze(1)  # (C0,) columns of no site: computed in full
        # Built once per unit-set combination / device: the column index of the sliced weight
        # and its order, and each owner's column -> unit table (a sampling run repeats a few).
        self._index: dict[tuple, tuple[torch.Tensor, torch.Tensor | None, list[int]]] = {}
        self._owner: dict[tuple, torch.Tensor] = {}

    def linear_forward(self, lin: DynamicLinear, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, C') -> (B, N, D): every owner's columns of this call, weight sliced to them."""
        name = lin._dc_name
        cols, mults, keys, calls, sliced = [], [], [], [], False
        for rt in self.owners:
            st = rt.out_state()
            table = rt.out_tables[name]  # (1, units, size)
            calls.append(st.call)
            if st.sliced and st.decision is not None:
                d, sliced = st.decision, True
                cols.append(table[:, d.units.cpu()].reshape(-1))
                keys.append(d.key)
                mults.append(d.sub[name][:, : cols[-1].numel()] if d.sub is not None else None)
                continue
            cols.append(table.reshape(-1))
            keys.append(None)
            mults.append(None if st.sliced else self._unit_mult(rt, name, st.mask, x))
        index, order, spans = self._columns(tuple(keys), cols, x.device)
        x = self._masked(x, mults, cols, order, calls, spans)
        # An MLP that ran on its selected tokens only (its hidden gathered at the input).
        gathered = next(
            (i for i, c in enumerate(calls) if c is not None and c.sliced and c.idx is not None),
            None,
        )
        if gathered is not None and _adapted(lin):  # a LoRA: every token, the skipped ones zero
            x, gathered = _skipped_zero(x, spans[gathered], calls[gathered]), None
        if not sliced:
            if gathered is None:
                return routed_linear(self.bank, lin, x)
            return _gathered_out(x, lin.weight, lin.bias, spans[gathered], calls[gathered])
        if gathered is None:  # the active units' columns (of the weight and each LoRA's A)
            return routed_linear(self.bank, lin, x, "cols", tuple(keys), index)  # (B, N, D)
        w, b = self.bank.sliced(lin, "cols", tuple(keys), index)
        return _gathered_out(x, w, b, spans[gathered], calls[gathered])

    def _unit_mult(
        self, rt: OutColumnsOwner, name: str, mask: torch.Tensor | None, x: torch.Tensor
    ) -> torch.Tensor | None:
        """(Bt, C_o) multiplier of an owner's columns on the masked path (None: all on)."""
        if mask is None:
            return None
        table = self._owner.get((id(rt), x.device))
        if table is None:
            t = rt.out_tables[name]  # (1, units, size)
            table = torch.arange(t.shape[1]).repeat_interleave(t.shape[-1]).to(x.device)
            self._owner[(id(rt), x.device)] = table
        return mask.index_select(1, table)

    def _columns(
        self, keys: tuple, cols: list[torch.Tensor], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[int, int]]]:
        """The sliced weight's columns in the input's order, the permutation from the owners'
        concatenation to it (None: the same), and each owner's [start, stop) in it."""

        def build() -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[int, int]]]:
            flat = torch.cat([*cols, self.rest])
            order = flat.argsort()  # the input's order: the original columns' with units removed
            where = order.argsort()  # position of each concatenated column in that order
            spans, start = [], 0
            for c in cols:
                pos = where[start : start + c.numel()]
                spans.append((int(pos.min()), int(pos.max()) + 1) if c.numel() else (0, 0))
                start += c.numel()
            same = bool((order == torch.arange(order.numel())).all())
            return flat[order].to(device), None if same else order.to(device), spans

        return cached(self._index, (keys, device), build)

    def _masked(
        self,
        x: torch.Tensor,
        mults: list[torch.Tensor | None],
        cols: list[torch.Tensor],
        order: torch.Tensor | None,
        calls: list[MlpCall | None],
        spans: list[tuple[int, int]],
    ) -> torch.Tensor:
        """x (B, N, C') times the owners' unit multipliers and, on the masked path, the MLP's
        token mask on its columns (a skipped token's MLP columns are zero)."""
        if any(m is not None for m in mults):
            parts = []
            for c, m in zip(cols, mults):
                parts.append(m.to(x.dtype) if m is not None else x.new_ones(1, c.numel()))
            parts.append(x.new_ones(1, self.rest.numel()))
            bt = max(p.shape[0] for p in parts)
            mult = torch.cat([p.expand(bt, -1) for p in parts], 1)  # (Bt, C')
            mult = mult if order is None else mult.index_select(1, order)
            mult = per_row(mult, x.shape[0]) if bt > 1 else mult
            x = x * mult.reshape(mult.shape[0], *([1] * (x.dim() - 2)), -1)
        for call, (a, b) in zip(calls, spans):
            if call is None or call.sliced or call.tokens is None:
                continue
            on = torch.zeros(x.shape[-1], dtype=x.dtype, device=x.device)
            on[a:b] = 1  # (C',) the MLP's columns
            tok = call.tokens.reshape(*x.shape[:-1], 1).to(x.dtype)  # (B, N, 1)
            x = x * (1 + on * (tok - 1))  # its columns times the token mask, the others as is
        return x


def _gathered_out(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    span: tuple[int, int],
    call: MlpCall,
) -> torch.Tensor:
    """x (B, N, C') -> (B, N, D) when the MLP ran on the selected tokens only: the other
    columns on every token, the MLP's columns [a, b) on the selected rows, added back."""
    lo, hi = span
    lead = x.shape[:-1]
    y = F.linear(x[..., :lo], w[:, :lo], b)  # (B, N, D): the attention's columns and bias
    if hi < x.shape[-1]:
        y = y + F.linear(x[..., hi:], w[:, hi:])
    rows = x[..., lo:hi].reshape(math.prod(lead), -1).index_select(0, call.idx)  # (K, F')
    out = y.reshape(math.prod(lead), -1).index_add(0, call.idx, F.linear(rows, w[:, lo:hi]))
    return out.reshape(*lead, -1)  # (B, N, D)


def _adapted(lin: DynamicLinear) -> bool:
    """True when an unmerged, enabled LoRA adapter wraps ``lin`` (its update needs every row)."""
    wrapper = lora_of(lin)
    return wrapper is not None and not wrapper.merged and not wrapper.disable_adapters


def _skipped_zero(x: torch.Tensor, span: tuple[int, int], call: MlpCall) -> torch.Tensor:
    """x (B, N, C') with the MLP's columns [a, b) zero on the tokens it skipped (what the masked
    path multiplies by the token mask), so the dense out-projection and its LoRA see them so."""
    lo, hi = span
    lead = x.shape[:-1]
    keep = x.new_zeros(math.prod(lead), 1).index_fill_(0, call.idx, 1).reshape(*lead, 1)
    on = x.new_zeros(x.shape[-1])
    on[lo:hi] = 1  # (C',) the MLP's columns
    return x * (1 - on * (1 - keep))
