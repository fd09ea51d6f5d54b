"""The runtime of an input projection shared by two sites, or partly by none (Flux 2).

Flux 2's single blocks compute q, k and v of every head and the MLP's gate and value halves in
one Linear (``to_qkv_mlp_proj``) and split its output along the channels: its rows are the
attention's heads and the MLP's channel groups, each routed by its own site, as the columns of
the block's out-projection are (shared_out.py). :class:`SharedInRuntime` computes, in one call,
the active units' rows of each owner (all of an owner's rows on its masked path) and the rows no
site routes, in the Linear's own order: what the model splits is then the original layout with
the switched-off units' rows removed, which it splits by its lowered attributes (the head count
and width by the attention site, the hidden width by the MLP site).
"""

from __future__ import annotations

import math

import torch

from dynconvert.runtime.dynamic import DynamicLinear
from dynconvert.runtime.interfaces import InRowsOwner, MlpCall, cached
from dynconvert.runtime.lora_run import routed_linear


class SharedInRuntime:
    """The rows of one input Linear, read by the sites that own them (and rows of no site).

    Example:
        >>> from types import SimpleNamespace as NS
        >>> owner = NS(bank=None, tables={"p": torch.arange(4).reshape(1, 2, 2)})
        >>> SharedInRuntime([owner], "p", rows=6).rest.tolist()  # rows 4 and 5: no site's
        [4, 5]
    """

    def __init__(self, owners: list[InRowsOwner], name: str, rows: int):
        # Owners in the order their rows come in the Linear (the model's split order).
        self.owners = sorted(owners, key=lambda rt: int(rt.tables[name].min()))
        self.bank = self.owners[0].bank
        self.name = name
        free = torch.ones(rows, dtype=torch.bool)
        for rt in self.owners:
            free[rt.tables[name].reshape(-1)] = False
        self.rest = free.nonzero().squeeze(1)  # (R0,) rows of no site: computed in full
        # The row index of the sliced weight per unit-set combination and device (the calls
        # of a sampling run repeat a few).
        self._index: dict[tuple, torch.Tensor] = {}

    def linear_forward(self, lin: DynamicLinear, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, D) -> (B, N, R'): every owner's rows of this call and the rows of no site,
        in the Linear's order (R' = R when every owner computes all its units)."""
        name = self.name
        keys, rows, calls = [], [], []
        for rt in self.owners:
            d, call = rt.in_call(name, x)  # the owner's decision (None: all its rows)
            table = rt.tables[name]  # (parts, units, size)
            keys.append(d.key if d is not None else None)
            rows.append(table[:, d.units.cpu()].reshape(-1) if d is not None else table.reshape(-1))
            calls.append(call)
        # A token-routed MLP on a sliced path computes its rows on the selected tokens only.
        gathered = next(
            (i for i, c in enumerate(calls) if c is not None and c.sliced and _gathers(c)), None
        )
        bank = self.bank
        # routed_linear: a LoRA on this projection is routed with its rows (B's rows follow).
        if all(k is None for k in keys) and gathered is None:
            return routed_linear(bank, lin, x)
        index, spans = self._rows(tuple(keys), rows, x.device)
        cut = ("rows", tuple(keys), index)
        if gathered is None:
            return routed_linear(bank, lin, x, *cut)  # (B, N, R')
        lo, hi = spans[gathered]
        if lo < 0:
            raise RuntimeError(
                f"{name}: the token-routed MLP's rows are not one block of the fused projection"
            )
        call = calls[gathered]
        # (K, M') or (B, N, M'): the MLP's rows on its selected tokens
        h = routed_linear(bank, lin, call.x_sel, *cut, call.gathered(), part=slice(lo, hi))
        if call.keep is not None:  # planned path: rows under the threshold give zero
            h = h * call.keep.reshape(*h.shape[:-1], 1)
        if call.idx is not None:  # scattered back into zeros: a skipped token's hidden is zero
            out = h.new_zeros(math.prod(x.shape[:-1]), h.shape[-1])  # (B * N, M')
            h = out.index_copy(0, call.idx, h.reshape(-1, h.shape[-1])).reshape(*x.shape[:-1], -1)
        parts = [routed_linear(bank, lin, x, *cut, part=slice(0, lo))] if lo else []
        parts.append(h)
        if hi < index.numel():
            parts.append(routed_linear(bank, lin, x, *cut, part=slice(hi, None)))
        return torch.cat(parts, -1)  # (B, N, R')

    def _rows(
        self, keys: tuple, rows: list[torch.Tensor], device: torch.device
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """The sliced weight's rows in the Linear's order, and each owner's [start, stop) in it."""

        def build() -> tuple[torch.Tensor, list[tuple[int, int]]]:
            # Sorted: the original rows' order with the switched-off units' rows removed.
            index = torch.cat([*rows, self.rest]).sort().values
            spans = []
            for r in rows:
                pos = torch.searchsorted(index, r)
                lo, hi = int(pos.min()), int(pos.max()) + 1
                # A gathered owner's rows must be one block: analysis gives an MLP the
                # contiguous rows a fused projection's heads leave (sites/fused_in_find.py).
                spans.append((lo, hi) if hi - lo == r.numel() else (-1, -1))
            return index.to(device), spans

        return cached(self._index, (keys, device), build)


def _gathers(call: MlpCall) -> bool:
    """Whether an MLP call computes fewer rows than every token, or zeroes some (planned)."""
    return call.idx is not None or call.keep is not None
