"""Values of an exported graph's nodes at given inputs: what ``OpGraph.evaluate`` runs (the
table form matches per-head tables with the attention module's arguments by value this way,
sites/table_find.py).

A model on the meta device has no values, but a table computed from the inputs alone (LTX's
rotary cos / sin) does: the graph is rerun on the CPU inputs under :class:`Replay`, so that
what the weights never touch is computed on the CPU, as in the eager run it is matched with.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.fx._pytree import tree_flatten_spec
from torch.utils import _pytree as pytree

from dynconvert.analysis.meta import MetaMix


class Replay(MetaMix):
    """:class:`MetaMix` for rerunning a meta model's exported graph on CPU inputs: a tensor
    made from Python numbers alone (``arange``, ``zeros``) or moved to the inputs' device, which
    the capture on meta recorded as the meta device, stays on the CPU, as in the eager run."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._assert_tensor_metadata.default:
            return None  # the capture's device (meta) asserted where the replay is on the CPU
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "meta":
            leaves = pytree.tree_leaves((args, kwargs))
            if not any(isinstance(t, torch.Tensor) and t.is_meta for t in leaves):
                kwargs = {**kwargs, "device": torch.device("cpu")}  # made or moved: no weights
        return super().__torch_function__(func, types, args, kwargs)


def node_values(
    ep: torch.export.ExportedProgram,
    args: tuple,
    kwargs: dict,
    names: set[str],
    meta: bool = False,
) -> dict[str, Any]:
    """The values of the nodes ``names`` of an exported graph at ``(args, kwargs)`` (one run;
    ``meta``: the graph of a meta model, rerun on CPU inputs under :class:`Replay`).

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
    with torch.no_grad(), Replay() if meta else contextlib.nullcontext():
        _Recorder(gm).run(*flat)
    return found
