"""Token routing's condition: the MLP output reaches the residual stream as ``x + g * f``.

A skipped token gets a zero MLP update; that leaves the token unchanged only if nothing but a
per-token-constant scale ``g`` (DiT's adaLN gate, (B, 1, D)), casts, dropout and slices along the
tokens stand between fc2 and the residual add (docs/method.md, "Spatial-wise dynamic tokens").
"""

from __future__ import annotations

from dynconvert.analysis.graph import OpNode
from dynconvert.analysis.layout import describe


def residual_reason(fc2: OpNode, token_dims: int) -> str:
    """Empty when fc2's output reaches the residual as ``x + g * f`` with per-token-constant g.

    Otherwise the reason token routing is ruled out: a skipped token gets a zero MLP update,
    which leaves it unchanged only if nothing but a per-token scale and the add follow fc2.
    """
    cur = fc2
    while True:
        users = cur.real_users
        if len(users) > 1 and all(_token_slice(u, token_dims) for u in users):
            # Joint streams through one MLP (CogVideoX, Lumina): its output is cut along the
            # tokens and each part goes to its own stream's residual. Every part must hold.
            for u in users:
                reason = residual_reason(u, token_dims)
                if reason:
                    return reason
            return ""
        if len(users) != 1:
            return f"the MLP output is used {len(users)} times, not only by the residual add"
        u = users[0]
        if u.kind == "cast" or (u.kind == "unary" and u.op.startswith(("dropout", "identity"))):
            cur = u  # keeps a zero update zero
            continue
        if _token_slice(u, token_dims):
            cur = u  # one stream's part of the tokens: a skipped token's zero stays zero
            continue
        if u.kind == "binary" and u.op in ("mul", "div", "mul_", "div_", "truediv"):
            # The gate g (DiT's adaLN gate_mlp, (B, 1, D)) must not vary over the token axes.
            other = [a for a in u.args if a is not cur]
            ok = True
            for a in other:
                if isinstance(a, OpNode):
                    ok = ok and _per_token_constant(a.shape, cur.shape, token_dims)
            if not ok:
                return (
                    f"the MLP output is scaled per token ({describe(u)}), so a skipped token would "
                    "not stay unchanged"
                )
            cur = u
            continue
        if u.kind == "binary" and u.op in ("add", "add_"):
            # The residual add: the other operand is the stream itself, of the output's shape.
            other = [i for i in u.inputs if i is not cur and isinstance(i, OpNode)]
            if len(other) == 1 and other[0].shape == u.shape:
                return ""
            return (
                "the MLP output is added to something that is not the residual stream "
                f"({describe(u)})"
            )
        return f"{describe(u)} follows the MLP output before the residual add"


def _token_slice(n: OpNode, token_dims: int) -> bool:
    """Whether ``n`` selects tokens (a slice, split or narrow along a token axis) or takes one
    part of such a split: it moves updates without mixing them."""
    if n.kind != "shape":
        return False
    if n.op == "getitem":
        src = n.args[0] if n.args else None
        return isinstance(src, OpNode) and _token_slice(src, token_dims)
    if n.op in ("slice", "narrow", "split", "split_with_sizes", "tensor_split", "chunk"):
        dim = n.arg(1 if n.op in ("slice", "narrow") else 2, "dim", 0)
        rank = len(n.args[0].shape or ()) if isinstance(n.args[0], OpNode) else 0
        return isinstance(dim, int) and rank > 0 and 1 <= dim % rank < token_dims
    return False


def _per_token_constant(
    shape: tuple[int, ...] | None, ref: tuple[int, ...] | None, token_dims: int
) -> bool:
    """Whether a tensor of ``shape``, broadcast against ``ref``, has size 1 on the token axes."""
    if shape is None or ref is None:
        return False
    # Align from the right; the token axes are 1..token_dims-1 of ref (axis 0 is the batch).
    offset = len(ref) - len(shape)
    for axis in range(1, token_dims):
        j = axis - offset
        if 0 <= j < len(shape) and shape[j] != 1:
            return False
    return True
