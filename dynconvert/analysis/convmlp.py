"""Find convolutional MLP sites: pointwise conv, per-channel ops, pointwise conv back.

Sana's GLUMBConv (and Mix-FFN generally) runs its MLP on channels-first tokens (B, C, H, W):
a 1x1 convolution up to 2F channels, an activation, a 3x3 *depthwise* convolution, a split of
the channels into value and gate halves, value * act(gate), and a 1x1 convolution back. Every
op between the two pointwise convolutions acts on each hidden channel on its own (a depthwise
convolution mixes neighbouring tokens, never channels), so cutting the hidden channels into
groups is the same as zeroing them, exactly as in a Linear MLP: the groups are rows of fc1,
channels of each depthwise convolution and input columns of fc2. Tokens are not routed: a
depthwise convolution reads every token's neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

from torch import nn

from dynconvert.analysis.graph import OpGraph, OpNode, block_of, call_lca, module_lca
from dynconvert.analysis.mlp import FoundMlp
from dynconvert.analysis.mlp_region import SPLIT_OPS
from dynconvert.plan import MLP, MlpSite, SkippedSite, UnitMap

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_MAX_REGION_OPS = 32


@dataclass
class ConvRegion:
    """The ops between the pointwise input convolution(s) and fc2."""

    sources: list[OpNode] = field(default_factory=list)  # fc1, or the value and gate convs
    mids: list[OpNode] = field(default_factory=list)  # depthwise convolutions between them
    nodes: list[OpNode] = field(default_factory=list)  # every op between them and fc2
    split: OpNode | None = None  # the value/gate split of a fused fc1 output (channels dim)


def conv_module(n: OpNode, model: nn.Module) -> tuple[str, nn.Module] | None:
    """The ``nn.ConvNd`` (fqn, module) a conv node runs, found by its weight's fqn, when it
    keeps torch's forward and zero padding (so a sliced call can run it); else None.

    Example:
        >>> conv_module(OpNode("x", "add", "binary"), nn.Conv2d(2, 2, 1)) is None
        True
    """
    w = n.args[1] if n.kind == "conv" and len(n.args) > 1 else None
    if not isinstance(w, OpNode) or not w.name.endswith(".weight"):
        return None
    fqn = w.name[: -len(".weight")]
    try:
        m = model.get_submodule(fqn)
    except AttributeError:
        return None
    return (fqn, m) if routable_conv(m) else None


def routable_conv(m: nn.Module) -> bool:
    """An ``nn.Conv1d/2d/3d`` with torch's forward and zero padding (a sliced call can run it).

    Example:
        >>> routable_conv(nn.Conv2d(4, 4, 3, padding=1, groups=4)), routable_conv(nn.Linear(2, 2))
        (True, False)
    """
    ok = isinstance(m, _CONVS) and type(m).forward in {c.forward for c in _CONVS}
    return ok and m.padding_mode == "zeros"


def pointwise(m: nn.Module) -> bool:
    """A 1x1 (or 1, 1x1x1) convolution without groups, stride or padding: a Linear on channels.

    Example:
        >>> pointwise(nn.Conv2d(8, 16, 1)), pointwise(nn.Conv2d(8, 8, 3, padding=1))
        (True, False)
    """
    pads = m.padding if isinstance(m.padding, tuple) else (0,)  # "valid" / "same": none at 1x1
    kernel_one = all(k == 1 for k in m.kernel_size)
    return kernel_one and all(s == 1 for s in m.stride) and m.groups == 1 and not any(pads)


def depthwise(m: nn.Module) -> bool:
    """One filter per channel (groups = in = out channels), stride 1: acts per channel.

    Example:
        >>> depthwise(nn.Conv2d(8, 8, 3, padding=1, groups=8)), depthwise(nn.Conv2d(8, 8, 1))
        (True, False)
    """
    return m.groups == m.in_channels == m.out_channels and all(s == 1 for s in m.stride)


def find_fc2_candidates(graph: OpGraph, model: nn.Module) -> list[OpNode]:
    """The pointwise convolutions of the graph (which of them end an MLP: :func:`build_site`).

    Example:
        >>> from dynconvert.analysis import capture
        >>> from dynconvert.testing import PATTERN_MODELS
        >>> model, inputs = PATTERN_MODELS["conv-mlp"]()
        >>> graph = capture(model, (), inputs)
        >>> sorted(n.args[1].name for n in find_fc2_candidates(graph, model))[:2]
        ['layers.0.ff.inverted.weight', 'layers.0.ff.point.weight']
    """
    out = []
    for n in graph.nodes:
        found = conv_module(n, model) if n.kind == "conv" else None
        if found is not None and pointwise(found[1]):
            out.append(n)
    return out


def _region(fc2: OpNode, model: nn.Module) -> ConvRegion | None:
    """Walk back from fc2's input (B, F, ...) to the pointwise convolution(s) feeding it."""
    start = fc2.args[0]
    if not isinstance(start, OpNode) or not start.shape or len(start.shape) < 3:
        return None
    hidden = start.shape[1]
    region = ConvRegion()
    stack, seen = [start], set()
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if len(region.nodes) > _MAX_REGION_OPS:
            return None
        if n.shape is not None and (len(n.shape) < 2 or n.shape[1] not in (hidden, 2 * hidden)):
            return None  # left the MLP: another channel width
        tracked = [i for i in n.inputs if i.kind not in ("param", "const")]
        if n.kind == "conv":
            found = conv_module(n, model)
            if found is None or len(tracked) != 1:
                return None
            if pointwise(found[1]):
                region.sources.append(n)
                continue
            if not depthwise(found[1]):
                return None
            region.mids.append(n)
        elif n.kind in ("unary", "cast"):
            if len(tracked) != 1:
                return None
        elif n.kind == "binary":
            numbers = [a for a in n.args if not isinstance(a, OpNode)]
            if not (len(tracked) == 2 or (len(tracked) == 1 and len(numbers) == len(n.args) - 1)):
                return None
        elif n.kind == "shape" and n.op == "getitem":
            if not tracked or tracked[0].op not in SPLIT_OPS:
                return None
            tracked = tracked[:1]
        elif n.kind == "shape" and n.op in SPLIT_OPS:
            if not tracked or n.arg(2, "dim", 0) not in (1, 1 - len(tracked[0].shape or ())):
                return None  # only a split of the channels keeps value and gate per channel
            region.split = n
        else:
            return None
        region.nodes.append(n)
        stack.extend(tracked)
    return region if 1 <= len(region.sources) <= 2 else None


def build_site(
    fc2: OpNode,
    model: nn.Module,
    reuse: dict[str, list[OpNode]],
    taken: set[str],
) -> FoundMlp | None:
    """The convolutional MLP ending at pointwise convolution ``fc2`` (its ``linear_nodes`` are
    the convolutions), a refused candidate with the reason, or None when fc2 ends no MLP.

    Args:
        fc2: A pointwise convolution node, tried as the MLP's output projection.
        model: The model the graph was captured from.
        reuse: fqn -> the nodes that call it (a module called twice is not sliced).
        taken: Modules already claimed by another site.

    Example:
        >>> from dynconvert.analysis import analyze
        >>> from dynconvert.testing import PATTERN_MODELS
        >>> model, inputs = PATTERN_MODELS["conv-mlp"]()
        >>> analyze(model, inputs).mlp[0].fc2  # the site build_site found
        'layers.0.ff.point'
    """
    fc2_name, fc2_mod = conv_module(fc2, model) or (None, None)
    if fc2_name is None or fc2_name in taken:
        return None
    region = _region(fc2, model)
    if region is None:
        return None
    sources = sorted(region.sources, key=lambda n: n.name)
    x = sources[0].args[0]  # the MLP input (B, D, H, W)
    if not isinstance(x, OpNode) or any(s.args[0] is not x for s in sources):
        return None
    convs = [*sources, *region.mids, fc2]
    names = [conv_module(c, model)[0] for c in convs]
    fc1 = names[: len(sources)]
    module_name = call_lca(*convs) if all(c.stack for c in convs) else ""
    module_name = module_name or module_lca(*names)
    for name in names:
        if len(reuse.get(name, [])) > 1:
            return _refuse(module_name, f"{name} is called more than once per forward")
        if name in taken:
            return None
    region_ids = {id(n) for n in region.nodes} | {id(fc2)}
    for n in [*sources, *region.nodes]:
        if any(id(u) not in region_ids for u in n.real_users):
            return _refuse(
                module_name, "an intermediate value of the convolutional MLP is used outside it"
            )
    hidden = fc2_mod.in_channels
    fc1_out = sum(model.get_submodule(n).out_channels for n in fc1)
    gated = len(sources) == 2 or region.split is not None
    reason = ""
    if region.split is not None and not (
        region.split.op == "chunk" and region.split.arg(1, "chunks") == 2
    ):
        # chunk(2) halves whatever width it gets; a split by sizes keeps the full-width sizes
        reason = (
            "the fused value/gate convolution is split by fixed sizes (it could not run sliced)"
        )
    if fc1_out != (2 * hidden if gated else hidden) or len(sources) == 2 and region.mids:
        reason = reason or "the input convolutions do not match the hidden width"
    if reason:
        return _refuse(module_name, reason)
    mid_mods = [model.get_submodule(n) for n in names[len(sources) : -1]]
    taps = {prod(m.kernel_size) for m in mid_mods}
    if len(taps) > 1:
        return _refuse(module_name, "depthwise convolutions of different kernel sizes")
    m = model.get_submodule(module_name) if module_name else model
    site = MlpSite(
        name=module_name,
        block=block_of(module_name),
        module_class=f"{type(m).__module__}.{type(m).__qualname__}",
        fc1=fc1,
        fc2=fc2_name,
        in_features=x.shape[1],
        hidden=hidden,
        out_features=fc2_mod.out_channels,
        gated=gated,
        groups=1,  # set by set_conv_groups once the block's head count is known
        tokens=prod(x.shape[2:]),
        in_maps=[],
        out_map=UnitMap(linear=fc2_name, axis="cols", units=1),
        token=False,
        token_reason="a convolutional MLP: its depthwise convolution reads neighbouring tokens"
        if mid_mods
        else "a convolutional MLP: tokens are not routed",
        token_dims=1,
        conv=True,
        mid_channels=[mm.out_channels for mm in mid_mods],
        mid_taps=taps.pop() if taps else 0,
    )
    site.mid_maps = [UnitMap(linear=n, axis="rows", units=1) for n in names[len(sources) : -1]]
    return FoundMlp(site, None, convs)


def _refuse(name: str, reason: str) -> FoundMlp:
    return FoundMlp(None, SkippedSite(name, MLP, reason), [])


def set_conv_groups(site: MlpSite) -> None:
    """After ``mlp.set_groups``: each depthwise convolution's channels follow fc1's rows (all
    of fc1's output, both halves when gated) or one half of them.

    Example:
        >>> from dynconvert.analysis import analyze
        >>> from dynconvert.testing import PATTERN_MODELS
        >>> model, inputs = PATTERN_MODELS["conv-mlp"]()
        >>> site = analyze(model, inputs).mlp[0]  # set_groups, then set_conv_groups, ran
        >>> site.mid_maps[0].parts  # group u: 16 value channels, and 16 gate channels at 64
        [(0, 16, 16), (64, 16, 16)]
    """
    g, size = site.groups, site.hidden // site.groups
    maps = []
    for m, channels in zip(site.mid_maps, site.mid_channels, strict=True):
        if channels == site.fc1_out and site.gated and site.width:
            parts = [(0, size, size), (site.hidden, size, size)]
        else:
            rows = channels // g
            parts = [(0, rows, rows)]
        maps.append(UnitMap(linear=m.linear, axis="rows", units=g, parts=parts))
    site.mid_maps = maps
