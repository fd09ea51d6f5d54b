"""The rule of gated attention: the gate the output side found (headout.py) is one Linear, not
one of the q, k or v projections, and each of its rows scales one head.

Example:
    >>> from dynconvert.analysis import analyze
    >>> from dynconvert.testing import PATTERN_MODELS
    >>> site = analyze(*PATTERN_MODELS["gated-per-head"]()).attention[0]
    >>> site.parts["gate"].linear, "layers.0.attn.to_gate" in [m.linear for m in site.in_maps]
    ('layers.0.attn.to_gate', True)
"""

from __future__ import annotations

from dynconvert.analysis.evidence import Evidence, Finding
from dynconvert.analysis.layout import ChainError
from dynconvert.sites import register_finder
from dynconvert.sites.gate import Gate


@register_finder("gate")
def find_gate(ev: Evidence) -> Finding | None:
    """The gate part, with the gate's rows per unit as one more input projection.

    Raises:
        ChainError: several gates, or a gate that is also a q, k or v projection.
    """
    if not ev.gates:
        return None
    if len(ev.gates) > 1:
        raise ChainError("several gates scale the attention output")
    gate = ev.gates[0]
    node = gate.node
    if node.linear in ev.projections:
        raise ChainError(f"the gate {node.linear} is also a q, k or v projection")
    part = Gate(node.linear, node.args[0].shape[-1], node.shape[-1])
    return Finding(part, inputs=[(node, ev.per_unit(gate.table))])
