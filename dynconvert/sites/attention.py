"""The attention site: the core every attention call has (projections, heads, unit maps, token
counts, the streams of a joint attention) and the optional parts of the forms it takes (one
module per form in this folder, registered in ``dynconvert/sites/__init__.py``).

Its MACs are the core's count (Kaplan et al. 2020, table 1, with the attention matmuls made
explicit) plus each part's terms; ``flops.site_cost`` reads them.

Example:
    >>> from dynconvert.analysis import analyze
    >>> from dynconvert.testing import PATTERN_MODELS
    >>> site = analyze(*PATTERN_MODELS["gated-gqa"]()).attention[0]
    >>> sorted(site.parts), site.units, site.gate == site.parts["gate"].linear
    (['gate'], 2, True)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

from dynconvert.sites import AttentionPart, part_classes
from dynconvert.sites.units import UnitMap


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
    (``parts``: form name -> its part, one module per form in ``dynconvert/sites/``).

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
        """The part of :meth:`macs` no routing saves: projections computed in full (partial)."""
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
        (fewer with grouped-query attention); each part adds its own terms
        (``dynconvert/sites/<form>.py``).
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


def _v2_owner(name: str) -> type[AttentionPart] | None:
    """The part class that took over the version-2 site field ``name``, if any."""
    if name.startswith("_"):
        return None
    return next((p for p in part_classes().values() if name in p.V2), None)
