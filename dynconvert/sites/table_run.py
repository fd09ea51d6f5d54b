"""The runtime of tables per head: on a sliced call, every per-head table among the attention
module's arguments is cut to the active heads' positions along its axis.

Example:
    >>> from dynconvert.sites import RUNTIMES, load
    >>> load("run")
    >>> type(RUNTIMES["table"]).__name__
    'TableRun'
"""

from __future__ import annotations

from typing import Any

from torch.utils import _pytree as pytree

from dynconvert.sites import PartRuntime, register_runtime
from dynconvert.sites.table import TableCut


@register_runtime("table")
class TableRun(PartRuntime):
    """Cuts the per-head tables handed to the attention module."""

    def arguments(
        self, rt: Any, part: TableCut, args: tuple, kwargs: dict, decision: Any
    ) -> tuple[tuple, dict]:
        """The module's arguments with every per-head table (a rotary table over the whole
        width, (B, N, H * d)) cut to the active heads' positions along its axis."""
        leaves, spec = pytree.tree_flatten_with_path((args, kwargs))
        cut = {t.path: t for t in part.args}
        out = []
        for path, leaf in leaves:
            t = cut.pop(pytree.keystr(path), None)
            out.append(leaf if t is None else leaf.index_select(t.dim, decision.rows[t.path]))
        if cut:
            raise RuntimeError(
                f"{rt.site.name or 'the model'} was called without the per-head table that "
                f"analysis found at {next(iter(cut))} of its arguments; call it as in the example "
                "inputs, or convert again with inputs that call it this way"
            )
        return pytree.tree_unflatten(out, spec)
