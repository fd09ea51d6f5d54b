"""The output side of head-locality: which columns of each out-projection belong to each head.

From the attention output, every op up to the out-projection(s) is replayed on codes of (head,
channel) and of the token (headlocal.py replays the input side the same way). Only moves,
casts, a split along the tokens and concatenations are allowed, plus a gate: another Linear's
output, through elementwise ops, multiplied in per channel or per head; its rows then belong to
their head (gated attention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from dynconvert.analysis.graph import OpNode
from dynconvert.analysis.layout import ChainError, describe
from dynconvert.analysis.replay import rerun


@dataclass
class OutTarget:
    """One out-projection reading (part of) the attention output."""

    node: OpNode  # the Linear call
    table: torch.Tensor  # (H, dv): the input column of channel j of head h
    keep: list[int]  # input columns that are not attention heads (a parallel block's MLP part)
    tokens: tuple[int, ...]  # attention sequence positions it reads


@dataclass
class OutGate:
    """A gate projection scaling the attention output before the out-projection (gated
    attention: ``o * sigmoid(to_gate(x))``, per channel or per head)."""

    node: OpNode  # the gate Linear call
    table: torch.Tensor  # (H, k): the gate rows of head h


def derive_outputs(
    output: OpNode, heads: int, v_head_dim: int, order: dict[int, int], layout: str = "bhnd"
) -> tuple[list[OutTarget], list[OutGate]]:
    """The out-projection(s) reading the attention output (B, H, N, dv), with their columns,
    and the gate projections multiplied into it on the way.

    The ops from the attention output to each Linear may only move values (reshape, transpose,
    split along the sequence for joint attention and concatenation of those parts again,
    concatenation with other channels for a parallel block's fused out-projection), cast or drop
    out, or multiply it by a gate: a Linear's output through elementwise ops, each of whose
    rows scales channels of one head at the same token (its rows then belong to that head and
    are sliced with it). Each out-projection must read every head channel exactly once, the
    same columns for every token. Unused parts (a stream whose output is dropped) are dead code.

    Raises:
        ChainError: with the reason otherwise.
    """
    if layout == "bhdn":  # channels first (linear attention): (B, H, dv, N)
        b, h, dv, n = output.shape
    elif layout == "bnhd":  # tokens before heads (flash-attn's layout): (B, N, H, dv)
        b, n, h, dv = output.shape
    else:
        b, h, n, dv = output.shape
    code = torch.arange(h)[:, None] * dv + torch.arange(dv)[None, :]  # (H, dv)
    values = {id(output): code[None, :, None, :].expand(b, h, n, dv).contiguous()}
    tokens = {id(output): torch.arange(n)[None, None, :, None].expand(b, h, n, dv).contiguous()}
    if layout in ("bhdn", "bnhd"):
        dims = (-1, -2) if layout == "bhdn" else (1, 2)
        values = {k: t.transpose(*dims).contiguous() for k, t in values.items()}
        tokens = {k: t.transpose(*dims).contiguous() for k, t in tokens.items()}
    # Everything reachable from the output up to the Linears, then replayed in graph order so
    # that a concatenation sees all of its parts.
    reach: dict[int, OpNode] = {}
    targets: list[OpNode] = []
    gate_of: dict[int, tuple[OpNode, list[OpNode]]] = {}  # mul -> (gate operand, its chain)
    gates: list[OutGate] = []
    stack = [output]
    while stack:
        cur = stack.pop()
        users = cur.real_users
        if not users and cur is not output and not cur.is_output:
            continue  # dead code: an unused part of a split
        if not users:
            raise ChainError("the attention output reaches the model output without a projection")
        for u in users:
            if id(u) in reach or u in targets:
                continue
            if u.kind == "linear":
                if u.args[0] is not cur:
                    raise ChainError(
                        "the attention output reaches the projection as its weight, not input"
                    )
                targets.append(u)
                continue
            if u.kind == "norm":
                raise ChainError(
                    f"a norm over all heads ({describe(u)}) runs before the out-projection"
                )
            movable = u.kind in ("shape", "cast", "cat") or (
                u.kind == "unary" and u.op.startswith(("dropout", "identity", "native_dropout"))
            )
            if not movable and u.kind == "binary" and u.op in ("mul", "mul_"):
                other = [i for i in u.inputs if i is not cur and i.kind not in ("param", "const")]
                chain = _gate_chain(other[0]) if len(other) == 1 else None
                if chain is not None:
                    gate_of[id(u)] = (other[0], chain)
                    movable = True
            if not movable:
                raise ChainError(f"{describe(u)} lies between the attention and its out-projection")
            reach[id(u)] = u
            stack.append(u)
    for u in sorted(reach.values(), key=lambda x: order[id(x)]):
        if u.kind == "cat":
            dim = u.arg(1, "dim", 0)
            rank = len(u.shape or ())
            parts = [a for a in _flat(u.args[0]) if isinstance(a, OpNode)]
            along_tokens = dim not in (-1, rank - 1)
            if along_tokens and any(id(p) not in values for p in parts):
                raise ChainError(
                    f"{describe(u)} concatenates the attention output with another tensor "
                    "along the tokens"
                )
        if u.kind in ("shape", "cat"):
            values[id(u)] = rerun(u, values)
            tokens[id(u)] = rerun(u, tokens)
        else:
            src = next(i for i in u.inputs if id(i) in values)
            values[id(u)], tokens[id(u)] = values[id(src)], tokens[id(src)]
            if id(u) in gate_of:
                gates.append(_gate(u, *gate_of[id(u)], values[id(src)], tokens[id(src)], h, dv))
    if not targets:
        raise ChainError("no out-projection reads the attention output")
    outs = [_target(t, values[id(t.args[0])], tokens[id(t.args[0])], h, dv) for t in targets]
    return outs, gates


def _gate_chain(n: OpNode) -> list[OpNode] | None:
    """The ops from a Linear to ``n`` (Linear first) when they act on each value on its own
    (activations, casts, reshapes, scaling by numbers): a gate; None otherwise."""
    chain = [n]
    while chain[-1].kind != "linear":
        cur = chain[-1]
        tracked = [i for i in cur.inputs if i.kind not in ("param", "const")]
        numbers_only = all(not isinstance(a, OpNode) or a in tracked for a in cur.args)
        ok = cur.kind in ("unary", "cast", "shape") or (cur.kind == "binary" and numbers_only)
        if not ok or len(tracked) != 1 or cur.op in ("cat", "getitem", "split", "chunk"):
            return None
        chain.append(tracked[0])
    # Slicing the gate's rows changes every value of the chain: none may be read elsewhere.
    if any(len(x.real_users) != 1 for x in chain):
        return None
    return chain[::-1]


def _gate(
    mul: OpNode,
    operand: OpNode,
    chain: list[OpNode],
    codes: torch.Tensor,
    toks: torch.Tensor,
    heads: int,
    dv: int,
) -> OutGate:
    """The gate rows of each head, replaying the gate's chain on row and token codes and
    pairing them with the attention output's codes at the multiply."""
    lin = chain[0]
    shape = lin.shape
    if not shape or len(shape) < 3:
        raise ChainError(f"the gate {describe(lin)} is not (batch, tokens, rows)")
    rows = shape[-1]
    gval = {id(lin): torch.arange(rows).expand(*shape).contiguous()}
    # Token codes over every axis between the batch and the rows (a token grid too).
    n_tok = math.prod(shape[1:-1])
    gtok = {id(lin): torch.arange(n_tok).reshape(1, *shape[1:-1], 1).expand(*shape).contiguous()}
    for u in chain[1:]:
        if u.kind == "shape":
            gval[id(u)] = rerun(u, gval)
            gtok[id(u)] = rerun(u, gtok)
        else:
            src = next(i for i in u.inputs if id(i) in gval)
            gval[id(u)], gtok[id(u)] = gval[id(src)], gtok[id(src)]
    try:
        c, r, t_out, t_gate = torch.broadcast_tensors(
            codes, gval[id(operand)], toks, gtok[id(operand)]
        )
    except RuntimeError:
        raise ChainError(
            f"{describe(mul)} scales the attention output by a tensor of another shape"
        ) from None
    if not torch.equal(t_out, t_gate):
        raise ChainError(f"{describe(mul)} gates the attention output with another token's values")
    head = (c // dv).reshape(-1)
    owner = torch.full((rows,), -1, dtype=torch.long)
    owner[r.reshape(-1)] = head
    if bool((owner < 0).any()) or not torch.equal(owner[r.reshape(-1)], head):
        raise ChainError(f"the gate {describe(lin)} has rows that scale several heads or none")
    per_head = [(owner == i).nonzero().squeeze(1) for i in range(heads)]
    if len({p.numel() for p in per_head}) != 1:
        raise ChainError(f"the gate {describe(lin)} gives the heads different numbers of rows")
    return OutGate(lin, torch.stack(per_head))


def _flat(a: Any) -> list[Any]:
    return [y for x in a for y in _flat(x)] if isinstance(a, (list, tuple)) else [a]


def _target(lin: OpNode, cols: Any, toks: Any, heads: int, dv: int) -> OutTarget:
    """The column table of one out-projection from the codes replayed to its input."""
    if not isinstance(cols, torch.Tensor):
        raise ChainError("the out-projection input could not be followed")
    flat = cols.reshape(-1, cols.shape[-1])  # (tokens, columns)
    if not torch.equal(flat, flat[:1].expand_as(flat)):
        raise ChainError("the out-projection columns differ across tokens")
    col_code = flat[0]
    owned = (col_code >= 0).nonzero().squeeze(1)
    codes = col_code[owned]
    if codes.numel() != heads * dv or not torch.equal(
        codes.sort().values, torch.arange(heads * dv)
    ):
        raise ChainError("the out-projection does not read every head channel exactly once")
    table = torch.empty(heads * dv, dtype=torch.long)
    table[codes] = owned
    keep = (col_code < 0).nonzero().squeeze(1).tolist()
    tok = toks.reshape(-1, toks.shape[-1])[:, owned[0]] if owned.numel() else toks.reshape(-1)
    return OutTarget(lin, table.view(heads, dv), keep, tuple(sorted(set(tok.tolist()))))
