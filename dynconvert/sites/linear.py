"""Linear (kernel) attention (Sana's ReLU attention): ``(v @ k) @ q`` per head, no softmax.

Its two per-head products cost ``example_macs`` per row at the example tokens, in proportion
to query + key tokens (not N x M as softmax attention). The model's code runs whatever heads it
is given: no runtime hook; its rule asks convert to check the sliced call once.

Example:
    >>> LinearAttention(example_macs=9216).kind, LinearAttention.V2
    ('linear', {'linear_macs': ('example_macs', 0)})
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dynconvert.sites import AttentionPart, register_part


@register_part("linear")
@dataclass
class LinearAttention(AttentionPart):
    """The cost of a linear attention's per-head products."""

    example_macs: int  # MACs per row of (v @ k) and (.. @ q) at the example tokens

    V2 = {"linear_macs": ("example_macs", 0)}

    def attention_macs(self, site: Any, queries: int, keys: int) -> int | None:
        """The example's MACs scaled by (queries + keys) over the example's tokens (every
        stream's query and key projection tokens)."""
        seen = sum(s.tokens_q + s.tokens_kv for s in site.every_stream())
        return self.example_macs * (queries + keys) // max(1, seen)
