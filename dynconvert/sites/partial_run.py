"""The runtime of a partial site: a forward hook on each cut module (a norm across all heads)
whose output, computed in full, keeps only the active heads' channels on the fast path.

Example:
    >>> from dynconvert.sites import RUNTIMES, load
    >>> load("run")
    >>> type(RUNTIMES["partial"]).__name__
    'PartialRun'
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dynconvert.sites import PartRuntime, register_runtime
from dynconvert.sites.partial import PartialCut


@register_runtime("partial")
class PartialRun(PartRuntime):
    """Hooks the cut modules of a partial site."""

    def attach(self, rt: Any, part: PartialCut, modules: dict[str, nn.Module]) -> list[Any]:
        """A forward hook on every cut module; returns the handles."""
        return [modules[m.linear].register_forward_hook(_cut(rt, m.linear)) for m in part.cut_maps]


def _cut(rt: Any, name: str) -> Any:
    """The hook of cut module ``name``: (..., H * d) -> (..., H' * d) on a sliced call."""

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        d = rt.fast  # this call's decision (None: full or masked path, nothing to cut)
        if d is None:
            return None
        return output.index_select(-1, d.rows[name])  # (..., H' * d)

    return hook
