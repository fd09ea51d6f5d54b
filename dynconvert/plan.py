"""The plan: what analysis found in a model, and what convert will change.

A plan is plain data (dataclasses of ints, strings and lists) so that it can be printed by
`dynconvert inspect`, stored in the JSON record beside the weights, and replayed by `load`
without tracing the model again.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from dynconvert import forms
from dynconvert.errors import RecordError
from dynconvert.forms import AttentionPart

PLAN_VERSION = 3
"""Format version of ``Plan.to_dict``, stored in the saved record. 3: an attention site's forms
are optional parts (``AttentionSite.parts``); 2: they were flat fields of the site (a version-2
plan is migrated on load, see :func:`migrate`); 1: before joint attention streams and kept
columns (the newer fields take their defaults)."""


@dataclass
class UnitMap:
    """Which rows (or columns) of one Linear belong to each unit (a head or a channel group).

    Unit ``u`` owns, for every part ``(base, stride, size)``, the indices
    ``base + u * stride ... base + u * stride + size - 1``. A fused qkv projection has three
    parts (q, k and v rows of the same head); a gated MLP input has two (value and gate halves).
    ``explicit`` replaces the parts when the layout is not regular: ``explicit[p][u]`` lists
    the indices of unit ``u`` in part ``p``.

    Example:
        >>> qkv = UnitMap("attn.qkv", "rows", units=2, parts=[(0, 4, 4), (8, 4, 4), (16, 4, 4)])
        >>> qkv.indices(1)  # q, k and v rows of head 1 (2 heads of 4 channels)
        [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]
    """

    linear: str  # fqn of the nn.Linear
    axis: Literal["rows", "cols"]  # output rows (q/k/v, fc1) or input columns (out-proj, fc2)
    units: int  # heads, or channel groups
    parts: list[tuple[int, int, int]] = field(default_factory=list)  # (base, stride, size)
    explicit: list[list[list[int]]] | None = None
    # Indices that belong to no unit and are always computed: the MLP columns of a parallel
    # block's fused out-projection, which reads concat(attention output, MLP hidden).
    keep: list[int] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UnitMap:
        """A UnitMap from its dict (JSON turned the parts' tuples into lists: back to tuples).

        Example:
            >>> UnitMap.from_dict({"linear": "fc1", "axis": "rows", "units": 2, "parts": [[0, 4, 4]]})
            UnitMap(linear='fc1', axis='rows', units=2, parts=[(0, 4, 4)], explicit=None, keep=[])
        """
        return cls(
            linear=d["linear"],
            axis=d["axis"],
            units=d["units"],
            parts=[tuple(p) for p in d.get("parts", [])],
            explicit=d.get("explicit"),
            keep=list(d.get("keep", [])),
        )

    def indices(self, unit: int) -> list[int]:
        """Indices of one unit, in increasing order of part then offset."""
        if self.explicit is not None:
            return [i for part in self.explicit for i in part[unit]]
        out: list[int] = []
        for base, stride, size in self.parts:
            start = base + unit * stride
            out.extend(range(start, start + size))
        return out


@dataclass
class AttentionStream:
    """One more projection set of a joint attention (text and image streams attended together).

    Its q, k and v Linears fill their own range of the attention's sequence and its
    out-projection reads that range back; a head is on or off in every stream at once.
    An empty name means the stream has no such Linear (a stream whose output is dropped, or a
    context of keys and values only).
    """

    q: str
    k: str
    v: str
    out: str
    q_in: int
    kv_in: int
    out_features: int
    tokens_q: int
    tokens_kv: int
    v_in: int = 0  # input features of the v projection when they differ from k's (0: kv_in)


@dataclass
class AttentionSite:
    """One attention call: the core every attention has (projections, heads, unit maps, token
    counts, the streams of a joint attention) and the optional parts of the forms it takes
    (``parts``: form name -> its part, see ``dynconvert/forms``).

    The fields parts took over in plan version 3 (``site.gate``, ``site.kv_stride``...) still
    read, from the part or as "not this form"; they are set through ``site.parts``.
    """

    name: str  # fqn of the attention module ("" for the root)
    block: str  # the transformer block it belongs to (e.g. "blocks.3")
    module_class: str  # "package.module.Class" of the attention module
    kind: Literal["self", "cross"]
    heads: int  # query heads
    head_dim: int  # channels of a query / key head
    v_head_dim: int  # channels of a value head (the attention output per head)
    q: str  # fqns of the q, k, v Linears (the same fqn three times for a fused qkv)
    k: str
    v: str
    out: str  # fqn of the out-projection
    q_in: int  # input features of the q projection
    kv_in: int  # input features of the k (and v) projection (the context's, in cross-attention)
    out_features: int  # output features of the out-projection
    tokens_q: int  # query tokens per sample at the example inputs
    tokens_kv: int  # key tokens per sample at the example inputs
    in_maps: list[UnitMap]  # rows of each distinct input Linear, per head
    out_map: UnitMap  # columns of the out-projection, per head
    head_attrs: dict[str, int] = field(default_factory=dict)  # attribute -> channels per head
    fast: bool = True  # whether evaluation may run the sliced fast path here
    fast_reason: str = ""  # why not, or "unverified" until convert has checked it
    index: int = -1  # position among the converted sites, in execution order
    streams: list[AttentionStream] = field(default_factory=list)  # joint attention: the others
    more_out_maps: list[UnitMap] = field(default_factory=list)  # their out-projections' columns
    between: list[str] = field(default_factory=list)  # head-local ops before the attention
    fold: int = 1  # rows per sample (frames folded into the batch by a video block), example inputs
    kv_heads: int = 0  # key/value heads when fewer (grouped-query attention; 0: as many as heads)
    v_in: int = 0  # input features of the v projection when they differ from k's (0: kv_in)
    parts: dict[str, AttentionPart] = field(default_factory=dict)  # form name -> its part

    def __getattr__(self, name: str) -> Any:
        # Only called for names that are not fields: a field a part took over reads from it.
        owner = _v2_owner(name)
        if owner is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        field_name, absent = owner.V2[name]
        part = self.__dict__.get("parts", {}).get(owner.kind)
        return copy.copy(absent) if part is None else getattr(part, field_name)

    def __setattr__(self, name: str, value: Any) -> None:
        owner = _v2_owner(name)
        if owner is not None:
            raise AttributeError(
                f"{name} belongs to the {owner.kind!r} part of an attention site since plan "
                f"version 3: set site.parts[{owner.kind!r}]"
            )
        object.__setattr__(self, name, value)

    @property
    def units(self) -> int:
        """Routed units: one per head, or per key/value head with its query heads (GQA)."""
        return self.kv_heads or self.heads

    @property
    def group(self) -> int:
        """Query heads per unit (1 unless key/value heads are shared)."""
        return self.heads // self.units

    def fixed_macs(self, seen: dict[str, int] | None = None, fold: int | None = None) -> int:
        """The part of :meth:`macs` no routing saves: projections computed in full (partial site)."""
        seen = seen or {}
        total = sum(p.fixed_macs(self, seen) for p in self.parts.values())
        return total * (self.fold if fold is None else fold)

    def every_stream(self) -> list[AttentionStream]:
        """The site's own projections as the first stream, then the other streams."""
        first = AttentionStream(
            self.q, self.k, self.v, self.out, self.q_in, self.kv_in, self.out_features,
            self.tokens_q, self.tokens_kv, self.v_in,
        )  # fmt: skip
        return [first, *self.streams]

    def query_tokens(self, seen: dict[str, int]) -> int:
        """Query tokens per row of the first stream in a call (``seen``) or at the example."""
        return seen.get(self.q, self.tokens_q) if self.q else 0

    def keys_seen(self, keys: int) -> int:
        """Keys the attention sees from a stream whose key projection ran on ``keys`` tokens."""
        for p in self.parts.values():
            keys = p.keys_seen(keys)
        return keys

    def attention_macs(self, queries: int, keys: int) -> int:
        """MACs per row of the attention over all streams: QK^T is N*M*H*d_qk and AV is
        N*M*H*d_v (N queries and M keys summed over the streams), unless a part counts it."""
        for p in self.parts.values():
            macs = p.attention_macs(self, queries, keys)
            if macs is not None:
                return macs
        return queries * keys * self.heads * (self.head_dim + self.v_head_dim)

    @property
    def out_maps(self) -> list[UnitMap]:
        """Columns per head of every out-projection (one per stream that has one)."""
        return [self.out_map, *self.more_out_maps]

    def maps(self) -> list[UnitMap]:
        """Every UnitMap of the site: input rows, then out-projection columns."""
        return [*self.in_maps, *self.out_maps]

    def macs(self, seen: dict[str, int] | None = None, fold: int | None = None) -> int:
        """Multiply-accumulates of this site for one sample (projections + QK^T + AV + parts).

        ``seen`` maps a Linear of the site to the tokens per row it ran on in a call (the
        plan's token counts otherwise), ``fold`` the rows per sample (see ``fold``). Source: the
        standard transformer count (Kaplan et al. 2020, table 1), with the attention matmuls
        made explicit (:meth:`attention_macs`); the k and v projections have ``units`` heads
        (fewer with grouped-query attention); each part adds its own terms (dynconvert/forms).
        """
        seen = seen or {}
        h, hk, dq, dv = self.heads, self.units, self.head_dim, self.v_head_dim
        total, n_all, m_all = 0, 0, 0
        for s in self.every_stream():
            n = seen.get(s.q, s.tokens_q) if s.q else 0
            m = seen.get(s.k, s.tokens_kv) if s.k else 0
            total += n * s.q_in * h * dq + m * hk * (s.kv_in * dq + (s.v_in or s.kv_in) * dv)
            if s.out:
                total += seen.get(s.out, n) * h * dv * s.out_features
            n_all, m_all = n_all + n, m_all + self.keys_seen(m)
        total += sum(p.added_macs(self, seen) for p in self.parts.values())
        total += self.attention_macs(n_all, m_all)
        return total * (self.fold if fold is None else fold)


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
        self, tokens: int | None = None, reduction: int = 16, fold: int | None = None
    ) -> int:
        """MACs of this site's token router (D -> D/r -> 1) for one sample."""
        if not self.token:
            return 0
        n = (self.tokens if tokens is None else tokens) * (self.fold if fold is None else fold)
        r = max(1, self.in_features // reduction)  # hidden width of the router
        return n * (self.in_features * r + r)  # D -> r, then r -> 1, per token


@dataclass
class SkippedSite:
    """A candidate site that was not converted, and why."""

    name: str
    kind: Literal["attention", "mlp"]
    reason: str


Site = AttentionSite | MlpSite
"""A converted site of either kind."""


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
                kind = "attention" if isinstance(s, AttentionSite) else "mlp"
                self.skipped.append(SkippedSite(s.name, kind, reasons[s.index]))
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
    for kind, part in forms.parts().items():
        old = {name: site.pop(name) for name in part.V2 if name in site}
        if any(value != part.V2[name][1] for name, value in old.items()):
            found[kind] = {part.V2[name][0]: value for name, value in old.items()}
    return {**site, "parts": found}


def _attention_site(a: dict[str, Any]) -> AttentionSite:
    """An AttentionSite from its dict: maps, streams and parts as objects again."""
    maps = UnitMap.from_dict
    unknown = sorted(set(a.get("parts", {})) - set(forms.parts()))
    if unknown:
        raise RecordError(
            f"the attention site {a.get('name')!r} takes the form {unknown[0]!r}, which this "
            f"dynconvert does not know (it knows {', '.join(sorted(forms.parts()))}); upgrade "
            "dynconvert (pip install -U dynconvert)"
        )
    return AttentionSite(
        **{
            **a,
            "in_maps": [maps(m) for m in a["in_maps"]],
            "out_map": maps(a["out_map"]),
            "more_out_maps": [maps(m) for m in a.get("more_out_maps", [])],
            "streams": [AttentionStream(**s) for s in a.get("streams", [])],
            "parts": {k: forms.parts()[k].from_dict(p) for k, p in a.get("parts", {}).items()},
        }
    )


def _v2_owner(name: str) -> type[AttentionPart] | None:
    """The part class that took over the version-2 site field ``name``, if any."""
    if name.startswith("_"):
        return None
    return next((p for p in forms.parts().values() if name in p.V2), None)
