"""Shared pieces of layout derivation: the refusal error, how ops are named in it, regular parts.

The derivation itself (replaying the ops between projections and attention on index tensors)
lives in headlocal.py.
"""

from __future__ import annotations

import torch

from dynconvert.analysis.graph import OpNode


class ChainError(Exception):
    """The path between two ops holds something that masking and slicing cannot follow."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def describe(node: OpNode) -> str:
    """The op and its module, for a refusal reason: "`mul` in blocks.0.attn (Attention)"."""
    where = node.module_class.rsplit(".", 1)[-1] if node.module_class else "model"
    return f"`{node.op}` in {node.module or '<root>'} ({where})"


def as_parts(table: torch.Tensor) -> tuple[int, int, int] | None:
    """Express an (H, d) table as ``base + h * stride + j`` if it has that form.

    Returns ``(base, stride, d)``, a part of a UnitMap, or None for any other layout.

    Example:
        >>> as_parts(torch.tensor([[32, 33], [40, 41]]))  # rows 32-33 for head 0, 40-41 for 1
        (32, 8, 2)
    """
    h, d = table.shape
    base = int(table[0, 0])
    stride = int(table[1, 0] - table[0, 0]) if h > 1 else d
    expect = base + torch.arange(h)[:, None] * stride + torch.arange(d)[None, :]
    return (base, stride, d) if torch.equal(table.cpu(), expect) else None
