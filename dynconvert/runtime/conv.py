"""The runtime of a convolutional MLP site (Sana's GLUMBConv, Mix-FFN), channels first.

Its pointwise and depthwise convolutions are DynamicConvs (dynamic.py) that call
:meth:`ConvMlpRuntime.conv_forward`; the unit tables, decisions and weight slices are those of
every site (``dynamic.SiteRuntime``, ``slices.py``), with channels on dim 1 instead of last.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynconvert.plan import MlpSite
from dynconvert.runtime.dynamic import SiteRuntime, column_multiplier, unit_table
from dynconvert.runtime.interfaces import CallRouting, MlpCall
from dynconvert.runtime.lora_run import routed_linear
from dynconvert.runtime.mlp import record_mlp_call

CONV_FNS = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}
"""Weight dims -> the functional convolution (a depthwise conv runs with its groups lowered)."""


class ConvMlpRuntime(SiteRuntime):
    """Routes a convolutional MLP site (channels first): channel groups are fc1's output
    channels, each depthwise convolution's channels and fc2's input channels. Width only: the
    masked path zeroes the switched-off groups' channels before fc2, the fast path (and the
    planned one, which decides per pattern) runs every convolution on the active channels."""

    site: MlpSite

    # This thread's MLP call in progress (its input, sliced?, decision), or None.
    call = SiteRuntime.in_progress

    def __init__(self, site: MlpSite, bank: CallRouting):
        super().__init__(site, bank, site.hidden // site.groups)
        self.tables.update({m.linear: unit_table(m) for m in site.mid_maps})  # depthwise channels

    def _begin(self, x: torch.Tensor) -> MlpCall:
        site, bank = self.site, self.bank
        record_mlp_call(site, bank.record(site.index), torch.Size([x.shape[0], *x.shape[2:]]))
        bank.width_mask(site.index)  # recorded for the FLOPs accountant
        sliced = bank.fast_for(site)
        d = bank.decision(self, x.device) if sliced else None  # the execution mode decides
        self.call = MlpCall(x=x, sliced=sliced, decision=d)
        return self.call

    def conv_forward(self, conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Forward of fc1 (B, D, ...) -> (B, F1', ...), a depthwise convolution, or fc2."""
        role, name = conv._dc_role, conv._dc_name
        if role == "mlp_in":
            call = self.call
            if call is None or call.x is not x:  # a second input conv reads the same x
                call = self._begin(x)
            d = call.decision
            if d is None:
                return routed_linear(self.bank, conv, x)
            return routed_linear(self.bank, conv, x, "rows", d.key, d.rows[name])
        if role == "mlp_mid":
            d = self.call.decision if self.call is not None else None
            if d is None:
                return conv._conv_forward(x, conv.weight, conv.bias)
            rows = d.rows[name]
            w, b = self.bank.sliced(conv, "rows", d.key, rows)  # one filter per active channel
            fn = CONV_FNS[w.dim()]
            return fn(x, w, b, conv.stride, conv.padding, conv.dilation, rows.numel())
        call, self.call = self.call, None  # fc2 ends the call
        d = call.decision if call is not None else None
        if d is not None:
            if d.sub is not None:  # several timesteps: zero each sample's extra groups
                x = x * column_multiplier(d.sub[name], x, channels_first=True)
            return routed_linear(self.bank, conv, x, "cols", d.key, d.cols[name])
        mask = (
            self.bank.width_mask(self.site.index) if call is not None and not call.sliced else None
        )
        if mask is not None:  # masked path: the switched-off groups' channels are zero
            owner = self.owner(name, mask.device)
            x = x * column_multiplier(mask.index_select(1, owner), x, channels_first=True)
        return routed_linear(self.bank, conv, x)
