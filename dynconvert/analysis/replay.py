"""Replaying the ops between projections and an attention on index tensors (headlocal.py).

Every row of every source Linear carries its own code; :class:`Replay` reruns the ops on those
codes (shape ops for real, elementwise ops as the identity, a reduction keeps one representative
code, an op on a channels-first grid keeps each channel's code) and records what must then be
checked once the code -> head map is known: values combined elementwise must share a head, a
norm or reduction may run over one head's channels only, and a tensor from no projection must
be the same for every head, or differ along one axis only (a table to cut with the heads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dynconvert.analysis.graph import OpNode
from dynconvert.analysis.layout import ChainError, describe

PAIR = 2**24  # view_as_complex packs a channel pair (a, b) into one code: PAIR * (a + 1) + b


class AcrossHeads(ChainError):
    """A norm or reduction over several heads' channels (maybe a cut point, see derive_inputs)."""

    def __init__(self, reason: str, node: OpNode):
        super().__init__(reason)
        self.node = node


def substitute(a: Any, values: dict[int, torch.Tensor]) -> Any:
    """Arguments for rerunning a shape op: tracked nodes by their codes, others by -1 codes."""
    if isinstance(a, OpNode):
        if id(a) in values:
            return values[id(a)]
        if a.kind == "const":
            return a.args[0]
        if a.shape is not None:  # a value from no projection (learned tokens, a cat partner)
            return torch.full(a.shape, -1, dtype=torch.long)
        raise ChainError(f"cannot replay {describe(a)}: its value is unknown")
    if isinstance(a, (list, tuple)):
        return type(a)(substitute(x, values) for x in a)
    return a


def rerun(n: OpNode, values: dict[int, torch.Tensor]) -> Any:
    """Rerun the (shape) op ``n`` with the values of ``values`` for its graph arguments."""
    args = substitute(n.args, values)
    kwargs = {k: substitute(v, values) for k, v in n.kwargs.items()}
    try:
        return n.replay(*args, **kwargs)
    except RuntimeError:
        sizes = _view_sizes(n, args, kwargs)
        if sizes is None:
            raise
        # A view after a transpose is legal in the real run when a kernel returned its output
        # in the transposed layout (an attention's (B, H, N, d) result stored as (B, N, H, d));
        # the index tensors here are laid out plainly, and a reshape reads the same values.
        return args[0].reshape(sizes)


def _view_sizes(n: OpNode, args: tuple, kwargs: dict) -> list[int] | None:
    """The sizes of a ``view`` to sizes (None for any other op, or a view to a dtype)."""
    if n.op.split(".")[0] not in ("view", "_unsafe_view") or not args:
        return None
    if not isinstance(args[0], torch.Tensor):
        return None
    sizes = list(args[1:]) or [kwargs.get("size")]
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple, torch.Size)):
        sizes = list(sizes[0])
    return sizes if sizes and all(isinstance(x, int) for x in sizes) else None


def replay_chain(start: OpNode, value: torch.Tensor, chain: list[OpNode]) -> Any:
    """The value at the end of ``chain`` (ops in execution order, each reading the previous
    ones or ``start``) when ``start`` holds ``value``: shape ops rerun, casts the identity.
    None when an op does not rerun on an index tensor."""
    values = {id(start): value}
    for n in chain:
        if n.kind == "cast":
            values[id(n)] = values[id(n.inputs[0])]
            continue
        try:
            values[id(n)] = rerun(n, values)
        except Exception:  # noqa: BLE001 - not replayable on indices: the caller refuses
            return None
    return values[id(chain[-1])] if chain else value


def _dims(n: OpNode, rank: int) -> list[int]:
    """The reduced dims of a reduction node, non-negative (all dims when none are given)."""
    pos = 2 if n.op == "linalg_vector_norm" else 1
    d = n.arg(pos, "dim")
    if d is None or d == []:
        return list(range(rank))
    d = [d] if isinstance(d, int) else list(d)
    return sorted(x % rank for x in d)


class Replay:
    """Codes of every tracked node, and the checks to run once heads are known."""

    def __init__(self, order: dict[int, int]):
        self.order = order
        self.values: dict[int, torch.Tensor] = {}
        self.same: list[tuple[OpNode, torch.Tensor, torch.Tensor]] = []  # must share heads
        self.const: list[tuple[OpNode, torch.Tensor, list[int]]] = []  # one head along dims
        self.bcast: list[tuple[OpNode, torch.Tensor, OpNode]] = []  # must be the same per head
        self.wide: list[OpNode] = []  # depthwise convolutions: a weight per channel, cut after
        self.trivial = True

    def run(self, nodes: list[OpNode], sources: list[OpNode], tracked: set[int]) -> None:
        """Give each source Linear's rows their codes, then replay the tracked ``nodes``."""
        offset = 0
        for s in sorted(sources, key=lambda n: self.order[id(n)]):
            width = s.shape[-1]
            self.values[id(s)] = torch.arange(width).expand(*s.shape) + offset  # a new tensor
            offset += width
        for n in sorted(nodes, key=lambda n: self.order[id(n)]):
            if id(n) in tracked and n.kind != "linear":
                self.values[id(n)] = self.step(n, tracked)

    def step(self, n: OpNode, tracked: set[int]) -> torch.Tensor:
        """The codes of node ``n`` from its tracked inputs' (recording what to check)."""
        ins = [i for i in n.inputs if id(i) in tracked]
        vals = [self.values[id(i)] for i in ins]
        if n.kind in ("shape", "cat"):
            return rerun(n, self.values)  # a slice of a fresh tensor stays a view of it
        if n.kind == "fresh":
            self.trivial = False
            return torch.full(n.shape, -1, dtype=torch.long)  # nothing written yet
        if n.kind == "mutate":
            view, src = self.values[id(n.args[0])], self.values[id(n.args[1])]
            return view.copy_(src.expand_as(view))  # writes through into the fresh tensor
        if n.kind == "complex":
            self.trivial = False
            v = vals[0]
            if n.op == "view_as_complex":  # (..., d/2, 2) -> (..., d/2): a pair becomes one value
                self.same.append((n, v[..., 0], v[..., 1]))
                return PAIR * (v[..., 0] + 1) + v[..., 1]
            return torch.stack([v // PAIR - 1, v % PAIR], -1)  # view_as_real: back to pairs
        if n.kind == "reduce":
            self.trivial = False
            v = vals[0]
            dims = _dims(n, v.dim())
            self.const.append((n, v, dims))
            keep = bool(n.arg(3 if n.op == "linalg_vector_norm" else 2, "keepdim", False))
            first = v
            for d in dims:
                first = first.narrow(d, 0, 1)
            # The reduced values stand for each other, as two operands of an elementwise op do:
            # a rotary written as (rotation * pairs).sum(-1) (Kandinsky 5) reaches the attention
            # with one code of each pair, and the other must still be counted in its head.
            self.same.append((n, first.expand_as(v), v))
            return (
                first
                if keep
                else first.reshape([x for i, x in enumerate(v.shape) if i not in dims])
            )
        if n.kind in ("spatial", "conv"):
            self.trivial = False
            return self._grid_op(n, vals[0])
        if n.kind == "norm":
            self.trivial = False
            v = vals[0]
            shape = n.arg(1, "normalized_shape") or []
            width = len(shape) if isinstance(shape, (list, tuple)) else 1
            self.const.append((n, v, list(range(v.dim() - width, v.dim()))))
            return v
        out_shape = n.shape if n.shape is not None else tuple(vals[0].shape)
        out = vals[0].expand(*out_shape) if tuple(vals[0].shape) != tuple(out_shape) else vals[0]
        others = [a for a in n.inputs if id(a) not in tracked and a.shape is not None]
        if n.kind == "binary" and (len(vals) > 1 or others):
            self.trivial = False
        for v in vals[1:]:
            self.same.append((n, out, v.expand(*out_shape)))
        for a in others:
            self.bcast.append((n, out, a))
        return out

    def _grid_op(self, n: OpNode, v: torch.Tensor) -> torch.Tensor:
        """Codes after an op on a channels-first grid (B, C, *spatial): pooling or resizing
        keeps every channel's code; a depthwise convolution (each output channel reads one
        input channel) too, but has a weight per channel, so it needs a cut after it; any other
        convolution mixes channels (checked like a norm over them)."""
        out_shape = n.shape
        if out_shape is None or v.dim() < 3 or len(out_shape) != v.dim():
            raise ChainError(f"{describe(n)} lies between the projection and the attention")
        size = n.kwargs.get("size") if n.op == "interpolate" else n.arg(1, "output_size")
        if (
            n.kind == "spatial"
            and ("upsample" in n.op or n.op == "interpolate")
            and size is not None
        ):
            raise ChainError(
                f"{describe(n)} resizes keys or values to a fixed size: the factor, and so the "
                "attention's cost, would change with the resolution"
            )
        flat = v.flatten(2)  # (B, C, positions): a projection gives every token the same codes
        if not torch.equal(flat.amin(-1), flat.amax(-1)):
            raise ChainError(
                f"{describe(n)} runs over an axis along which the codes differ: it pools channels "
                "(a channels-last tensor), or tokens of different projections"
            )
        per = flat[..., 0]  # (B, C_in)
        c_in, c_out = per.shape[1], out_shape[1]
        if n.kind == "spatial":
            src = torch.arange(c_in)
        else:
            w = n.args[1] if len(n.args) > 1 else None
            w_shape = w.shape if isinstance(w, (OpNode, torch.Tensor)) else None
            transposed = "transpose" in n.op or (n.op == "convolution" and bool(n.arg(6)))
            if w_shape is None or transposed:
                raise ChainError(f"{describe(n)} lies between the projection and the attention")
            if w_shape[1] == 1 and c_out % c_in == 0:  # depthwise: out channel o reads o // mult
                src = torch.arange(c_out) // (c_out // c_in)
                self.wide.append(n)
            else:  # every output channel reads several input channels
                self.const.append((n, v, [1]))
                src = torch.zeros(c_out, dtype=torch.long)
        per = per[:, src]  # (B, C_out)
        return per.reshape(*per.shape, *[1] * (len(out_shape) - 2)).expand(*out_shape)

    def check(
        self,
        head_of: torch.Tensor,
        skip: set[str] | frozenset = frozenset(),
        shadow: set[int] | frozenset = frozenset(),
        only_norms: bool = False,
        tables: list[TableUse] | None = None,
    ) -> None:
        """Run the recorded checks with the code -> head map (-1: no head); ops inside the
        modules of ``skip`` (cut points) or in ``shadow`` (ids of ops whose every path to the
        attention passes a cut) are exempt; ``only_norms``: the checks that may ask for a cut;
        ``tables``: collects tensors that differ per head along one axis instead of refusing."""

        def exempt(n: OpNode) -> bool:
            return id(n) in shadow or in_modules(n, skip)

        def heads(v: torch.Tensor) -> torch.Tensor:
            v = torch.where(v >= PAIR, v // PAIR - 1, v)  # a complex pair: its first channel
            return torch.where(v >= 0, head_of[v.clamp(min=0)], torch.full_like(v, -2))

        for n, v, dims in self.const:
            if exempt(n):
                continue
            h = heads(v)
            lo, hi = h, h
            for d in dims:
                lo, hi = lo.amin(d, keepdim=True), hi.amax(d, keepdim=True)
            if not torch.equal(lo, hi):
                if n.kind == "conv":
                    raise AcrossHeads(
                        f"{describe(n)} mixes channels of several heads between the projection "
                        "and the attention; removing heads would change it",
                        n,
                    )
                what = "normalises" if n.kind == "norm" else "reduces over"
                raise AcrossHeads(
                    f"qk-norm across all heads: {describe(n)} {what} channels of several heads; "
                    "removing heads would change it",
                    n,
                )
        for n in self.wide:
            if not exempt(n):
                raise AcrossHeads(
                    f"{describe(n)} (a depthwise convolution, key/value compression) has a weight "
                    "per channel between the projection and the attention, and no module after it "
                    "whose output could be cut to the active heads",
                    n,
                )
        if only_norms:
            return
        for n, a, b in self.same:
            if exempt(n):
                continue
            if not torch.equal(heads(a), heads(b)):
                raise ChainError(
                    f"{describe(n)} combines values of different heads (or of a tensor computed "
                    "from another Linear) before the attention"
                )
        for n, v, a in self.bcast:
            if exempt(n):
                continue
            use = table_use(n, heads(v), a)
            if use is None:
                continue
            if isinstance(use, str):
                raise ChainError(use)
            if tables is None:
                raise ChainError(
                    f"{describe(n)} combines the projection with a tensor that differs per "
                    "head; removing heads would misalign it"
                )
            tables.append(use)


@dataclass
class TableUse:
    """A tensor that is not from a projection but differs per head where it meets one (rotary
    tables over the whole width, LTX): removing heads needs it cut along ``dim`` too."""

    node: OpNode  # the tensor as the op reads it
    op: OpNode  # the op combining it with the projection's values
    dim: int  # its axis along which the head changes (negative: counted from the end)
    heads: torch.Tensor  # (size,): the unit of each position along that axis


def table_use(n: OpNode, h: torch.Tensor, a: OpNode) -> TableUse | str | None:
    """None when tensor ``a`` is the same for every head where ``n`` combines it with heads
    ``h``; else how it differs: a TableUse when along one axis, each position in one head, else
    the reason it cannot be cut."""
    shape = tuple(a.shape)
    offset = h.dim() - len(shape)
    varying = []
    for axis in range(h.dim()):
        j = axis - offset
        if j < 0 or shape[j] == 1:
            continue
        if not torch.equal(h, h.narrow(axis, 0, 1).expand_as(h)):
            varying.append(axis)
    if not varying:
        return None
    if len(varying) != 1:
        return (
            f"{describe(n)} combines the projection with a tensor that differs per head "
            "along several axes"
        )
    axis = varying[0]
    per = h.movedim(axis, 0).reshape(h.shape[axis], -1)  # (positions, everything else)
    if not torch.equal(per, per[:, :1].expand_as(per)) or int(per.min()) < 0:
        return (
            f"{describe(n)} combines the projection with a tensor whose positions do not "
            "each belong to one head"
        )
    return TableUse(a, n, axis - h.dim(), per[:, 0].clone())


def in_modules(n: OpNode, modules: dict[str, str] | set[str]) -> bool:
    """Whether op ``n`` runs inside one of ``modules``."""
    return any(n.module == m or n.module.startswith(m + ".") for m in modules)
