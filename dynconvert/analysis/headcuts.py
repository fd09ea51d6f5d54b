"""Partial attention sites: where a module that mixes heads can have its output cut to them.

A norm across all heads (or a depthwise convolution, or key/value compression) stands between
some projections and the attention: removing a head there is not the same as zeroing it. The
site may still be routed when a module after such an op returns its input's channels in the
same places, channels last: the module and everything before it run in full, and its output
keeps only the active heads' channels (``AttentionSite.cut_maps``). headlocal.py finds where
such a cut is needed; this module checks that one is possible and builds its column table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynconvert.analysis.graph import OpNode
from dynconvert.analysis.layout import ChainError
from dynconvert.analysis.replay import Replay, in_modules


@dataclass
class Cut:
    """A module whose output, computed in full, keeps only the active heads' channels."""

    linears: tuple[str, ...]  # the projections whose every path to the attention passes it
    table: torch.Tensor  # (H, d): the output column (last axis) of channel j of head h


def cut_point(
    n: OpNode,
    nodes: list[OpNode],
    sources: list[OpNode],
    replay: Replay,
    offsets: dict[int, tuple[int, int]],
) -> tuple[str, list[tuple[OpNode, torch.Tensor]]] | None:
    """Where heads can be dropped exactly after an op that needs every head (a norm across
    all heads, a depthwise convolution): the module running it, when each of its calls reads
    one tensor and returns it with the same channels in the same places, channels last
    (``norm_q(to_q(x))``; PixArt-Sigma's ``norm(sr(k))``, called for k and then v), and those
    channels come from one projection. Returns the module and, per call, that projection and
    the codes along the output's last axis; None when there is no such module."""
    m = n.module
    if not m:
        return None
    inside = [x for x in nodes if in_modules(x, {m})]
    ids = {id(x) for x in inside}
    out = []
    for call in _connected(inside, ids):
        entries = {
            id(i): i for x in call for i in x.inputs if id(i) not in ids and id(i) in replay.values
        }
        exits = [
            x
            for x in call
            if any(id(u) not in ids and id(u) in replay.values for u in x.real_users)
        ]
        if len(entries) != 1 or len(exits) != 1:
            return None
        (entry,) = entries.values()
        before, after = replay.values[id(entry)], replay.values[id(exits[0])]
        if before.shape != after.shape or not torch.equal(before, after):
            return None  # the module moves channels (or tokens)
        rows = after.reshape(-1, after.shape[-1])
        if not torch.equal(rows, rows[:1].expand_as(rows)):
            return None  # channels are not along the last axis
        codes = rows[0]
        owner = [
            s
            for s in sources
            if offsets[id(s)][0] <= int(codes.min()) and int(codes.max()) < sum(offsets[id(s)])
        ]
        if int(codes.min()) < 0 or len(owner) != 1:
            return None
        out.append((owner[0], codes))
    return (m, out) if out else None


def _connected(inside: list[OpNode], ids: set[int]) -> list[list[OpNode]]:
    """The ops of a module split by call: groups connected through each other's values."""
    seen: set[int] = set()
    groups = []
    for start in inside:
        if id(start) in seen:
            continue
        group, stack = [], [start]
        seen.add(id(start))
        while stack:
            x = stack.pop()
            group.append(x)
            for y in [*x.inputs, *x.real_users]:
                if id(y) in ids and id(y) not in seen:
                    seen.add(id(y))
                    stack.append(y)
        groups.append(group)
    return groups


def exits(m: str, nodes: list[OpNode], replay: Replay) -> list[OpNode]:
    """The ops of module ``m`` whose values leave it on the way to the attention."""
    inside = {id(x) for x in nodes if in_modules(x, {m})}
    return [
        x
        for x in nodes
        if id(x) in inside
        and any(id(u) not in inside and id(u) in replay.values for u in x.real_users)
    ]


def shadowed(
    nodes: list[OpNode], operands: tuple[OpNode, ...], cuts: set[str], order: dict[int, int]
) -> set[int]:
    """Ids of the ops whose every path to the attention passes a cut module (and the modules'
    own ops): they run in full before the cut, so removing heads does not touch them."""
    tracked = {id(x) for x in nodes}
    live = {id(o) for o in operands}
    for x in sorted(nodes, key=lambda n: order[id(n)], reverse=True):
        if id(x) in live:
            continue
        for u in x.real_users:
            if (
                id(u) in tracked
                and not in_modules(u, cuts)
                and (id(u) in live or u.kind == "mutate")
            ):
                live.add(id(x))
                break
    return {id(x) for x in nodes if id(x) not in live or in_modules(x, cuts)}


def cut_table(
    m: str,
    calls: list[tuple[OpNode, torch.Tensor]],
    sources: list[tuple[OpNode, torch.Tensor]],
    offsets: dict[int, tuple[int, int]],
    shadow: set[int],
) -> Cut:
    """The cut of module ``m``: its projections (which must reach the attention through cuts
    only) and the output column of every head's channels, the same in every call.

    ``calls``: per call of ``m``, its projection and the codes along its output's last axis
    (:func:`cut_point`); ``sources``: every (projection, (H, d) row table) feeding q, k or v.
    """
    table = None
    for lin, codes in calls:
        if id(lin) not in shadow:
            raise ChainError(
                f"{lin.linear} reaches the attention both through {m}, which mixes heads, and "
                "without it (a fused projection): its rows cannot be cut after the module"
            )
        column = torch.full((int(codes.max()) + 1,), -1, dtype=torch.long)
        column[codes] = torch.arange(codes.numel())
        base = offsets[id(lin)][0]
        for _, rows in (s for s in sources if s[0] is lin):  # every role this Linear feeds
            absolute = rows + base
            if int(absolute.max()) >= column.numel() or bool((column[absolute] < 0).any()):
                continue  # another role of the same projection, cut in another call
            t = column[absolute]
            if table is not None and not torch.equal(t, table):
                raise ChainError(f"the calls of {m} keep different columns per head")
            table = t
    if table is None:
        raise ChainError(f"no head's channels leave {m}")
    return Cut(tuple(sorted({lin.linear for lin, _ in calls})), table)
