"""The plan: what analysis found in a model, and what convert will change.

A plan is plain data (dataclasses of ints, strings and lists) so that it can be printed by
`dynconvert inspect`, stored in the JSON record beside the weights, and replayed by `load`
without tracing the model again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

PLAN_VERSION = 2
"""Format version of ``Plan.to_dict``, stored in the saved record (1: before joint attention
streams and kept columns; its plans load unchanged, the new fields take their defaults)."""


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
class TableArg:
    """A tensor argument of the attention module that differs per head (a rotary table over
    the whole width): the fast path cuts it along ``dim`` to the active heads' positions."""

    path: str  # where it is in the module's (args, kwargs), e.g. "[1]['image_rotary_emb'][0]"
    dim: int  # the axis cut (negative: counted from the end)
    map: UnitMap  # positions along ``dim`` of every unit (``map.linear`` is the path)


@dataclass
class AttentionSite:
    """One attention call: its projections, heads and cost."""

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
    # A partial site: a norm across all heads (qk-norm over the whole width) stops the Linears
    # of ``unsliced`` from being sliced: they and the norm run in full, then the norm module's
    # output is cut to the active heads (``cut_maps``, keyed by the module's fqn). Saved: the
    # attention matmuls, the other projections and the out-projection of the inactive heads.
    cut_maps: list[UnitMap] = field(default_factory=list)
    unsliced: list[str] = field(default_factory=list)
    kv_heads: int = 0  # key/value heads when fewer (grouped-query attention; 0: as many as heads)
    # Gated attention: a Linear of gate_in -> gate_rows whose output (through elementwise ops)
    # scales the attention output per channel or per head; its rows are sliced with their head.
    gate: str = ""
    gate_in: int = 0
    gate_rows: int = 0
    # Linear (kernel) attention: its two per-head products cost linear_macs per row at the
    # example tokens, in proportion to query + key tokens (not N x M as softmax attention).
    linear_macs: int = 0
    # Key/value compression (PixArt-Sigma): keys and values are downsampled between their
    # projections and the attention, which sees 1 / kv_stride of the tokens the k and v
    # projections ran on (``tokens_kv`` counts the projections' tokens).
    kv_stride: int = 1
    table_args: list[TableArg] = field(default_factory=list)  # per-head tables handed in
    v_in: int = 0  # input features of the v projection when they differ from k's (0: kv_in)

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
        if not self.unsliced:
            return 0
        seen = seen or {}
        h, hk, dq = self.heads, self.units, self.head_dim
        total = 0
        for s in [self._first_stream(), *self.streams]:
            if s.q in self.unsliced:
                total += seen.get(s.q, s.tokens_q) * s.q_in * h * dq
            m = seen.get(s.k, s.tokens_kv)
            if s.k in self.unsliced:  # a fused key/value projection holds the value rows too
                total += m * s.kv_in * hk * (dq + (self.v_head_dim if s.v == s.k else 0))
            if s.v in self.unsliced and s.v != s.k:  # cut after key/value compression
                total += seen.get(s.v, m) * (s.v_in or s.kv_in) * hk * self.v_head_dim
        return total * (self.fold if fold is None else fold)

    def _first_stream(self) -> AttentionStream:
        return AttentionStream(
            self.q, self.k, self.v, self.out, self.q_in, self.kv_in, self.out_features,
            self.tokens_q, self.tokens_kv, self.v_in,
        )  # fmt: skip

    @property
    def out_maps(self) -> list[UnitMap]:
        """Columns per head of every out-projection (one per stream that has one)."""
        return [self.out_map, *self.more_out_maps]

    def maps(self) -> list[UnitMap]:
        """Every UnitMap of the site: input rows, then out-projection columns."""
        return [*self.in_maps, *self.out_maps]

    def macs(self, seen: dict[str, int] | None = None, fold: int | None = None) -> int:
        """Multiply-accumulates of this site for one sample (projections + QK^T + AV).

        ``seen`` maps a Linear of the site to the tokens per row it ran on in a call (the
        plan's token counts otherwise), ``fold`` the rows per sample (see ``fold``). Source: the standard transformer count (Kaplan et al.
        2020, table 1), with the attention matmuls made explicit: QK^T is N*M*H*d_qk and AV is
        N*M*H*d_v, N and M summed over the streams of a joint attention (M: the keys the attention
        sees, the k projection's tokens / ``kv_stride``). The k and v
        projections have ``units`` heads (fewer with grouped-query attention).
        """
        seen = seen or {}
        h, hk, dq, dv = self.heads, self.units, self.head_dim, self.v_head_dim
        total, n_all, m_all = 0, 0, 0
        first = self._first_stream()
        for s in [first, *self.streams]:
            n = seen.get(s.q, s.tokens_q) if s.q else 0
            m = seen.get(s.k, s.tokens_kv) if s.k else 0
            total += n * s.q_in * h * dq + m * hk * (s.kv_in * dq + (s.v_in or s.kv_in) * dv)
            if s.out:
                total += seen.get(s.out, n) * h * dv * s.out_features
            if s is first and self.gate:  # the gate reads the query stream's tokens
                total += seen.get(self.gate, n) * self.gate_in * self.gate_rows
            n_all, m_all = n_all + n, m_all + m // self.kv_stride
        if self.linear_macs:  # (v @ k) @ q per head: proportional to N + M
            seen_all = sum(s.tokens_q + s.tokens_kv for s in [first, *self.streams])
            total += self.linear_macs * (n_all + m_all) // max(1, seen_all)
        else:
            total += n_all * m_all * h * (dq + dv)
        return total * (self.fold if fold is None else fold)


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
        d = dict(data)

        def maps(items: list[dict]) -> list[UnitMap]:
            return [_unit_map(m) for m in items]

        d["attention"] = [
            AttentionSite(
                **{
                    **a,
                    "in_maps": maps(a["in_maps"]),
                    "out_map": _unit_map(a["out_map"]),
                    "more_out_maps": maps(a.get("more_out_maps", [])),
                    "streams": [AttentionStream(**s) for s in a.get("streams", [])],
                    "cut_maps": maps(a.get("cut_maps", [])),
                    "table_args": [
                        TableArg(t["path"], t["dim"], _unit_map(t["map"]))
                        for t in a.get("table_args", [])
                    ],
                }
            )
            for a in d["attention"]
        ]
        d["mlp"] = [
            MlpSite(
                **{
                    **m,
                    "in_maps": maps(m["in_maps"]),
                    "out_map": _unit_map(m["out_map"]),
                    "mid_maps": maps(m.get("mid_maps", [])),
                }
            )  # fmt: skip
            for m in d["mlp"]
        ]
        d["skipped"] = [SkippedSite(**s) for s in d["skipped"]]
        return cls(**d)


def _unit_map(d: dict[str, Any]) -> UnitMap:
    """A UnitMap from its dict (parts as tuples again)."""
    return UnitMap(
        linear=d["linear"],
        axis=d["axis"],
        units=d["units"],
        parts=[tuple(p) for p in d.get("parts", [])],
        explicit=d.get("explicit"),
        keep=list(d.get("keep", [])),
    )
