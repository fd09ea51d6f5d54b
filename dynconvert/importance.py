"""Importance scores that pick the always-on unit of every width router.

A score function takes the site and a dict of the weights it touches
(``{"rows": [W, ...], "cols": W_out}``, already split per unit) and returns one score per unit.
The unit with the highest score is the one that can never be switched off.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dynconvert.plan import Site, UnitMap

ScoreFn = Callable[[Site, list[torch.Tensor]], torch.Tensor]


def magnitude(site: Site, per_unit: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all weights a unit owns (input rows and output columns together).

    Example:
        >>> import torch
        >>> magnitude(None, [torch.ones(2, 3), torch.zeros(2, 3)]).tolist()
        [2.4494898319244385, 0.0]
    """
    return torch.stack([w.float().pow(2).sum().sqrt() for w in per_unit])


def first(site: Site, per_unit: list[torch.Tensor]) -> torch.Tensor:
    """Unit 0 is the always-on unit (the original code's choice, without re-ranking)."""
    scores = torch.zeros(len(per_unit))
    scores[0] = 1.0
    return scores


IMPORTANCE: dict[str, ScoreFn] = {"magnitude": magnitude, "first": first}


def unit_weights(site: Site, linears: dict[str, torch.nn.Linear]) -> list[torch.Tensor]:
    """Gather, for each unit of a site, every weight entry it owns as one flat tensor."""
    maps: list[UnitMap] = [*site.in_maps, site.out_map]
    out = []
    for u in range(site.in_maps[0].units):
        pieces = []
        for m in maps:
            w = linears[m.linear].weight.detach()
            idx = torch.tensor(m.indices(u), dtype=torch.long, device=w.device)
            pieces.append((w.index_select(0, idx) if m.axis == "rows" else w.index_select(1, idx)).flatten())
            bias = linears[m.linear].bias
            if m.axis == "rows" and bias is not None:
                pieces.append(bias.detach().index_select(0, idx))
        out.append(torch.cat(pieces))
    return out


def _magnitude_fast(site: Site, linears: dict[str, torch.nn.Linear]) -> torch.Tensor:
    """Same scores as :func:`magnitude`, from per-row/column squared norms (no weight copies)."""
    total = torch.zeros(site.in_maps[0].units, dtype=torch.float64)
    for m in [*site.in_maps, site.out_map]:
        lin = linears[m.linear]
        w = lin.weight.detach()
        sq = torch.linalg.vector_norm(w, dim=1 if m.axis == "rows" else 0, dtype=torch.float32).pow(2)
        if m.axis == "rows" and lin.bias is not None:
            sq = sq + lin.bias.detach().float().pow(2)
        table = torch.tensor([m.indices(u) for u in range(m.units)], dtype=torch.long)  # (U, S)
        total += sq.double().cpu()[table].sum(1)
    return total.sqrt()


def always_on_unit(site: Site, linears: dict[str, torch.nn.Linear], score: str | ScoreFn) -> int:
    """Index of the unit with the highest importance score."""
    if score == "magnitude":
        return int(_magnitude_fast(site, linears).argmax())
    fn = IMPORTANCE[score] if isinstance(score, str) else score
    scores = fn(site, unit_weights(site, linears))
    return int(torch.as_tensor(scores).argmax())
