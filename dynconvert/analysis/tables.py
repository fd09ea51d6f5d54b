"""Values of an exported graph's nodes at given inputs: what ``OpGraph.evaluate`` runs (the
table form matches per-head tables with the attention module's arguments by value this way,
sites/table_find.py)."""

from __future__ import annotations

from typing import Any

import torch
from torch.fx._pytree import tree_flatten_spec


def node_values(
    ep: torch.export.ExportedProgram, args: tuple, kwargs: dict, names: set[str]
) -> dict[str, Any]:
    """The values of the nodes ``names`` of an exported graph at ``(args, kwargs)`` (one run).

    Example:
        >>> ep = torch.export.export(torch.nn.Linear(2, 2), (torch.ones(1, 2),))
        >>> list(node_values(ep, (torch.ones(1, 2),), {}, {"linear"}))
        ['linear']
    """
    gm = ep.module()
    found: dict[str, Any] = {}

    class _Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            out = super().run_node(n)
            if n.name in names:
                found[n.name] = out
            return out

    flat = tree_flatten_spec((tuple(args), dict(kwargs)), gm._in_spec)  # in the export's order
    with torch.no_grad():
        _Recorder(gm).run(*flat)
    return found
