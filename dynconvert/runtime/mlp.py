"""The MLP runtime: one MLP site's channel groups and tokens, masked or sliced and gathered.

fc1 (or the value and gate Linears of a gated MLP) begins an :class:`MlpCall` that fc2 ends:
on the masked path the switched-off groups' channels are zeroed before fc2 and a skipped
token's output after it; on a sliced path fc1 computes the active groups' rows of the selected
tokens only and fc2 scatters its output back into zeros. Where the selection comes from is the
execution mode's choice (modes.py): per call with ``nonzero`` (fast), or by fixed capacities
(planned, planner.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from dynconvert.plan import MlpSite
from dynconvert.runtime.dynamic import DynamicLinear, SiteRuntime, per_row
from dynconvert.runtime.heads import route_head_count
from dynconvert.runtime.interfaces import CallRouting, Decision, MlpCall, OutState
from dynconvert.runtime.lora_run import routed_linear
from dynconvert.runtime.shared import PerThread


def record_mlp_call(site: MlpSite, rec: dict[str, Any], lead: torch.Size) -> None:
    """Note an MLP call's size in its site's record for the FLOPs accountant: "n" tokens per
    row (summed over the calls of a forward when the MLP is shared by several streams,
    ``site.calls`` > 1) and "rows" (more than the batch when a block folds frames into it).

    Example:
        >>> rec = {}
        >>> record_mlp_call(type("S", (), {"calls": 2})(), rec, torch.Size([2, 16]))
        >>> record_mlp_call(type("S", (), {"calls": 2})(), rec, torch.Size([2, 4]))
        >>> rec["n"], rec["rows"]
        (20, 2)
    """
    n = math.prod(lead[1:]) if len(lead) > 1 else 1  # tokens per row
    rec["n"] = rec.get("n", 0) + n if site.calls > 1 else n
    rec["n_call"] = n
    rec["rows"] = lead[0]


def record_mlp_tokens(
    site: MlpSite, rec: dict[str, Any], tokens: torch.Tensor | None, computed: float | None = None
) -> None:
    """Note an MLP call's token mask (and on the planned path the fraction of its rows it
    computed) for the FLOPs accountant. The calls of a shared MLP (``site.calls`` > 1) join:
    masks side by side along the tokens, computed fractions weighted by the calls' rows.

    Example:
        >>> site, rec = type("S", (), {"calls": 2})(), {}
        >>> record_mlp_call(site, rec, torch.Size([2, 16]))
        >>> record_mlp_tokens(site, rec, torch.ones(2, 16))
        >>> record_mlp_call(site, rec, torch.Size([2, 4]))
        >>> record_mlp_tokens(site, rec, torch.zeros(2, 4))
        >>> tuple(rec["tokens"].shape), round(float(rec["tokens"].mean()), 3)
        ((2, 20), 0.8)
    """
    if tokens is not None and site.calls > 1 and rec.get("tokens") is not None:
        tokens = torch.cat([rec["tokens"].flatten(1), tokens.flatten(1)], 1)  # (B, N1 + N2)
    rec["tokens"] = tokens
    if computed is not None:
        rows = rec.get("n", 1)  # tokens per row so far, this call's included (record_mlp_call)
        if site.calls > 1 and "executed_tokens" in rec:
            before = rec["n"] - rec["n_call"]
            computed = (rec["executed_tokens"] * before + computed * rec["n_call"]) / rows
        rec["executed_tokens"] = computed


class MlpRuntime(SiteRuntime):
    """Routes one MLP site: channel groups and tokens, masked or sliced and gathered."""

    site: MlpSite

    # The MLP call in progress in this thread's call, handed from fc1 to fc2 (MlpCall or None).
    call = SiteRuntime.in_progress

    def __init__(self, site: MlpSite, bank: CallRouting):
        super().__init__(site, bank, site.hidden // site.groups)
        # This thread's sliced decision while the module runs: its hidden-width attributes
        # read it (heads.py), as an attention's head counts do.
        self._width = PerThread()

    def attach(self, module: nn.Module) -> list[Any]:
        """Hooks on the site's module that lower its hidden-width attributes on a sliced call
        (``site.width_attrs``: a fused projection split by them, Flux 2), for the calling
        thread only; returns the handles. The post-hook ends it, also when the forward raises."""
        if not self.site.width_attrs:
            return []
        for attr in self.site.width_attrs:  # F reads F' = active groups x group size
            route_head_count(module, attr, self._width, self.per_unit_out)
        return [
            module.register_forward_pre_hook(self._lower),
            module.register_forward_hook(self._restore, always_call=True),
        ]

    def _lower(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook: the decision fc1 will use in this call, if sliced."""
        site, bank = self.site, self.bank
        self._width.fast = None
        if bank.fast_for(site):
            self._width.fast = bank.decision(self, bank.always_on.device)

    def _restore(self, module: nn.Module, args: Any, output: Any) -> None:
        self._width.fast = None

    def in_call(self, name: str, x: torch.Tensor) -> tuple[Decision | None, MlpCall | None]:
        """For an input projection shared with another site (shared_in.py): begin (or join)
        the MLP call at x (B, N, D); its decision on a sliced path (None: every group), and
        the call."""
        call = self.call
        if call is None or call.x is not x:
            call = self._begin(x)
        return (call.decision if call.sliced else None), call

    def _begin(self, x: torch.Tensor) -> MlpCall:
        """Start an MLP call at its input x (B, N, D): masks, and on a sliced path the gather."""
        site, bank = self.site, self.bank
        sliced = bank.fast_for(site)
        begun = bank.begin_mlp(self, x) if sliced else None  # planned: capacity, not nonzero
        if begun is not None:
            self.call = begun
            return begun
        rec = bank.record(site.index)
        lead = x.shape[:-1]  # (B, N) or (B, H, W)
        record_mlp_call(site, rec, lead)
        width = bank.width_mask(site.index) if site.width else None  # (Bt, G)
        tokens = bank.token_mask(site.index, x) if site.token else None  # (B, N), router on x
        record_mlp_tokens(site, rec, tokens)
        call = MlpCall(x=x, sliced=sliced, lead=lead, width=width, tokens=tokens)
        if sliced:
            call.decision = bank.decision(self, x.device)
            call.x_sel = x
            if tokens is not None:
                # Gather the selected tokens over batch x tokens: no padding, and the two
                # classifier-free-guidance halves may select different tokens.
                idx = tokens.reshape(-1).nonzero().squeeze(1)  # the one host sync of this site
                if idx.numel() < tokens.numel():  # all selected: no gather, no scatter
                    call.idx = idx
                    call.x_sel = x.reshape(-1, x.shape[-1]).index_select(0, idx)  # (K, D)
        self.call = call
        return call

    def linear_forward(self, lin: DynamicLinear, x: torch.Tensor) -> torch.Tensor:
        """Forward of fc1 (or the value / gate Linear) and of fc2."""
        if lin._dc_role == "mlp_in":
            call = self.call
            # A gated MLP's second input Linear reads the same x: it joins the call begun by
            # the first instead of drawing new masks.
            if call is None or call.x is not x:
                call = self._begin(x)
            if not call.sliced:
                return routed_linear(self.bank, lin, x)
            d, gather = call.decision, call.gathered()
            if d is None:
                return routed_linear(self.bank, lin, call.x_sel, gather=gather)
            rows = d.rows[lin._dc_name]  # the active groups' rows (of each LoRA's B too)
            return routed_linear(self.bank, lin, call.x_sel, "rows", d.key, rows, gather)
        call, self.call = self.call, None  # fc2 ends the call
        if call is None:  # fc2 without fc1 in this call: nothing to route
            return routed_linear(self.bank, lin, x)
        if call.sliced:
            return self._fast_out(lin, x, call)
        # Masked path: zero the switched-off groups' channels before fc2.
        width, tokens = call.width, call.tokens
        if width is not None:
            x = self.masked_out(lin._dc_name, width, x)  # (B, N, F)
        y = routed_linear(self.bank, lin, x)  # (B, N, D), LoRA updates included
        if tokens is not None:
            # The mask multiplies fc2's output, bias included: a skipped token's MLP update is
            # exactly zero, so the residual x + g * 0 passes it on unchanged, as the fast path
            # (which never computes it) does. In training the mask is the straight-through
            # Gumbel value, so this product also carries the token router's gradient.
            y = y * tokens.unsqueeze(-1).to(y.dtype)
        return y

    def out_state(self) -> OutState:
        """For a shared fc2 (parallel block): decision, sliced?, group mask if masked, and the
        call (its tokens); ends the MLP call begun at fc1."""
        call, self.call = self.call, None
        if call is None:
            return OutState(None, False, None)
        if call.sliced:
            return OutState(call.decision, True, None, call)
        return OutState(None, False, call.width, call)

    def _fast_out(self, lin: nn.Linear, h: torch.Tensor, call: MlpCall) -> torch.Tensor:
        """fc2 on a sliced path: h (K, F') or (B, N, F') -> (B, N, D), scattered into zeros."""
        d, idx, lead = call.decision, call.idx, call.lead
        if d is not None and d.sub is not None:  # several timesteps in the batch: mask per sample
            n = math.prod(lead[1:]) if len(lead) > 1 else 1  # tokens per row
            rows = idx if idx is not None else torch.arange(math.prod(lead), device=h.device)
            # Token r of the flattened B * N belongs to row r // n, which belongs to its sample.
            sub = per_row(d.sub[lin._dc_name], lead[0]).to(h.dtype)  # (B, C')
            h = h.reshape(-1, h.shape[-1]) * sub.index_select(0, rows // n)
        gather = call.gathered()
        if d is None:
            y = routed_linear(self.bank, lin, h, gather=gather)
        else:  # the active groups' columns (of each LoRA's A too)
            y = routed_linear(self.bank, lin, h, "cols", d.key, d.cols[lin._dc_name], gather)
        # y: (K, D) or (B, N, D), a LoRA's update included: a skipped token gets none
        if call.keep is not None:  # planned path: rows under the threshold give zero
            y = y * call.keep.reshape(*y.shape[:-1], 1)  # bool: promotes to y's dtype
        if idx is None:
            return y.reshape(*lead, -1)
        # Skipped tokens get exactly zero (no bias), as on the masked path; an empty selection
        # gives all zeros.
        out = y.new_zeros(math.prod(lead), y.shape[-1])  # (B * N, D)
        out.index_copy_(0, idx, y.reshape(-1, y.shape[-1]))
        return out.reshape(*lead, -1)  # (B, N, D)
