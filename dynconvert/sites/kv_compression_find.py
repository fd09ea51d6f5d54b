"""The rule of key/value compression: more than one projection row per attention key.

The core measures that ratio for every attention (``analysis.streams.kv_stride``, which refuses
queries resampled, and keys or values repeated or resampled by different factors): the token
counts of every stream depend on it.

Example:
    >>> from dynconvert.analysis import analyze
    >>> from dynconvert.testing import PATTERN_MODELS
    >>> analyze(*PATTERN_MODELS["kv-uniform"]()).attention[0].parts["kv_compression"]
    KvCompression(stride=4)
"""

from __future__ import annotations

from dynconvert.analysis.evidence import Evidence, Finding
from dynconvert.sites import register_finder
from dynconvert.sites.kv_compression import KvCompression


@register_finder("kv_compression")
def find_kv_compression(ev: Evidence) -> Finding | None:
    """The part when keys and values reach the attention downsampled (stride > 1)."""
    return Finding(KvCompression(ev.stride)) if ev.stride > 1 else None
