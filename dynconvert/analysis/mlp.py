"""Find MLP sites in an OpGraph: fc1 (or a gated pair), what lies between, fc2, and the residual."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynconvert.analysis.graph import OpGraph, OpNode, block_of, call_lca, module_lca
from dynconvert.plan import MlpSite, SkippedSite, UnitMap


@dataclass
class Region:
    """The ops between the input projection(s) and fc2."""

    sources: list[OpNode]
    nodes: list[OpNode]
    split: OpNode | None
    norms: list[OpNode]
    width_reason: str = ""
    token_reason: str = ""


@dataclass
class FoundMlp:
    site: MlpSite | None
    skipped: SkippedSite | None
    linear_nodes: list[OpNode]


def _desc(n: OpNode) -> str:
    cls = n.module_class.rsplit(".", 1)[-1] if n.module_class else "model"
    return f"`{n.op}` in {n.module or '<root>'} ({cls})"


def _region(fc2: OpNode) -> Region | None:
    """Walk back from fc2's input to the Linear(s) feeding it, or None when it is not an MLP."""
    start = fc2.args[0]
    if not isinstance(start, OpNode):
        return None
    stack, seen = [start], set()
    sources: list[OpNode] = []
    nodes: list[OpNode] = []
    split = None
    norms: list[OpNode] = []
    width_reason = ""
    hidden = start.shape[-1] if start.shape else -1
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.kind == "linear":
            sources.append(n)
            continue
        nodes.append(n)
        if len(nodes) > 32 or (n.shape is not None and n.shape[-1] not in (hidden, 2 * hidden)):
            return None  # left the MLP: only hidden-width values lie between fc1 and fc2
        tracked = [i for i in n.inputs if i.kind not in ("param", "const")]
        if n.kind in ("unary", "cast") and len(tracked) == 1:
            stack.extend(tracked)
        elif n.kind == "binary":
            others = [a for a in n.args if not isinstance(a, OpNode)]
            if len(tracked) == 2 or (len(tracked) == 1 and len(others) == len(n.args) - 1):
                stack.extend(tracked)
            else:
                return None
        elif n.kind == "shape" and n.op == "getitem" and tracked and tracked[0].op in ("chunk", "split", "split_with_sizes"):
            stack.append(tracked[0])
        elif n.kind == "shape" and n.op in ("chunk", "split", "split_with_sizes"):
            dim = n.arg(2, "dim", 0) if n.op != "chunk" else n.arg(2, "dim", 0)
            rank = len(tracked[0].shape or ())
            if dim not in (-1, rank - 1):
                return None
            split = n
            stack.extend(tracked)
        elif n.kind == "norm" and tracked:
            norms.append(n)
            width_reason = f"a norm over the hidden channels ({_desc(n)}) runs inside the MLP"
            stack.append(tracked[0])
        else:
            return None
    if not sources or len(sources) > 2:
        return None
    return Region(sources=sources, nodes=nodes, split=split, norms=norms, width_reason=width_reason)


def _residual_reason(fc2: OpNode, token_dims: int) -> str:
    """Empty when fc2's output reaches the residual as ``x + g * f`` with per-token-constant g."""
    cur = fc2
    while True:
        users = cur.real_users
        if len(users) != 1:
            return f"the MLP output is used {len(users)} times, not only by the residual add"
        u = users[0]
        tracked = [i for i in u.inputs if i is not cur]
        if u.kind == "cast" or (u.kind == "unary" and u.op.startswith(("dropout", "identity"))):
            cur = u
            continue
        if u.kind == "binary" and u.op in ("mul", "div", "mul_", "div_", "truediv"):
            other = [a for a in u.args if a is not cur]
            ok = True
            for a in other:
                if isinstance(a, OpNode):
                    ok = ok and _per_token_constant(a.shape, cur.shape, token_dims)
            if not ok:
                return f"the MLP output is scaled per token ({_desc(u)}), so a skipped token would not stay unchanged"
            cur = u
            continue
        if u.kind == "binary" and u.op in ("add", "add_"):
            other = [a for a in tracked if isinstance(a, OpNode)]
            if len(other) == 1 and other[0].shape == u.shape:
                return ""
            return f"the MLP output is added to something that is not the residual stream ({_desc(u)})"
        return f"{_desc(u)} follows the MLP output before the residual add"


def _per_token_constant(shape: tuple[int, ...] | None, ref: tuple[int, ...] | None, token_dims: int) -> bool:
    if shape is None or ref is None:
        return False
    # Align from the right; the token axes are 1..token_dims-1 of ref (axis 0 is the batch).
    offset = len(ref) - len(shape)
    for axis in range(1, token_dims):
        j = axis - offset
        if 0 <= j < len(shape) and shape[j] != 1:
            return False
    return True


def build_site(
    fc2: OpNode,
    model: torch.nn.Module,
    reuse: dict[str, list[OpNode]],
    taken: set[str],
    order: dict[int, int] | None = None,
) -> FoundMlp | None:
    """An MlpSite ending at ``fc2``, a SkippedSite with the reason, or None when not an MLP."""
    if fc2.linear is None or fc2.linear in taken:
        return None
    region = _region(fc2)
    if region is None:
        return None
    sources = sorted(region.sources, key=lambda n: (order or {}).get(id(n), 0))
    x = sources[0].args[0]
    if not isinstance(x, OpNode) or not x.shape or len(x.shape) < 3:
        return None  # no token dimension: an embedding MLP, not a transformer MLP
    if any(s.args[0] is not x for s in sources):
        return None
    names = [s.linear for s in sources]
    module_name = call_lca(*sources, fc2) if all(n.stack for n in [*sources, fc2]) else ""
    module_name = module_name or module_lca(*(n or "" for n in names), fc2.linear)
    if any(n is None for n in names):
        return FoundMlp(None, SkippedSite(module_name, "mlp", "an input projection is not an nn.Linear"), [])
    for ln in [*sources, fc2]:
        if len(reuse.get(ln.linear, [])) > 1:
            return FoundMlp(None, SkippedSite(module_name, "mlp", f"{ln.linear} is called more than once per forward"), [])
        if ln.linear in taken:
            return None
    region_ids = {id(n) for n in region.nodes} | {id(fc2)}
    for n in [*sources, *region.nodes]:
        if any(id(u) not in region_ids for u in n.real_users):
            return FoundMlp(None, SkippedSite(module_name, "mlp", f"an intermediate value ({_desc(n)}) is used outside the MLP"), [])

    hidden = fc2.args[0].shape[-1]
    width_reason = region.width_reason
    gated = False
    outs = [s.shape[-1] for s in sources]
    if len(sources) == 2:
        gated = True
        if outs != [hidden, hidden]:
            width_reason = width_reason or "the two input projections do not match the hidden width"
    elif region.split is not None:
        gated = True
        sizes = region.split.arg(1, "split_size_or_sections")
        halves = region.split.op == "chunk" and region.split.arg(1, "chunks") == 2
        halves = halves or (region.split.op != "chunk" and sizes in (hidden, [hidden, hidden]))
        if not halves or outs[0] != 2 * hidden:
            width_reason = width_reason or "the input projection is split in a way other than two equal halves"
    elif outs[0] != hidden:
        width_reason = width_reason or "the input projection width differs from the hidden width"

    token_dims = len(x.shape) - 1
    token_reason = _residual_reason(fc2, token_dims)
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
        groups=1,
        tokens=int(torch.tensor(x.shape[1:-1]).prod()),
        in_maps=[],
        out_map=UnitMap(linear=fc2.linear, axis="cols", units=1),
        width=not width_reason,
        width_reason=width_reason,
        token=not token_reason,
        token_reason=token_reason,
        token_dims=token_dims,
    )
    return FoundMlp(site, None, [*sources, fc2])


def set_groups(site: MlpSite, groups: int) -> None:
    """Cut the hidden width into ``groups`` equal contiguous groups and fill the unit maps."""
    g = max(d for d in range(1, min(groups, site.hidden) + 1) if site.hidden % d == 0)
    if g < 2:
        site.width = False
        site.width_reason = site.width_reason or f"hidden width {site.hidden} cannot be cut into groups"
    g = g if site.width else 1
    size = site.hidden // g
    site.groups = g
    if len(site.fc1) == 2:
        site.in_maps = [UnitMap(linear=n, axis="rows", units=g, parts=[(0, size, size)]) for n in site.fc1]
    elif site.gated and site.width:
        site.in_maps = [UnitMap(linear=site.fc1[0], axis="rows", units=g,
                                parts=[(0, size, size), (site.hidden, size, size)])]
    else:
        rows = site.fc1_out // g
        site.in_maps = [UnitMap(linear=site.fc1[0], axis="rows", units=g, parts=[(0, rows, rows)])]
    site.out_map = UnitMap(linear=site.fc2, axis="cols", units=g, parts=[(0, size, size)])


def _class_of(model: torch.nn.Module, name: str) -> str:
    m = model.get_submodule(name) if name else model
    return f"{type(m).__module__}.{type(m).__qualname__}"


def find_fc2_candidates(graph: OpGraph) -> list[OpNode]:
    return [n for n in graph.nodes if n.kind == "linear"]
