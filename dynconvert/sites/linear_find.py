"""The rule of linear attention: the call finder (calls.py) read ``(v @ k) @ q`` with q
channels first, (B, H, d, N); its products' MACs per row are counted from the graph.

Example:
    >>> from dynconvert.analysis import analyze
    >>> from dynconvert.testing import PATTERN_MODELS
    >>> site = analyze(*PATTERN_MODELS["sana-like"]()).attention[0]
    >>> site.parts["linear"].example_macs, site.fast_reason
    (9216, 'unverified')
"""

from __future__ import annotations

from dynconvert.analysis.costs import node_macs
from dynconvert.analysis.evidence import Evidence, Finding
from dynconvert.sites import register_finder
from dynconvert.sites.linear import LinearAttention


@register_finder("linear")
def find_linear(ev: Evidence) -> Finding | None:
    """The part for a channels-first query; its sliced call is checked once at convert."""
    if ev.call.q_layout != "bhdn":
        return None
    macs = sum(node_macs(c) for c in ev.call.cost_nodes) // ev.call.q.shape[0]  # per row
    return Finding(LinearAttention(macs), unverified=True)
