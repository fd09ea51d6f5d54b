"""The rule of tables per head handed in: which argument of the attention module each is.

LTX-Video computes its rotary cos / sin tables once, over the whole width (B, N, heads x d),
and passes them through every block into the attention, where they multiply q and k. Removing
a head then needs the table's columns of that head removed too. headlocal.py finds such a
table where it meets the projection (:class:`TableUse`); here it is followed back to where it
enters the attention module, and matched by value with the module's arguments on one forward
pass (``plan_from_graph`` calls :func:`resolve` once for every site that has such tables), so
that the fast path can cut that argument (a pytree path such as
``[1]['image_rotary_emb'][0]``) with the active heads (table_run.py).

Example:
    >>> from dynconvert.analysis import analyze
    >>> from dynconvert.testing import PATTERN_MODELS
    >>> site = analyze(*PATTERN_MODELS["rotary-wide-table"]()).attention[0]
    >>> [(t.path, t.dim) for t in site.parts["table"].args]
    [('[0][1][0]', -1), ('[0][1][1]', -1)]
"""

from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

from dynconvert.analysis.graph import OpGraph, OpNode
from dynconvert.analysis.layout import describe
from dynconvert.analysis.meta import meta_eager
from dynconvert.analysis.replay import TableUse, replay_chain
from dynconvert.inputs import eval_mode
from dynconvert.plan import AttentionSite, UnitMap
from dynconvert.sites.table import TableArg, TableCut


def entering(use: TableUse, module: str) -> OpNode | str:
    """The tensor a table use starts from where it enters ``module``: followed back through
    casts and shape ops, which must leave every position along ``use.dim`` where it was
    (replayed on indices: a flip, roll or transpose of equal axes would move them). A reason
    when it is computed inside the module, or moved there (it cannot be cut at the argument)."""
    chain, n = [], use.node
    while module == "" or n.module == module or n.module.startswith(module + "."):
        src = n.inputs[0] if len(n.inputs) == 1 else None
        ok = n.kind == "cast" or (n.kind == "shape" and n.replay is not None)
        if not ok or src is None or src.shape is None or n.shape is None:
            return (
                f"a table that differs per head ({describe(use.op)}) is computed inside the "
                "attention module, not handed to it: it cannot be cut with the heads"
            )
        chain.insert(0, n)
        n = src
    if chain and not _keeps_positions(n, chain, use.dim):
        return (
            "a table that differs per head is reordered inside the attention "
            f"({describe(chain[-1])})"
        )
    return n


def _keeps_positions(src: OpNode, chain: list[OpNode], dim: int) -> bool:
    """Whether the ops ``chain`` from ``src`` keep every position along axis ``dim`` (negative)
    at the same index there, whatever they do to the other axes."""
    if len(src.shape) < -dim:
        return False
    index = torch.arange(src.shape[dim]).reshape(-1, *[1] * (-dim - 1)).expand(*src.shape)
    out = replay_chain(src, index, chain)  # None: an op that does not replay on indices
    if not isinstance(out, torch.Tensor) or out.dim() < -dim or out.shape[dim] != src.shape[dim]:
        return False
    want = torch.arange(out.shape[dim]).reshape(-1, *[1] * (-dim - 1))
    return torch.equal(out, want.expand_as(out))


def module_inputs(
    model: torch.nn.Module, args: tuple, kwargs: dict, names: set[str]
) -> dict[str, list]:
    """Module fqn -> ``[(pytree path, leaf), ...]`` of its first call's ``(args, kwargs)``."""
    seen: dict[str, list] = {}
    hooks = []
    for name in names:

        def record(_m: torch.nn.Module, a: tuple, kw: dict, _name: str = name) -> None:
            if _name not in seen:
                leaves, _ = pytree.tree_flatten_with_path((a, kw))
                seen[_name] = [(pytree.keystr(p), leaf) for p, leaf in leaves]

        hooks.append(model.get_submodule(name).register_forward_pre_hook(record, with_kwargs=True))
    try:
        # as the graph was captured (no dropout); a meta model: tables made from the inputs
        # alone keep their values (meta.py), those the weights touch have shapes only
        with torch.no_grad(), eval_mode(model), meta_eager(model):
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def resolve(
    model: torch.nn.Module,
    graph: OpGraph,
    args: tuple,
    kwargs: dict,
    pending: list[tuple[AttentionSite, list[TableUse]]],
) -> dict[int, str]:
    """Give every pending site its table part; returns ``id(site) -> reason`` for those whose
    tables cannot be cut (they are not converted)."""
    failed: dict[int, str] = {}
    starts: dict[int, list[tuple[OpNode, TableUse]]] = {}
    for site, uses in pending:
        found = [(entering(u, site.name), u) for u in uses]
        reason = next((r for r, _ in found if isinstance(r, str)), None)
        if reason is not None:
            failed[id(site)] = reason
        elif graph.evaluate is None:
            failed[id(site)] = (
                "a table that differs per head is handed to the attention, and the model was "
                "not captured whole by torch.export, so which argument it is cannot be found"
            )
        else:
            starts[id(site)] = found  # type: ignore[assignment]
    todo = [(s, u) for s, u in pending if id(s) in starts]
    if not todo:
        return failed
    values = graph.evaluate({n.name for found in starts.values() for n, _ in found})
    inputs = module_inputs(model, args, kwargs, {s.name for s, _ in todo})
    for site, _ in todo:
        tables: dict[str, TableArg] = {}
        for node, use in starts[id(site)]:
            value = values.get(node.name)
            paths = [
                p
                for p, leaf in inputs.get(site.name, [])
                if isinstance(leaf, torch.Tensor)
                and isinstance(value, torch.Tensor)
                and not (leaf.is_meta or value.is_meta)  # no values to compare
                and leaf.shape == value.shape
                and torch.equal(leaf, value)
            ]
            if not paths and isinstance(value, torch.Tensor) and value.is_meta:
                failed[id(site)] = (
                    f"a table that differs per head ({describe(use.op)}) is matched with the "
                    "attention module's arguments by value, and the model is on the meta "
                    "device: convert it with its weights to route this site"
                )
                break
            if not paths:
                failed[id(site)] = (
                    f"a table that differs per head ({describe(use.op)}) matches none of the "
                    "attention module's arguments"
                )
                break
            # The same table given twice (Lumina's query_rotary_emb and key_rotary_emb): both
            # are cut alike; convert's check of the fast path covers the case where one is not
            # the one multiplied.
            args = [_table_arg(p, use, site.units) for p in paths]
            bad = next((a for a in args if isinstance(a, str)), None)
            bad = bad or next(
                (
                    f"{a.path} is cut differently by its uses"
                    for a in args
                    if a.path in tables and tables[a.path] != a
                ),
                None,
            )  # type: ignore[union-attr]
            if bad:
                failed[id(site)] = bad
                break
            tables.update({a.path: a for a in args})  # type: ignore[union-attr]
        else:
            site.parts["table"] = TableCut(list(tables.values()))
            site.fast_reason = site.fast_reason or "unverified"  # convert checks the cut once
    return failed


def _table_arg(path: str, use: TableUse, units: int) -> TableArg | str:
    """The table at ``path`` cut along ``use.dim``: every unit's positions, ascending."""
    per_unit = [(use.heads == u).nonzero().squeeze(1).tolist() for u in range(units)]
    if len({len(p) for p in per_unit}) != 1 or not per_unit[0]:
        return f"the table at {path} does not give every head the same number of positions"
    return TableArg(path, use.dim, UnitMap(path, "rows", units, explicit=[per_unit]))
