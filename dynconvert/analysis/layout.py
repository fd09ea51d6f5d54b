"""Follow data from a projection to the attention call (and on to the out-projection).

Layouts are not guessed: the chain of reshapes, permutes and unbinds between a Linear and the
attention call is replayed on an index tensor (each feature holding its own row number), so the
row of every (head, channel) comes out exactly, whatever the model's reshaping code looks like.
"""

from __future__ import annotations

from typing import Any

import torch

from dynconvert.analysis.graph import OpNode


class ChainError(Exception):
    """The path between two ops holds something that masking and slicing cannot follow."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _describe(node: OpNode) -> str:
    """The op and its module, for a refusal reason: "`mul` in blocks.0.attn (Attention)"."""
    where = node.module_class.rsplit(".", 1)[-1] if node.module_class else "model"
    return f"`{node.op}` in {node.module or '<root>'} ({where})"


def _tracked_inputs(node: OpNode) -> list[OpNode]:
    """The inputs that carry data (not parameters, not constants computed in the graph)."""
    return [i for i in node.inputs if i.kind not in ("param",) and not _is_const(i)]


def _is_const(node: OpNode) -> bool:
    return node.kind == "const"


def _scalar_other(node: OpNode, tracked: OpNode) -> bool:
    """True when every operand of a binary op other than ``tracked`` is a Python number."""
    others = [a for a in node.args if a is not tracked]
    return all(isinstance(a, (int, float, bool)) for a in others)


def trace_back(node: OpNode, head_dim: int) -> tuple[OpNode, list[OpNode], list[OpNode]]:
    """Walk from an attention operand back to the Linear that produced it.

    Returns ``(linear_node, chain, norms)`` where chain runs from just after the Linear to
    ``node`` (inclusive). Allowed on the way: reshapes/permutes/unbinds, casts, scaling by a
    number, and per-head normalisation over ``head_dim`` channels (qk-norm).

    Raises:
        ChainError: anything else, with a reason naming the op.
    """
    chain: list[OpNode] = []
    norms: list[OpNode] = []
    cur = node
    while cur.kind != "linear":  # one step back per loop, through head-local ops only
        if cur.is_input or cur.kind in ("param", "const"):
            raise ChainError("its input does not come from a Linear projection")
        tracked = _tracked_inputs(cur)
        if cur.kind in ("shape", "cast", "unary") and len(tracked) == 1:
            nxt = tracked[0]  # view / permute / unbind / split, cast, elementwise
        elif cur.kind == "binary" and len(tracked) == 1 and _scalar_other(cur, tracked[0]):
            nxt = tracked[0]  # q * scale: the same number for every head
        elif cur.kind == "norm" and tracked:
            # qk-norm is head-local (and commutes with removing heads) only if it normalises
            # exactly one head's channels.
            nshape = cur.arg(1, "normalized_shape")
            width = 1
            for s in nshape or []:
                width *= int(s)
            if width != head_dim:
                raise ChainError(
                    f"qk-norm across all heads ({_describe(cur)} normalises {width} channels, "
                    f"a head has {head_dim}); removing heads would change it"
                )
            norms.append(cur)
            nxt = tracked[0]
        elif cur.kind == "binary" and len(tracked) > 1:  # x * cos + rotate(x) * sin, ...
            raise ChainError(
                f"{_describe(cur)} mixes the projection with another tensor "
                "(rotary embedding or similar) before the attention"
            )
        else:
            raise ChainError(f"{_describe(cur)} lies between the projection and the attention")
        chain.append(cur)
        cur = nxt
    chain.reverse()  # Linear output first, as replay() runs it
    return cur, chain, norms


def trace_forward(node: OpNode) -> tuple[OpNode, list[OpNode]]:
    """Walk from the attention output forward to the Linear that consumes it (the out-projection).

    Returns ``(linear_node, chain)``, chain from just after ``node`` to the op feeding the Linear.
    """
    chain: list[OpNode] = []
    cur = node
    while True:
        users = cur.real_users
        if len(users) != 1:  # read elsewhere too: slicing would change that reader's input
            raise ChainError(
                f"the attention output is used {len(users)} times before any projection"
            )
        nxt = users[0]
        if nxt.kind == "linear":
            if nxt.args[0] is not cur:
                raise ChainError(
                    "the attention output reaches the projection as its weight, not input"
                )
            return nxt, chain
        # Only ops that move values (and dropout) may stand between: any op that computes
        # across heads would make zeroing a head differ from removing it.
        if nxt.kind in ("shape", "cast") or (
            nxt.kind == "unary" and nxt.op.startswith(("dropout", "identity"))
        ):
            if len(_tracked_inputs(nxt)) != 1:
                raise ChainError(
                    f"{_describe(nxt)} combines the attention output with another tensor"
                )
            chain.append(nxt)
            cur = nxt
            continue
        if nxt.kind == "norm":
            raise ChainError(
                f"a norm over all heads ({_describe(nxt)}) runs before the out-projection"
            )
        if nxt.kind == "cat":
            raise ChainError(
                "the out-projection is shared with another attention or input (concatenation)"
            )
        raise ChainError(f"{_describe(nxt)} lies between the attention and its out-projection")


def replay(chain: list[OpNode], start: OpNode, value: torch.Tensor) -> Any:
    """Run the shape ops of ``chain`` on ``value`` (standing for ``start``'s output).

    With ``value`` an index tensor, the result tells where each input element ends up.
    """
    values: dict[int, Any] = {id(start): value}  # node id -> its replayed value
    prev = start
    for n in chain:
        if n.kind in ("shape",):  # rerun the op itself (its shape arguments as recorded)
            args = _substitute(n.args, values)
            kwargs = {k: _substitute(v, values) for k, v in n.kwargs.items()}
            values[id(n)] = n.replay(*args, **kwargs)
        else:  # casts, numbers, dropout, per-head norms keep every value in place
            tracked = _tracked_inputs(n)
            values[id(n)] = values[id(tracked[0])] if tracked else values[id(prev)]
        prev = n
    return values[id(prev)]


def _substitute(a: Any, values: dict[int, Any]) -> Any:
    """Arguments with every OpNode replaced by its replayed (or constant) value."""
    if isinstance(a, OpNode):
        if id(a) in values:
            return values[id(a)]
        if a.kind == "const":
            return a.args[0]
        raise ChainError(f"cannot replay: {a.name} has no known value")
    if isinstance(a, (list, tuple)):
        return type(a)(_substitute(x, values) for x in a)
    return a


def index_tensor(shape: tuple[int, ...], device: str = "cpu") -> torch.Tensor:
    """A tensor of the given shape whose last dim holds 0..shape[-1]-1 everywhere.

    Example:
        >>> index_tensor((2, 3)).tolist()
        [[0, 1, 2], [0, 1, 2]]
    """
    idx = torch.arange(shape[-1], dtype=torch.long, device=device)
    return idx.expand(*shape).contiguous()


def head_table(value: torch.Tensor, layout: str = "bhnd") -> torch.Tensor:
    """Reduce a replayed (B, H, N, d) index tensor to its (H, d) table, checking it is consistent.

    ``layout="bhdn"`` is accepted for a transposed key (manual attention computing q @ k^T).
    """
    if value.dim() != 4:
        raise ChainError(
            f"attention operands have {value.dim()} dims; "
            "only (batch, heads, tokens, dim) is supported"
        )
    if layout == "bhdn":
        value = value.transpose(-1, -2)  # (B, H, d, N) -> (B, H, N, d)
    table = value[0, :, 0, :]  # (H, d): sample 0, token 0
    # Every token of every sample must read the same rows, or no single slice fits them all.
    if not torch.equal(value, table[None, :, None, :].expand_as(value)):
        raise ChainError("the projection's rows are not the same for every token and sample")
    return table


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
