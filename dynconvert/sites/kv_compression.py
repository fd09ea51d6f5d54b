"""Key/value compression (PixArt-Sigma, PVT's spatial reduction): keys and values are
downsampled between their projections and the attention, which sees 1 / ``stride`` of the
tokens the k and v projections ran on (the site's ``tokens_kv`` counts the projections' tokens).

The model's own code downsamples whatever heads it is given: no runtime hook. A norm across all
heads after the downsampling makes the site partial too (sites/partial.py).

Example:
    >>> KvCompression(stride=4).keys_seen(16)  # 2 x 2 tokens per key
    4
"""

from __future__ import annotations

from dataclasses import dataclass

from dynconvert.sites import AttentionPart, register_part


@register_part("kv_compression")
@dataclass
class KvCompression(AttentionPart):
    """Keys and values downsampled before the attention."""

    stride: int  # key/value projection tokens per key the attention sees

    V2 = {"kv_stride": ("stride", 1)}

    def keys_seen(self, keys: int) -> int:
        """QK^T and AV run over 1 / stride of the projections' tokens."""
        return keys // self.stride
