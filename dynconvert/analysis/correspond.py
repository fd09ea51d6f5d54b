"""Which nodes of two captures, or of two blocks of one capture, do the same thing.

Two uses, both read from the captured graphs (never from class names):

- the probe, the model captured at a few tokens, against the capture at the real shapes, node
  for node (:func:`align`): the same ops in the same order on the same modules, reading each
  other's values in the same places; only the sizes may differ;
- the blocks of one capture that are structurally identical (:func:`twin_blocks`): the same
  ops, shapes, relative module paths and wiring, the same kinds of values coming in from
  outside. Head-locality is decided once per group and mapped onto the other blocks (reduced.py).

Example:
    >>> from dynconvert.analysis import capture
    >>> from dynconvert.testing import tiny_dit
    >>> model = tiny_dit()
    >>> graph = capture(model, model.example_inputs(2), {})
    >>> twins = twin_blocks(graph, ["blocks.0", "blocks.1"], set())
    >>> twins["blocks.1"].rep
    'blocks.0'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dynconvert.analysis.graph import OpGraph, OpNode, block_of
from dynconvert.analysis.headlocal import REPLAYED


def relative(name: str | None, prefix: str) -> Any:
    """A module path relative to a block (``"."`` for the block itself), or the path itself
    marked absolute when it lies outside.

    Example:
        >>> relative("blocks.3.attn.q", "blocks.3"), relative("embed", "blocks.3")
        ('.attn.q', ('abs', 'embed'))
    """
    if name is None:
        return None
    if name == prefix:
        return "."
    if prefix and name.startswith(prefix + "."):
        return name[len(prefix) :]
    return ("abs", name)


@dataclass
class Block:
    """The nodes a block's modules ran, in execution order, and the values read from outside."""

    name: str
    nodes: list[OpNode]
    externals: list[OpNode] = field(default_factory=list)  # first-use order
    signature: tuple = ()


@dataclass
class Facts:
    """What the replay can see of a value from outside a block (ids of nodes)."""

    from_linear: set[int]  # computed from some Linear, through any ops
    reach: set[int]  # a Linear, or fed by one through ops the replay follows (REPLAYED)


def reach_linear(graph: OpGraph) -> set[int]:
    """Ids of the Linear nodes and of the nodes a Linear feeds through ops the head-locality
    replay follows backwards (headlocal._tracked_set): where that walk finds projections."""
    out: set[int] = set()
    for n in graph.nodes:  # execution order: inputs come first
        if n.kind == "linear" or (n.kind in REPLAYED and any(id(i) in out for i in n.inputs)):
            out.add(id(n))
    return out


@dataclass
class Twin:
    """A block and the representative of its group: the first structurally identical block.

    ``to_rep`` / ``from_rep`` map a node (by id) of one to the node at the same place in the
    other, and the values from outside that both read.
    """

    name: str
    rep: str
    to_rep: dict[int, OpNode]
    from_rep: dict[int, OpNode]


def _encode(a: Any, block: Block, local: dict[int, int], facts: Facts, ext: dict) -> Any:
    """An argument as plain data: a node of the block by its position, a parameter by its path
    relative to the block, a value from outside by its first-use position and what the replay
    can see of it (shape, whether a projection feeds it through head-local ops, whether it is
    computed from one at all); not by the op that made it (the previous block's, or the
    embedding's, for the first block)."""
    if isinstance(a, OpNode):
        if id(a) in local:
            return ("n", local[id(a)])
        if a.kind == "param":
            return ("p", relative(a.name, block.name))
        if id(a) not in ext:
            ext[id(a)] = len(ext)
            block.externals.append(a)
        return ("x", ext[id(a)], a.shape, id(a) in facts.reach, id(a) in facts.from_linear,
                a.kind in REPLAYED, a.kind == "fresh")  # fmt: skip
    if isinstance(a, (list, tuple)):
        return (type(a).__name__, tuple(_encode(x, block, local, facts, ext) for x in a))
    if isinstance(a, dict):
        return ("d", tuple((k, _encode(v, block, local, facts, ext)) for k, v in a.items()))
    return ("c", repr(a))  # numbers, dtypes, strings, None: compared as written


def _sign(block: Block, facts: Facts) -> None:
    """Fill the block's signature: one row per node (op, module, Linear, shapes, wiring, what
    reads its value from outside the block)."""
    local = {id(n): i for i, n in enumerate(block.nodes)}
    ext: dict[int, int] = {}
    rows = []
    for n in block.nodes:
        outside = tuple(sorted(u.op for u in n.real_users if id(u) not in local))
        rows.append((
            n.op, n.kind, relative(n.module, block.name), n.module_class,
            relative(n.linear, block.name), n.shape, n.shapes,
            _encode(n.args, block, local, facts, ext),
            _encode(n.kwargs, block, local, facts, ext),
            n.is_output, outside, id(n) in facts.from_linear,
        ))  # fmt: skip
    block.signature = tuple(rows)


def blocks_of(graph: OpGraph, names: list[str]) -> dict[str, Block]:
    """The nodes of each named block (every op whose module lies in it), in graph order."""
    wanted = set(names)
    out = {b: Block(b, []) for b in names}
    for n in graph.nodes:
        b = block_of(n.module) if n.module else ""
        if b in wanted:
            out[b].nodes.append(n)
    return out


def twin_blocks(graph: OpGraph, names: list[str], from_linear: set[int]) -> dict[str, Twin]:
    """Block -> its representative (the first block in ``names`` with the same signature) and
    the node maps between them; a block without an earlier twin is its own representative.

    ``from_linear``: ids of the nodes computed from some Linear (headlocal.linear_ancestry),
    part of what a value from outside the block is. A twin's answer may name nodes of its own
    block, or values from outside that both blocks share; reduced.py checks that when mapping.
    """
    blocks = blocks_of(graph, names)
    facts = Facts(from_linear, reach_linear(graph))
    first: dict[tuple, Block] = {}
    out: dict[str, Twin] = {}
    for name in names:
        b = blocks[name]
        _sign(b, facts)
        rep = first.setdefault(b.signature, b)
        to_rep: dict[int, OpNode] = {}
        from_rep: dict[int, OpNode] = {}
        # Values from outside map only where both blocks read the very same one (a rotary
        # table made once for all blocks): an answer naming another is not mapped.
        shared = [(x, y) for x, y in zip(b.externals, rep.externals) if x is y]
        for x, y in [*zip(b.nodes, rep.nodes), *shared]:
            to_rep[id(x)], from_rep[id(y)] = y, x
        out[name] = Twin(name, rep.name, to_rep, from_rep)
    return out


def _skeleton(a: Any, index: dict[int, int]) -> Any:
    """An argument with its sizes left out: nodes by position (parameters and inputs by name),
    other values by type only."""
    if isinstance(a, OpNode):
        return ("n", index[id(a)]) if id(a) in index else (a.kind, a.name)
    if isinstance(a, (list, tuple)):
        return tuple(_skeleton(x, index) for x in a)
    if isinstance(a, dict):
        return tuple((k, _skeleton(v, index)) for k, v in a.items())
    return type(a).__name__


def align(probe: OpGraph, real: OpGraph) -> dict[int, OpNode] | str:
    """Probe node id -> the real capture's node at the same place, or why they differ.

    Example:
        >>> from dynconvert.analysis import capture
        >>> from dynconvert.testing import tiny_dit
        >>> model = tiny_dit()
        >>> a = capture(model, model.example_inputs(1), {})
        >>> b = capture(model, model.example_inputs(2), {})
        >>> len(align(a, b)) == len(b.nodes)
        True
    """
    if len(probe.nodes) != len(real.nodes):
        return f"{len(probe.nodes)} ops at the probe's shapes, {len(real.nodes)} at the real ones"
    pi = {id(n): i for i, n in enumerate(probe.nodes)}
    ri = {id(n): i for i, n in enumerate(real.nodes)}
    out: dict[int, OpNode] = {}
    for i, (a, b) in enumerate(zip(probe.nodes, real.nodes)):
        same = (a.op, a.kind, a.module, a.linear) == (b.op, b.kind, b.module, b.linear)
        if not same or _skeleton((a.args, a.kwargs), pi) != _skeleton((b.args, b.kwargs), ri):
            where_a, where_b = a.module or "<root>", b.module or "<root>"
            return (
                f"op {i} differs: `{a.op}` in {where_a} at the probe's shapes, "
                f"`{b.op}` in {where_b} at the real ones"
            )
        out[id(a)] = b
    return out
