"""The plan: what analysis found in a model, and what convert will change.

A plan is plain data (dataclasses of ints, strings and lists) so that it can be printed by
`dynconvert inspect`, stored in the JSON record beside the weights, and replayed by `load`
without tracing the model again. The attention site and the unit maps live in
``dynconvert/sites/`` (with the attention forms' parts) and are re-exported here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from dynconvert.errors import RecordError
from dynconvert.sites import part_classes
from dynconvert.sites.attention import AttentionSite, AttentionStream
from dynconvert.sites.units import UnitMap

__all__ = [
    "PLAN_VERSION", "AttentionSite", "AttentionStream", "MlpSite", "Plan", "Site", "SkippedSite",
    "UnitMap", "migrate",
]  # fmt: skip

PLAN_VERSION = 3
"""Format version of ``Plan.to_dict``, stored in the saved record. 3: an attention site's forms
are optional parts (``AttentionSite.parts``); 2: they were flat fields of the site (a version-2
plan is migrated on load, see :func:`migrate`); 1: before joint attention streams and kept
columns (the newer fields take their defaults)."""


ROUTER_TIMESTEPS = 1000
"""The routers read timesteps on DDPM's 0..1000 scale (``Plan.timestep_scale`` maps a model's
own convention onto it): width tables, token capacities and FLOPs profiles hold one value per
step 0..999, and ``1000 - t`` reverses time."""

TOKEN_REDUCTION = 16
"""Default bottleneck ratio r of the token router D -> D/r -> 1 (the paper's; ConvertConfig)."""


def token_router_width(dim: int, reduction: int = TOKEN_REDUCTION) -> int:
    """Hidden width of the token router of a D-wide MLP input: D // r, at least 1.

    Example:
        >>> token_router_width(1152), token_router_width(8)
        (72, 1)
    """
    return max(1, dim // reduction)


@dataclass
class MlpSite:
    """One MLP: input projection(s), output projection, channel groups and cost."""

    name: str  # fqn of the module that runs the MLP
    block: str  # the transformer block it belongs to
    module_class: str
    fc1: list[str]  # the input Linear, or the value and gate Linears of a gated MLP
    fc2: str
    in_features: int  # D
    hidden: int  # F: fc2's input width (half of a fused value-and-gate fc1's output)
    out_features: int
    gated: bool
    groups: int  # G equal contiguous channel groups (1 when width routing is off)
    tokens: int  # tokens per sample at the example inputs
    in_maps: list[UnitMap]  # rows of each input Linear, per group
    out_map: UnitMap  # columns of fc2, per group
    width: bool = True  # channel groups are routed
    width_reason: str = ""  # why not
    token: bool = True  # tokens are routed (the MLP output reaches the residual as x + g * f)
    token_reason: str = ""  # why not
    token_dims: int = 2  # leading dims of the MLP input: batch plus token_dims - 1 token axes
    fast: bool = True  # whether evaluation may run the sliced, gathered fast path here
    fast_reason: str = ""
    index: int = -1  # position among the converted sites, in execution order
    fold: int = 1  # rows per sample (frames folded into the batch by a video block), example inputs
    calls: int = 1  # applications per forward (shared weights over streams); tokens sums them
    # A parallel block's MLP shares fc2 with the attention: its hidden channels start at column
    # fc2_offset of fc2's input, and the other columns (the attention's) are kept.
    fc2_offset: int = 0
    fc2_keep: list[int] = field(default_factory=list)
    # Flux 2's single blocks: fc1 is one piece of a fused input projection whose other rows are
    # the attention's q, k and v; the MLP's rows start at fc1_offset. The model splits the
    # fused output by the attributes in width_attrs (holding the hidden width F): a sliced call
    # lowers them to the active groups' channels.
    fc1_offset: int = 0
    width_attrs: list[str] = field(default_factory=list)
    # A convolutional MLP (Sana's GLUMBConv, Mix-FFN): fc1 and fc2 are pointwise convolutions
    # over channels-first inputs (B, C, H, W), and ``mid`` per-channel (depthwise) convolutions
    # of ``mid_taps`` kernel taps run between them on ``mid_channels`` channels each (fc1's
    # output, or one half of it); their channels are sliced with their group (``mid_maps``).
    conv: bool = False
    mid_maps: list[UnitMap] = field(default_factory=list)
    mid_channels: list[int] = field(default_factory=list)
    mid_taps: int = 0

    @property
    def units(self) -> int:
        """Routed units: the channel groups (1 when width routing is off)."""
        return self.groups if self.width else 1

    @property
    def out_maps(self) -> list[UnitMap]:
        """fc2's columns per group."""
        return [self.out_map]

    def maps(self) -> list[UnitMap]:
        """Every UnitMap of the site: fc1 rows, depthwise channels, then fc2 columns."""
        return [*self.in_maps, *self.mid_maps, self.out_map]

    @property
    def fc1_out(self) -> int:
        """Output rows of fc1: value and gate halves when gated (2F), else F."""
        return self.hidden * 2 if self.gated else self.hidden

    def macs(self, tokens: int | None = None, fold: int | None = None) -> int:
        """Multiply-accumulates of this MLP for one sample: N*D*F1 + N*F*D_out (N tokens per
        row, times ``fold`` rows per sample)."""
        n = (self.tokens if tokens is None else tokens) * (self.fold if fold is None else fold)
        mid = sum(self.mid_channels) * self.mid_taps  # depthwise convolutions, per token
        return n * self.in_features * self.fc1_out + n * mid + n * self.hidden * self.out_features

    def router_macs(
        self, tokens: int | None = None, reduction: int = TOKEN_REDUCTION, fold: int | None = None
    ) -> int:
        """MACs of this site's token router (D -> D/r -> 1) for one sample."""
        if not self.token:
            return 0
        n = (self.tokens if tokens is None else tokens) * (self.fold if fold is None else fold)
        r = token_router_width(self.in_features, reduction)  # hidden width of the router
        return n * (self.in_features * r + r)  # D -> r, then r -> 1, per token


@dataclass
class SkippedSite:
    """A candidate site that was not converted, and why."""

    name: str
    kind: Literal["attention", "mlp"]
    reason: str


Site = AttentionSite | MlpSite
"""A converted site of either kind."""

ATTENTION, MLP = "attention", "mlp"
"""The two site kinds as named in ``SkippedSite.kind``, inspect's JSON and the FLOPs report."""


def site_kind(site: Site) -> str:
    """``ATTENTION`` or ``MLP``: the kind of a converted site.

    Example:
        >>> from dynconvert.analysis import analyze
        >>> from dynconvert.testing import tiny_dit
        >>> [site_kind(s) for s in analyze(tiny_dit()).sites]
        ['attention', 'mlp', 'attention', 'mlp']
    """
    return ATTENTION if isinstance(site, AttentionSite) else MLP


@dataclass
class Plan:
    """Everything analysis found: sites to convert, sites skipped and the model's cost."""

    model_class: str  # "package.module.Class" of the analysed model (checked on load)
    timestep_arg: str  # the forward argument the routers read t from
    capture: str  # "torch.export" or "torch.fx"
    coverage: str  # what the capture covered (untraceable parts, leaves)
    batch: int  # batch size of the example inputs
    input_shapes: dict[str, list[int]]  # example input shapes, by position or keyword
    attention: list[AttentionSite]
    mlp: list[MlpSite]
    skipped: list[SkippedSite]
    static_macs: int  # MACs of the whole forward at the example inputs (the whole batch)
    other_macs: int  # the part of static_macs routing never changes (embeddings, head, ...)
    version: int = PLAN_VERSION
    timestep_scale: float = 1.0  # routers read t x this (onto DDPM's 0..1000)
    timestep_reverse: bool = False  # and 1000 - that, for time that runs from noise to data
    timestep_convention: str = ""  # what analysis assumed the model takes, and why

    @property
    def sites(self) -> list[Site]:
        """All converted sites in execution order (their ``index``)."""
        return sorted([*self.attention, *self.mlp], key=lambda s: s.index)

    @property
    def blocks(self) -> list[str]:
        """The blocks holding converted sites, in execution order."""
        seen: dict[str, None] = {}
        for s in self.sites:
            seen.setdefault(s.block, None)
        return list(seen)

    @property
    def static_macs_per_sample(self) -> int:
        """MACs of the original model's forward for one sample."""
        return self.static_macs // max(self.batch, 1)

    @property
    def blocks_macs_per_sample(self) -> int:
        """MACs of the converted attention and MLP sites (the paper's "blocks only")."""
        total = 0
        for s in self.sites:
            total += s.macs()
        return total

    def drop_sites(self, reasons: dict[int, str]) -> None:
        """Move the sites whose index is in ``reasons`` to ``skipped`` with their reason: their
        cost joins what routing never changes, and the other sites are numbered again in
        execution order.

        Example:
            >>> from dynconvert.analysis import analyze
            >>> from dynconvert.testing import tiny_dit
            >>> plan = analyze(tiny_dit())
            >>> plan.drop_sites({0: "not wanted"})
            >>> len(plan.sites), plan.skipped[-1].reason, plan.sites[0].index
            (3, 'not wanted', 0)
        """
        for s in self.sites:
            if s.index in reasons:
                self.skipped.append(SkippedSite(s.name, site_kind(s), reasons[s.index]))
                self.other_macs += s.macs() * self.batch
        self.attention = [s for s in self.attention if s.index not in reasons]
        self.mlp = [s for s in self.mlp if s.index not in reasons]
        for i, s in enumerate(sorted([*self.attention, *self.mlp], key=lambda x: x.index)):
            s.index = i

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Inverse of :meth:`to_dict` (JSON turned the parts' tuples into lists: back to tuples).

        Example:
            >>> from dynconvert.analysis import analyze
            >>> from dynconvert.plan import Plan
            >>> from dynconvert.testing import tiny_dit
            >>> plan = analyze(tiny_dit())
            >>> Plan.from_dict(plan.to_dict()) == plan
            True
        """
        d = migrate(data)
        maps = UnitMap.from_dict
        d["attention"] = [_attention_site(a) for a in d["attention"]]
        d["mlp"] = [
            MlpSite(
                **{
                    **m,
                    "in_maps": [maps(x) for x in m["in_maps"]],
                    "out_map": maps(m["out_map"]),
                    "mid_maps": [maps(x) for x in m.get("mid_maps", [])],
                }
            )  # fmt: skip
            for m in d["mlp"]
        ]
        d["skipped"] = [SkippedSite(**s) for s in d["skipped"]]
        return cls(**d)


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """A plan dict of any earlier version as a dict of this version.

    Version 2 kept each attention form in flat fields of the site; each registered part names
    the fields it replaces (``V2``) and takes them over when any differs from "not this form".

    Example:
        >>> old = {"version": 2, "attention": [{"name": "attn", "gate": "", "gate_in": 0}]}
        >>> migrate(old)["attention"][0]
        {'name': 'attn', 'parts': {}}
    """
    d = dict(data)
    version = d.get("version", 1)
    if version < 3:
        d["attention"] = [_v2_parts(a) for a in d.get("attention", [])]
    d["version"] = PLAN_VERSION
    return d


def _v2_parts(site: dict[str, Any]) -> dict[str, Any]:
    """A version-2 attention site dict with its flat form fields gathered into parts."""
    site, found = dict(site), {}
    for kind, part in part_classes().items():
        old = {name: site.pop(name) for name in part.V2 if name in site}
        if any(value != part.V2[name][1] for name, value in old.items()):
            found[kind] = {part.V2[name][0]: value for name, value in old.items()}
    return {**site, "parts": found}


def _attention_site(a: dict[str, Any]) -> AttentionSite:
    """An AttentionSite from its dict: maps, streams and parts as objects again."""
    maps = UnitMap.from_dict
    unknown = sorted(set(a.get("parts", {})) - set(part_classes()))
    if unknown:
        raise RecordError(
            f"the attention site {a.get('name')!r} takes the form {unknown[0]!r}, which this "
            f"dynconvert does not know (it knows {', '.join(sorted(part_classes()))}); upgrade "
            "dynconvert (pip install -U dynconvert)"
        )
    return AttentionSite(
        **{
            **a,
            "in_maps": [maps(m) for m in a["in_maps"]],
            "out_map": maps(a["out_map"]),
            "more_out_maps": [maps(m) for m in a.get("more_out_maps", [])],
            "streams": [AttentionStream(**s) for s in a.get("streams", [])],
            "parts": {k: part_classes()[k].from_dict(p) for k, p in a.get("parts", {}).items()},
        }
    )
