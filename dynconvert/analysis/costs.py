"""Multiply-accumulates (MACs) of one graph op, from its input and output shapes.

Convention: one multiply-accumulate counts as one MAC. This is what DiT and DyDiT call a
"FLOP"; hardware FLOPs are 2x these numbers (``torch.utils.flop_counter`` counts 2 per MAC).
Elementwise ops, norms and softmax are not counted (as in DiT, fvcore and FlopCounterMode).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch

from dynconvert.analysis.graph import OpNode


def _numel(shape: tuple[int, ...] | None) -> int:
    """Elements of a shape (0 when unknown)."""
    return math.prod(shape) if shape else 0


def node_macs(node: OpNode) -> int:
    """MACs of one op (0 for ops that are not matrix products or convolutions).

    An op whose input shapes were not captured counts 0 (it cannot be costed, and it is
    never one of the sites' ops, which are costed from the plan).
    """
    if node.kind == "linear":
        # Each output element is one dot product over the input features.
        x = node.args[0]
        k = x.shape[-1] if isinstance(x, OpNode) and x.shape else 0
        return _numel(node.shape) * k
    if node.kind == "conv":
        # Each output element sums over in_channels / groups x kernel: the weight's dims 1..
        w = node.args[1]
        if not isinstance(w, OpNode) or not w.shape:
            return 0
        return _numel(node.shape) * math.prod(w.shape[1:])
    if node.kind == "attention":
        # sdpa = QK^T (N x M x d per head) + AV (N x M x dv per head); the softmax is free.
        q, k, v = node.args[0], node.args[1], node.args[2]
        if not all(isinstance(a, OpNode) and a.shape for a in (q, k, v)):
            return 0
        *lead, n, d = q.shape  # (B, H, N, d)
        m, dv = k.shape[-2], v.shape[-1]  # k (B, H, M, d), v (B, H, M, dv)
        return math.prod(lead) * n * m * (d + dv)
    if node.kind == "matmul":
        return _matmul_macs(node)
    return 0


def _matmul_macs(node: OpNode) -> int:
    """Output elements times the contracted size k of the left operand."""
    op = node.op
    if op == "einsum":
        return _einsum_macs(node)
    if op in ("addmm", "baddbmm", "addbmm"):
        a = node.args[1]  # addmm(bias, a, b): the product comes second
    else:
        a = node.args[0]
    if not isinstance(a, OpNode) or not a.shape:
        return 0
    k = a.shape[-1] if len(a.shape) > 1 else a.shape[0]  # a 1-D left operand is a vector
    if op == "addbmm":  # sums a batch of products into one output: the batch multiplies too
        return _numel(node.shape) * k * a.shape[0]
    return _numel(node.shape) * k


def _einsum_macs(node: OpNode) -> int:
    """A two-operand einsum: the product of the sizes of every distinct index letter.

    Each output element sums over the contracted letters, so the count is every letter's size
    multiplied together. Ellipses and other operand counts are not costed (0).
    """
    eq = node.args[0]
    operands = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
    if not isinstance(eq, str) or len(operands) != 2:
        return 0
    lhs = eq.replace(" ", "").split("->")[0]
    terms = lhs.split(",")  # "bhnd,bhmd" -> ["bhnd", "bhmd"]
    sizes: dict[str, int] = {}  # index letter -> size
    for term, opnd in zip(terms, operands):
        if not isinstance(opnd, OpNode) or not opnd.shape or "..." in term:
            return 0
        for ch, s in zip(re.sub(r"[^a-zA-Z]", "", term), opnd.shape):
            sizes[ch] = int(s)
    return math.prod(sizes.values())


def call_macs(fn: Callable[[], Any], params: Iterable[torch.nn.Parameter] = ()) -> float:
    """MACs ``fn()`` executes, counted by torch.utils.flop_counter (math attention, so QK^T and
    AV are counted matmuls; 2 FLOPs a MAC). ``params`` (the model's) do not require grad while
    counting: the counter's module tracker hooks the backward of every input that requires grad
    and fails on a view of a parameter made under no_grad (a learned query bank sliced in the
    forward, as in Bria Fibo 2).

    Example:
        >>> lin = torch.nn.Linear(4, 3)
        >>> call_macs(lambda: lin(torch.zeros(2, 4)), lin.parameters())
        24.0
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    flags = [(p, p.requires_grad) for p in params]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            fn()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return counter.get_total_flops() / 2


def eager_macs(model: torch.nn.Module, args: tuple, kwargs: dict) -> float:
    """MACs one eager forward executes (:func:`call_macs`). The ground truth where a capture
    could not see every op."""
    return call_macs(lambda: model(*args, **kwargs), model.parameters())
