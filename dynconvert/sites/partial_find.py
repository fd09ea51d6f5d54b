"""The rule of a partial site: the modules the input side found to mix heads (headlocal.py's
cuts), each with the Linears whose every path to the attention passes it.

Example:
    >>> from dynconvert.analysis import analyze
    >>> from dynconvert.testing import PATTERN_MODELS
    >>> analyze(*PATTERN_MODELS["qknorm-all-heads"]()).attention[0].parts["partial"].unsliced
    ['layers.0.attn.to_k', 'layers.0.attn.to_q']
"""

from __future__ import annotations

from dynconvert.analysis.evidence import Evidence, Finding
from dynconvert.sites import register_finder
from dynconvert.sites.partial import PartialCut


@register_finder("partial")
def find_partial(ev: Evidence) -> Finding | None:
    """The part when a norm across all heads stands between projections and the attention:
    its Linears stay at full width, its output channels are cut per unit."""
    cuts = ev.layout.cuts
    if not cuts:
        return None
    unsliced = sorted({lin for cut in cuts.values() for lin in cut.linears})
    maps = [ev.unit_map(mod, [ev.per_unit(cut.table)]) for mod, cut in cuts.items()]
    return Finding(PartialCut(maps, unsliced), full_width=unsliced)
