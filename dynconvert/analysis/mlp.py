"""Find MLP sites in an OpGraph: fc1 (or a gated pair), what lies between, fc2, and the residual.

Every Linear of the graph is tried as an fc2. Walking back from its input must reach one or two
Linears (fc1, or the value and gate projections of a gated MLP) through ops that act on each
hidden channel on its own; only then is cutting the hidden width into channel groups the same
as zeroing those groups. Walking forward from fc2 must reach the residual add as
``x + g * mlp(...)`` with ``g`` constant per token; only then does a token whose MLP update is
zero pass on unchanged (method.md, "Spatial-wise Dynamic Token").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dynconvert.analysis.graph import OpGraph, OpNode, block_of, call_lca, module_lca
from dynconvert.plan import MlpSite, SkippedSite, UnitMap

SPLIT_OPS = ("chunk", "split", "split_with_sizes")  # a fused value/gate output cut in two
_MAX_REGION_OPS = 32  # an MLP has a handful of ops between fc1 and fc2; more: we left the MLP


@dataclass
class Region:
    """The ops between the input projection(s) and fc2."""

    sources: list[OpNode] = field(default_factory=list)  # fc1, or the value and gate Linears
    nodes: list[OpNode] = field(default_factory=list)  # every op between them and fc2
    split: OpNode | None = None  # the split of a fused value-and-gate fc1 output, if any
    halves: list[int] = field(default_factory=list)  # or its halves sliced apart: 0 first, 1 second
    width_reason: str = ""  # why the hidden width cannot be routed ("" when it can)


@dataclass
class FoundMlp:
    """An MLP site, or a candidate refused with the reason, and the Linear nodes it takes."""

    site: MlpSite | None
    skipped: SkippedSite | None
    linear_nodes: list[OpNode]


def _desc(n: OpNode) -> str:
    cls = n.module_class.rsplit(".", 1)[-1] if n.module_class else "model"
    return f"`{n.op}` in {n.module or '<root>'} ({cls})"


def _region(fc2: OpNode, start: OpNode | None = None) -> Region | None:
    """Walk back from fc2's input to the Linear(s) feeding it, or None when it is not an MLP.

    A depth-first walk over the tensor inputs of each op (parameters and constants are not
    followed). It stops at Linears, the sources, and gives up on an op that cannot lie inside
    an MLP (see :func:`_region_inputs`) or on a value whose width is not the hidden width.
    ``start`` is the MLP part of fc2's input when fc2 reads concat(attention, MLP hidden).
    """
    start = start if start is not None else fc2.args[0]  # fc2's input: (B, N, hidden)
    if not isinstance(start, OpNode):
        return None
    hidden = start.shape[-1] if start.shape else -1
    region = Region()
    stack, seen = [start], set()
    while stack:
        n = stack.pop()
        if id(n) in seen:  # reached twice: x * x, or the two halves of one split
            continue
        seen.add(id(n))
        if n.kind == "linear":
            region.sources.append(n)
            continue
        region.nodes.append(n)
        if len(region.nodes) > _MAX_REGION_OPS:
            return None
        # Between fc1 and fc2 every value is hidden wide (2 * hidden before a value/gate split);
        # any other width means the walk has left the MLP (for example into the block's input).
        # Ops that return several tensors (a split) have no single shape and pass.
        if n.shape is not None and n.shape[-1] not in (hidden, 2 * hidden):
            return None
        follow = _region_inputs(n, region)
        if follow is None:
            return None
        stack.extend(follow)
    if not 1 <= len(region.sources) <= 2:  # fc1, or the two Linears of a gated MLP
        return None
    return region


def _region_inputs(n: OpNode, region: Region) -> list[OpNode] | None:
    """The inputs of ``n`` the walk goes on with, or None when ``n`` cannot lie inside an MLP.

    A split of a fused value-and-gate projection is recorded in ``region.split``, a norm over the
    hidden channels in ``region.width_reason``.
    """
    tracked = [i for i in n.inputs if i.kind not in ("param", "const")]
    if n.kind in ("unary", "cast"):  # activation, dropout, dtype cast
        return tracked if len(tracked) == 1 else None
    if n.kind == "binary":
        # value * gate (two tensors), or one tensor with plain numbers (x * 0.5). Any other
        # operand (a parameter, a constant computed in the graph) ends the walk.
        numbers = [a for a in n.args if not isinstance(a, OpNode)]
        if len(tracked) == 2 or (len(tracked) == 1 and len(numbers) == len(n.args) - 1):
            return tracked
        return None
    if n.kind == "shape" and n.op == "getitem" and tracked and tracked[0].op in SPLIT_OPS:
        return tracked[:1]  # one half of a split fc1 output: go on with the split
    if n.kind == "shape" and n.op in ("getitem", "slice", "narrow") and len(tracked) == 1:
        # x[..., :h] and x[..., h:] of a fused fc1 (Flux 2's SwiGLU): a split written as two
        # slices. Any other indexing ends the walk.
        half = _channel_half(n, tracked[0].shape)
        if half is None:
            return None
        region.halves.append(half)
        return tracked
    if n.kind == "shape" and n.op in SPLIT_OPS:
        # A fused fc1 holding value and gate. Only a split of the last (channel) dim keeps
        # tokens apart; chunk(x, chunks, dim) and split(x, sizes, dim) both take dim third.
        if not tracked:
            return None
        dim = n.arg(2, "dim", 0)
        rank = len(tracked[0].shape or ())
        if dim not in (-1, rank - 1):
            return None
        region.split = n
        return tracked
    if n.kind == "norm" and tracked:
        # A norm over the hidden channels mixes them: removing a group changes the statistics of
        # the others, so width routing is off. Tokens stay independent: token routing may stay.
        region.width_reason = f"a norm over the hidden channels ({_desc(n)}) runs inside the MLP"
        return tracked[:1]
    return None


def _channel_half(n: OpNode, shape: tuple[int, ...] | None) -> int | None:
    """0 or 1 when ``n`` takes the first or the second half of its input's last dim, else None.

    Accepts ``aten.slice(x, dim, start, end)``, ``narrow(x, dim, start, length)`` and
    ``x[..., a:b]`` (a getitem whose index leaves every other dim whole).
    """
    if not shape:
        return None
    width, rank = shape[-1], len(shape)
    if n.op == "slice":
        dim, start, end = n.arg(1, "dim", 0), n.arg(2, "start", None), n.arg(3, "end", None)
        step = n.arg(4, "step", 1)
    elif n.op == "narrow":
        dim, start, length = n.arg(1, "dim", 0), n.arg(2, "start", 0), n.arg(3, "length", 0)
        end, step = (
            (start + length if isinstance(start, int) and isinstance(length, int) else None),
            1,
        )
    else:  # getitem
        index = n.arg(1)
        index = index if isinstance(index, tuple) else (index,)
        if not index or not isinstance(index[-1], slice):
            return None
        lead = index[:-1]
        whole = all(i is Ellipsis or i == slice(None) for i in lead)
        if not whole or (Ellipsis not in lead and len(index) != rank):
            return None
        dim, start, end, step = -1, index[-1].start, index[-1].stop, index[-1].step or 1
    if dim not in (-1, rank - 1) or step != 1 or width % 2:
        return None
    start = 0 if start is None else start
    end = width if end is None or (isinstance(end, int) and end > width) else end
    if (start, end) == (0, width // 2):
        return 0
    if (start, end) == (width // 2, width):
        return 1
    return None


def _residual_reason(fc2: OpNode, token_dims: int) -> str:
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
                reason = _residual_reason(u, token_dims)
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
                    f"the MLP output is scaled per token ({_desc(u)}), so a skipped token would "
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
                f"the MLP output is added to something that is not the residual stream ({_desc(u)})"
            )
        return f"{_desc(u)} follows the MLP output before the residual add"


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


def _refuse(name: str, reason: str) -> FoundMlp:
    return FoundMlp(None, SkippedSite(name, "mlp", reason), [])


def parallel_part(fc2: OpNode, keep: list[int]) -> tuple[OpNode, int] | None:
    """The MLP hidden part of a parallel block's fused out-projection, and its first column.

    ``fc2`` reads concat(attention output, activated MLP hidden) along the channels; ``keep``
    are the columns the attention site left to others. The part must be exactly those columns.
    """
    cat = fc2.args[0]
    if not isinstance(cat, OpNode) or cat.kind != "cat" or not keep:
        return None
    parts = cat.args[0] if cat.args and isinstance(cat.args[0], (list, tuple)) else []
    offset = 0
    for p in parts:
        width = p.shape[-1] if isinstance(p, OpNode) and p.shape else 0
        if isinstance(p, OpNode) and keep == list(range(offset, offset + width)):
            return p, offset
        offset += width
    return None


def build_site(
    fc2: OpNode,
    model: torch.nn.Module,
    reuse: dict[str, list[OpNode]],
    taken: set[str],
    order: dict[int, int] | None = None,
    shared: dict[str, list[int]] | None = None,
) -> FoundMlp | None:
    """An MlpSite ending at ``fc2``, a SkippedSite with the reason, or None when not an MLP.

    Args:
        fc2: A Linear node of the graph, tried as the output projection of an MLP.
        model: The model the graph was captured from (for module classes).
        reuse: Linear fqn -> the nodes that call it (a Linear called twice cannot be sliced).
        taken: Linears already claimed by another site.
        order: Node id -> position in the graph, to list a gated pair in execution order.
        shared: out-projections of parallel blocks -> the columns their attention left (the
            MLP may claim exactly those).
    """
    part = None
    if fc2.linear is not None and fc2.linear in (shared or {}):
        part = parallel_part(fc2, shared[fc2.linear])
        if part is None:
            return None
    elif fc2.linear is None or fc2.linear in taken:
        return None
    region = _region(fc2, part[0] if part else None)
    if region is None:
        return None
    sources = sorted(region.sources, key=lambda n: (order or {}).get(id(n), 0))
    x = sources[0].args[0]  # the MLP input: (B, N, D), or (B, H, W, D)
    if not isinstance(x, OpNode) or not x.shape or len(x.shape) < 3:
        return None  # no token dimension: an embedding MLP, not a transformer MLP
    if any(s.args[0] is not x for s in sources):
        return None  # the two projections of a gated MLP read the same input
    names = [s.linear for s in sources]
    module_name = call_lca(*sources, fc2) if all(n.stack for n in [*sources, fc2]) else ""
    module_name = module_name or module_lca(*(n or "" for n in names), fc2.linear)
    if any(n is None for n in names):
        return _refuse(module_name, "an input projection is not an nn.Linear")
    for ln in [*sources, fc2]:
        if ln.linear in taken and ln is not fc2:
            return None
    # Shared weights: an MLP applied to several streams in turn (CogView4's image and text
    # tokens). Every call of fc2 must be the same MLP; its width is routed once per forward
    # (the same groups in every call), and ``tokens`` counts the tokens of all calls.
    calls = [(fc2, region, sources)]
    counts = {len(reuse.get(ln.linear, [])) or 1 for ln in [*sources, fc2]}
    if counts != {1}:
        twice = next(ln.linear for ln in [*sources, fc2] if len(reuse.get(ln.linear, [])) > 1)
        if len(counts) > 1 or part is not None:
            return _refuse(module_name, f"{twice} is called more than once per forward")
        for c in reuse[fc2.linear]:
            if c is fc2:
                continue
            r = _region(c)
            if r is None or sorted(n.linear or "" for n in r.sources) != sorted(names):
                return _refuse(
                    module_name,
                    f"{twice} is called more than once per forward, not always as this MLP",
                )
            calls.append((c, r, sorted(r.sources, key=lambda n: (order or {}).get(id(n), 0))))
    # Slicing changes every value inside the MLP: none of them may be read from outside.
    for c_fc2, c_region, c_sources in calls:
        region_ids = {id(n) for n in c_region.nodes} | {id(c_fc2)}
        region_ids |= {id(c_fc2.args[0])} if part else set()
        for n in [*c_sources, *c_region.nodes]:
            if any(id(u) not in region_ids for u in n.real_users):
                return _refuse(
                    module_name, f"an intermediate value ({_desc(n)}) is used outside the MLP"
                )
    inputs = [c_sources[0].args[0] for _, _, c_sources in calls]  # each call's (B, N, D)
    if any(not isinstance(i, OpNode) or not i.shape or i.shape[0] != x.shape[0] for i in inputs):
        return _refuse(module_name, "the calls of this shared MLP see different batches")

    hidden = (part[0] if part else fc2.args[0]).shape[-1]
    width_reason = region.width_reason
    gated = False
    outs = [s.shape[-1] for s in sources]
    if len(sources) == 2:  # separate value and gate projections (SwiGLU as w1, w3)
        gated = True
        if outs != [hidden, hidden]:
            width_reason = width_reason or "the two input projections do not match the hidden width"
    elif region.split is not None:  # one fc1 of 2 * hidden rows, split into value and gate
        gated = True
        sizes = region.split.arg(1, "split_size_or_sections")
        halves = region.split.op == "chunk" and region.split.arg(1, "chunks") == 2
        halves = halves or (region.split.op != "chunk" and sizes in (hidden, [hidden, hidden]))
        if not halves or outs[0] != 2 * hidden:
            width_reason = (
                width_reason or "the input projection is split in a way other than two equal halves"
            )
    elif region.halves:  # one fc1 of 2 * hidden rows, its two halves sliced apart
        gated = True
        if sorted(region.halves) != [0, 1] or outs[0] != 2 * hidden:
            width_reason = (
                width_reason
                or "the input projection is sliced in a way other than two equal halves"
            )
    elif outs[0] != hidden:
        width_reason = width_reason or "the input projection width differs from the hidden width"
    # chunk(2) halves whatever width it gets; split by sizes keeps the full-width sizes, so a
    # sliced fc1 would not split: such an MLP is not converted (it could not run sliced).
    fixed_split = region.split is not None and region.split.op != "chunk" and not width_reason

    token_dims = len(x.shape) - 1  # batch, then token_dims - 1 token axes, then channels
    # Tokens are routed per call (each call's router decides on its own tokens), so every
    # call must leave a skipped token unchanged.
    token_reason = next((r for c, _, _ in calls if (r := _residual_reason(c, token_dims))), "")
    if part:
        token_reason = "the MLP shares its out-projection with the attention (parallel block)"
    site = MlpSite(
        name=module_name,
        block=block_of(module_name),
        module_class=_class_of(model, module_name),
        fc1=names,
        fc2=fc2.linear,
        in_features=x.shape[-1],
        hidden=hidden,
        out_features=fc2.shape[-1],
        gated=gated,
        groups=1,  # set by set_groups once the block's head count is known
        tokens=sum(int(torch.tensor(i.shape[1:-1]).prod()) for i in inputs),
        calls=len(calls),
        in_maps=[],
        out_map=UnitMap(linear=fc2.linear, axis="cols", units=1),
        width=not width_reason,
        width_reason=width_reason,
        token=not token_reason,
        token_reason=token_reason,
        token_dims=token_dims,
        fast=not fixed_split,
        # Halves taken by slicing are constants in the graph, whether the model computed them
        # from the shape (they follow a sliced fc1) or holds them fixed (they do not): convert
        # checks the fast path once (verify.py).
        fast_reason=(
            f"the fused value/gate projection is split by fixed sizes ({_desc(region.split)})"
            if fixed_split
            else "unverified"
            if region.halves
            else ""
        ),
        fc2_offset=part[1] if part else 0,
        fc2_keep=[]
        if not part
        else [c for c in range(fc2.args[0].shape[-1]) if not part[1] <= c < part[1] + hidden],
    )
    return FoundMlp(site, None, [*sources, fc2])


def set_groups(site: MlpSite, groups: int) -> None:
    """Cut the hidden width into ``groups`` equal contiguous groups and fill the unit maps.

    When ``groups`` does not divide the hidden width, the largest divisor below it is used;
    a site that cannot be cut (or has width routing off) gets one group spanning everything.

    Example:
        >>> from dynconvert.plan import MlpSite, UnitMap
        >>> out = UnitMap(linear="fc2", axis="cols", units=1)
        >>> site = MlpSite("mlp", "b", "Mlp", ["fc1"], "fc2", 8, 12, 8, False, 1, 4, [], out)
        >>> set_groups(site, 5)
        >>> site.groups, site.in_maps[0].parts
        (4, [(0, 3, 3)])
    """
    g = max(d for d in range(1, max(1, min(groups, site.hidden)) + 1) if site.hidden % d == 0)
    if g < 2:
        site.width = False
        site.width_reason = (
            site.width_reason or f"hidden width {site.hidden} cannot be cut into groups"
        )
    g = g if site.width else 1
    size = site.hidden // g  # channels a group
    site.groups = g
    if len(site.fc1) == 2:
        # Value and gate Linears: group u owns the same size rows of each.
        site.in_maps = [
            UnitMap(linear=n, axis="rows", units=g, parts=[(0, size, size)]) for n in site.fc1
        ]
    elif site.gated and site.width:
        # One fused Linear: group u owns size rows of the value half and the same of the gate
        # half, which starts at row ``hidden`` (the two halves are dropped together).
        parts = [(0, size, size), (site.hidden, size, size)]
        site.in_maps = [UnitMap(linear=site.fc1[0], axis="rows", units=g, parts=parts)]
    else:
        # A plain fc1, or a single group that spans every fc1 row (both halves when gated).
        rows = site.fc1_out // g
        site.in_maps = [UnitMap(linear=site.fc1[0], axis="rows", units=g, parts=[(0, rows, rows)])]
    site.out_map = UnitMap(
        linear=site.fc2,
        axis="cols",
        units=g,
        parts=[(site.fc2_offset, size, size)],
        keep=site.fc2_keep,
    )


def _class_of(model: torch.nn.Module, name: str) -> str:
    m = model.get_submodule(name) if name else model
    return f"{type(m).__module__}.{type(m).__qualname__}"


def find_fc2_candidates(graph: OpGraph) -> list[OpNode]:
    """Every Linear of the graph: which of them end an MLP is up to :func:`build_site`."""
    return [n for n in graph.nodes if n.kind == "linear"]
