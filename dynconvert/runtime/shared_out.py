"""The runtime of an out-projection shared by two sites (parallel single-stream blocks).

Flux's single blocks feed one Linear with concat(attention output, activated MLP hidden): its
input columns are the attention's heads and the MLP's channel groups, each routed by its own
site. :class:`SharedOutRuntime` slices (or masks) both sets of columns in one call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dynconvert.runtime.dynamic import DynamicLinear, per_row
from dynconvert.runtime.interfaces import PATTERN_CACHE_LIMIT, OutColumnsOwner


class SharedOutRuntime:
    """The out-projection of a parallel block, read by two sites: it consumes
    concat(attention output, activated MLP hidden), so its columns are the attention's heads
    and the MLP's channel groups (Flux's single-stream blocks).

    Each owner contributes its columns of this call: on the fast path only its active units'
    (the input arrives sliced the same way), on the masked path all of them times its mask.
    """

    def __init__(self, owners: list[OutColumnsOwner], name: str):
        # Owners in the order their columns come in the input (the concatenation's order).
        self.owners = sorted(owners, key=lambda rt: int(rt.out_tables[name].min()))
        self.bank = self.owners[0].bank
        # Built once per unit-set combination / device: the column index of the sliced weight,
        # and each owner's column -> unit table (the calls of a sampling run repeat a few).
        self._index: dict[tuple, torch.Tensor] = {}
        self._owner: dict[tuple, torch.Tensor] = {}

    def linear_forward(self, lin: DynamicLinear, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, C') -> (B, N, D): every owner's columns of this call, weight sliced to them."""
        name = lin._dc_name
        cols, mults, keys, sliced = [], [], [], False
        for rt in self.owners:
            d, fast, mask = rt.out_state()
            table = rt.out_tables[name]  # (1, units, size)
            size = table.shape[-1]
            if fast and d is not None:
                sliced = True
                cols.append(table[:, d.units.cpu()].reshape(-1))
                keys.append(d.key)
                n = cols[-1].numel()
                mults.append(d.sub[name][:, :n] if d.sub is not None else None)
            else:
                cols.append(table.reshape(-1))
                keys.append(None)
                if mask is not None and not fast:
                    okey = (id(rt), x.device)
                    if okey not in self._owner:
                        self._owner[okey] = (
                            torch.arange(table.shape[1]).repeat_interleave(size).to(x.device)
                        )
                    mults.append(mask.index_select(1, self._owner[okey]))
                else:
                    mults.append(None)
        if any(m is not None for m in mults):
            parts = []
            for c, m in zip(cols, mults):
                parts.append(m.to(x.dtype) if m is not None else x.new_ones(1, c.numel()))
            bt = max(p.shape[0] for p in parts)
            mult = torch.cat([p.expand(bt, -1) for p in parts], 1)  # (Bt, C')
            mult = per_row(mult, x.shape[0]) if bt > 1 else mult
            x = x * mult.reshape(mult.shape[0], *([1] * (x.dim() - 2)), -1)
        if not sliced:
            return F.linear(x, lin.weight, lin.bias)
        ikey = (tuple(keys), x.device)
        index = self._index.get(ikey)
        if index is None:
            if len(self._index) > PATTERN_CACHE_LIMIT:  # many unit sets: bound the memory
                self._index.clear()
            index = self._index[ikey] = torch.cat(cols).to(x.device)
        w, b = self.bank.sliced(lin, "cols", tuple(keys), index)
        return F.linear(x, w, b)
