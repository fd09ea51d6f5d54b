"""Find MLP sites in an OpGraph: fc1 (or a gated pair), what lies between, fc2, and the residual.

Every Linear of the graph is tried as an fc2. Walking back from its input must reach one or two
Linears (fc1, or the value and gate projections of a gated MLP) through ops that act on each
hidden channel on its own; only then is cutting the hidden width into channel groups the same
as zeroing those groups. Walking forward from fc2 must reach the residual add as
``x + g * mlp(...)`` with ``g`` constant per token; only then does a token whose MLP update is
zero pass on unchanged (docs/method.md, "Spatial-wise dynamic tokens"). The walk back is
mlp_region.py, the walk forward residual.py; here the site is assembled and checked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynconvert.analysis.graph import OpGraph, OpNode, block_of, call_lca, module_lca
from dynconvert.analysis.layout import describe
from dynconvert.analysis.mlp_region import Region, hidden_region
from dynconvert.analysis.residual import residual_reason
from dynconvert.plan import MLP, MlpSite, SkippedSite, UnitMap
from dynconvert.sites.fused_in_find import FusedPiece, fused_piece, width_attrs


@dataclass
class FoundMlp:
    """An MLP site, or a candidate refused with the reason, and the Linear nodes it takes."""

    site: MlpSite | None
    skipped: SkippedSite | None
    linear_nodes: list[OpNode]


def _refuse(name: str, reason: str) -> FoundMlp:
    return FoundMlp(None, SkippedSite(name, MLP, reason), [])


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
    shared_in: dict[str, tuple[int, int]] | None = None,
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
        shared_in: fused input projections -> [start, stop) of the rows their attention left
            (the MLP's fc1 may be a piece of those, sites/fused_in_find.py).
    """
    part = None
    if fc2.linear is not None and fc2.linear in (shared or {}):
        part = parallel_part(fc2, shared[fc2.linear])
        if part is None:
            return None
    elif fc2.linear is None or fc2.linear in taken:
        return None
    region = hidden_region(fc2, part[0] if part else None)
    if region is None:
        return None
    # Flux 2: fc1 is the MLP's piece of a fused input projection whose other rows are heads.
    fused = fused_piece(fc2, part[0] if part else None, region, shared_in or {})
    region = fused.region if fused else region
    sources = _in_order(region.sources, order)  # fc1 (or the piece of it), or a gated pair
    fc1 = [fused.linear] if fused else sources  # the Linear nodes
    x = fc1[0].args[0]  # the MLP input: (B, N, D), or (B, H, W, D)
    if not isinstance(x, OpNode) or not x.shape or len(x.shape) < 3:
        return None  # no token dimension: an embedding MLP, not a transformer MLP
    if any(s.args[0] is not x for s in fc1):
        return None  # the two projections of a gated MLP read the same input
    names = [s.linear for s in fc1]
    module_name = call_lca(*sources, fc2) if all(n.stack for n in [*sources, fc2]) else ""
    module_name = module_name or module_lca(*(n or "" for n in names), fc2.linear)
    if any(n is None for n in names):
        return _refuse(module_name, "an input projection is not an nn.Linear")
    for ln in [*fc1, fc2]:
        if ln.linear in taken and ln is not fc2 and not fused:
            return None
    calls = _calls(fc2, region, sources, reuse, order, part is not None)
    if isinstance(calls, str):
        return _refuse(module_name, calls)
    reason = _sealed(calls, part is not None, x)
    if reason:
        return _refuse(module_name, reason)
    site = _site(model, module_name, calls, part, fused)
    return FoundMlp(site, None, [*fc1, fc2])


_Call = tuple[OpNode, Region, list[OpNode]]  # one call of an MLP: fc2, its region, its sources


def _in_order(nodes: list[OpNode], order: dict[int, int] | None) -> list[OpNode]:
    """The nodes in execution order (a gated pair's value and gate Linears)."""
    return sorted(nodes, key=lambda n: (order or {}).get(id(n), 0))


def _calls(
    fc2: OpNode,
    region: Region,
    sources: list[OpNode],
    reuse: dict[str, list[OpNode]],
    order: dict[int, int] | None,
    parallel: bool,
) -> list[_Call] | str:
    """Every call of the MLP ending at ``fc2`` (fc2's own first), or why it cannot be routed.

    Shared weights: an MLP applied to several streams in turn (CogView4's image and text
    tokens). Every call of fc2 must be the same MLP; its width is routed once per forward (the
    same groups in every call), and the site's ``tokens`` counts the tokens of all calls.
    """
    names = [s.linear for s in sources]
    calls = [(fc2, region, sources)]
    counts = {len(reuse.get(ln.linear, [])) or 1 for ln in [*sources, fc2]}
    if counts == {1}:
        return calls
    twice = next(ln.linear for ln in [*sources, fc2] if len(reuse.get(ln.linear, [])) > 1)
    if len(counts) > 1 or parallel:
        return f"{twice} is called more than once per forward"
    for c in reuse[fc2.linear]:
        if c is fc2:
            continue
        r = hidden_region(c)
        if r is None or sorted(n.linear or "" for n in r.sources) != sorted(names):
            return f"{twice} is called more than once per forward, not always as this MLP"
        calls.append((c, r, _in_order(r.sources, order)))
    return calls


def _sealed(calls: list[_Call], parallel: bool, x: OpNode) -> str:
    """Why slicing would change what the rest of the model sees ("" when it would not)."""
    # Slicing changes every value inside the MLP: none of them may be read from outside.
    for c_fc2, c_region, c_sources in calls:
        region_ids = {id(n) for n in c_region.nodes} | {id(c_fc2)}
        region_ids |= {id(c_fc2.args[0])} if parallel else set()
        for n in [*c_sources, *c_region.nodes]:
            if any(id(u) not in region_ids for u in n.real_users):
                return f"an intermediate value ({describe(n)}) is used outside the MLP"
    inputs = [c_sources[0].args[0] for _, _, c_sources in calls[1:]]  # more calls' (B, N, D)
    if any(not isinstance(i, OpNode) or not i.shape or i.shape[0] != x.shape[0] for i in inputs):
        return "the calls of this shared MLP see different batches"
    return ""


def _gating(region: Region, sources: list[OpNode], hidden: int) -> tuple[bool, str]:
    """(gated, why the hidden width cannot be routed or ""), from how fc1 feeds the hidden."""
    width_reason = region.width_reason
    outs = [s.shape[-1] for s in sources]
    if len(sources) == 2:  # separate value and gate projections (SwiGLU as w1, w3)
        if outs != [hidden, hidden]:
            width_reason = width_reason or "the two input projections do not match the hidden width"
        return True, width_reason
    if region.split is not None:  # one fc1 of 2 * hidden rows, split into value and gate
        sizes = region.split.arg(1, "split_size_or_sections")
        halves = region.split.op == "chunk" and region.split.arg(1, "chunks") == 2
        halves = halves or (region.split.op != "chunk" and sizes in (hidden, [hidden, hidden]))
        if not halves or outs[0] != 2 * hidden:
            width_reason = (
                width_reason or "the input projection is split in a way other than two equal halves"
            )
        return True, width_reason
    if region.halves:  # one fc1 of 2 * hidden rows, its two halves sliced apart
        if sorted(region.halves) != [0, 1] or outs[0] != 2 * hidden:
            width_reason = (
                width_reason
                or "the input projection is sliced in a way other than two equal halves"
            )
        return True, width_reason
    if outs[0] != hidden:
        width_reason = width_reason or "the input projection width differs from the hidden width"
    return False, width_reason


def _site(
    model: torch.nn.Module,
    name: str,
    calls: list[_Call],
    part: tuple[OpNode, int] | None,
    fused: FusedPiece | None = None,
) -> MlpSite:
    """The MlpSite of checked ``calls`` (fc2's own first), its groups still to set."""
    fc2, region, sources = calls[0]
    fc1 = [fused.linear] if fused else sources
    x = fc1[0].args[0]
    hidden = (part[0] if part else fc2.args[0]).shape[-1]
    gated, width_reason = _gating(region, sources, hidden)
    # chunk(2) halves whatever width it gets; split by sizes keeps the full-width sizes, so a
    # sliced fc1 would not split: such an MLP is not converted (it could not run sliced).
    fixed_split = region.split is not None and region.split.op != "chunk" and not width_reason
    token_dims = len(x.shape) - 1  # batch, then token_dims - 1 token axes, then channels
    # Tokens are routed per call (each call's router decides on its own tokens), so every
    # call must leave a skipped token unchanged.
    token_reason = next((r for c, _, _ in calls if (r := residual_reason(c, token_dims))), "")
    if part and not fused:
        # Flux 1's single blocks: fc1 is a Linear of its own; its sliced call returns the
        # selected tokens only, which the concatenation with the attention cannot take.
        token_reason = "the MLP shares its out-projection with the attention (parallel block)"
    inputs = [x, *(c_sources[0].args[0] for _, _, c_sources in calls[1:])]  # each call's
    return MlpSite(
        name=name,
        block=block_of(name),
        module_class=_class_of(model, name),
        fc1=[s.linear for s in fc1],
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
            f"the fused value/gate projection is split by fixed sizes ({describe(region.split)})"
            if fixed_split
            else "unverified"
            if region.halves or fused
            else ""
        ),
        fc2_offset=part[1] if part else 0,
        fc2_keep=[]
        if not part
        else [c for c in range(fc2.args[0].shape[-1]) if not part[1] <= c < part[1] + hidden],
        fc1_offset=fused.offset if fused else 0,
        width_attrs=width_attrs(model.get_submodule(name), hidden) if fused else [],
    )


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
        # half, which starts at row ``hidden`` (the two halves are dropped together), both
        # after fc1_offset rows of the heads when fc1 is a fused input projection (Flux 2).
        first = site.fc1_offset
        parts = [(first, size, size), (first + site.hidden, size, size)]
        site.in_maps = [UnitMap(linear=site.fc1[0], axis="rows", units=g, parts=parts)]
    else:
        # A plain fc1, or a single group that spans every fc1 row (both halves when gated).
        rows = site.fc1_out // g
        parts = [(site.fc1_offset, rows, rows)]
        site.in_maps = [UnitMap(linear=site.fc1[0], axis="rows", units=g, parts=parts)]
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
