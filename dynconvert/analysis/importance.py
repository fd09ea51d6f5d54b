"""Importance scores that pick the always-on unit of every width router.

A score function takes the site and its Linears (``{fqn: nn.Linear}``) and returns one score per
unit (head or channel group); the unit with the highest score is the one that can never be
switched off. :func:`unit_weights` gives, per unit, every weight entry it owns, for score
functions that want them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dynconvert.plan import Site

ScoreFn = Callable[[Site, dict[str, torch.nn.Linear]], torch.Tensor]


def _unit_index(m) -> torch.Tensor:  # (units, indices per unit)
    return torch.tensor([m.indices(u) for u in range(m.units)], dtype=torch.long)


def magnitude(site: Site, linears: dict[str, torch.nn.Linear]) -> torch.Tensor:
    """L2 norm of all weights a unit owns: its input rows (and biases) and output columns.

    Computed from per-row / per-column norms, without copying weights.
    """
    total = torch.zeros(site.in_maps[0].units, dtype=torch.float64)
    for m in site.maps():
        lin = linears[m.linear]
        w = lin.weight.detach()
        w = (
            w.flatten(1) if m.axis == "rows" else w.transpose(0, 1).flatten(1)
        )  # (units' axis, rest); convs too
        sq = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32).pow(2)
        if m.axis == "rows" and lin.bias is not None:
            sq = sq + lin.bias.detach().float().pow(2)
        total += sq.double().cpu()[_unit_index(m)].sum(1)
    return total.sqrt()


def first(site: Site, linears: dict[str, torch.nn.Linear]) -> torch.Tensor:
    """Unit 0 is the always-on unit (the original code's choice, without re-ranking)."""
    scores = torch.zeros(site.in_maps[0].units)
    scores[0] = 1.0
    return scores


IMPORTANCE: dict[str, ScoreFn] = {"magnitude": magnitude, "first": first}


def unit_weights(site: Site, linears: dict[str, torch.nn.Linear]) -> list[torch.Tensor]:
    """For each unit, every weight entry it owns as one flat tensor (for custom score functions).

    Example:
        >>> def by_mean(site, linears):
        ...     return torch.stack([w.abs().mean() for w in unit_weights(site, linears)])
    """
    out = []
    for u in range(site.in_maps[0].units):
        pieces = []
        for m in site.maps():
            lin = linears[m.linear]
            idx = torch.tensor(m.indices(u), dtype=torch.long, device=lin.weight.device)
            w = lin.weight.detach()
            pieces.append(
                (w.index_select(0, idx) if m.axis == "rows" else w.index_select(1, idx)).flatten()
            )
            if m.axis == "rows" and lin.bias is not None:
                pieces.append(lin.bias.detach().index_select(0, idx))
        out.append(torch.cat(pieces))
    return out


def always_on_unit(site: Site, linears: dict[str, torch.nn.Linear], score: str | ScoreFn) -> int:
    """Index of the unit with the highest importance score."""
    fn = IMPORTANCE[score] if isinstance(score, str) else score
    return int(torch.as_tensor(fn(site, linears)).argmax())
