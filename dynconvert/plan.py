"""The plan: what analysis found in a model, and what convert will change.

A plan is plain data (dataclasses of ints, strings and lists) so that it can be printed by
`dynconvert inspect`, stored in the JSON record beside the weights, and replayed by `load`
without tracing the model again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

PLAN_VERSION = 1


@dataclass
class UnitMap:
    """Which rows (or columns) of one Linear belong to each unit (a head or a channel group).

    Unit ``u`` owns, for every part ``(base, stride, size)``, the indices
    ``base + u * stride ... base + u * stride + size - 1``. A fused qkv projection has three
    parts (q, k and v rows of the same head); a gated MLP input has two (value and gate halves).
    ``explicit`` replaces the parts when the layout is not regular: ``explicit[p][u]`` lists
    the indices of unit ``u`` in part ``p``.
    """

    linear: str
    axis: Literal["rows", "cols"]
    units: int
    parts: list[tuple[int, int, int]] = field(default_factory=list)
    explicit: list[list[list[int]]] | None = None

    def indices(self, unit: int) -> list[int]:
        """Indices of one unit, in increasing order of part then offset."""
        if self.explicit is not None:
            return [i for part in self.explicit for i in part[unit]]
        out: list[int] = []
        for base, stride, size in self.parts:
            start = base + unit * stride
            out.extend(range(start, start + size))
        return out

    def index_tensor(self, units: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """Indices of the given units (all units when None), ordered by part, then unit."""
        chosen = range(self.units) if units is None else [int(u) for u in units]
        if self.explicit is not None:
            idx = [i for part in self.explicit for u in chosen for i in part[u]]
        else:
            idx = []
            for base, stride, size in self.parts:
                for u in chosen:
                    start = base + u * stride
                    idx.extend(range(start, start + size))
        return torch.tensor(idx, dtype=torch.long)

    @property
    def per_unit(self) -> int:
        """How many indices each unit owns."""
        if self.explicit is not None:
            return sum(len(part[0]) for part in self.explicit)
        return sum(size for _, _, size in self.parts)


@dataclass
class AttentionSite:
    """One attention call: its projections, heads and cost."""

    name: str
    block: str
    module_class: str
    kind: Literal["self", "cross"]
    heads: int
    head_dim: int
    v_head_dim: int
    q: str
    k: str
    v: str
    out: str
    q_in: int
    kv_in: int
    out_features: int
    tokens_q: int
    tokens_kv: int
    in_maps: list[UnitMap]
    out_map: UnitMap
    head_attrs: dict[str, int] = field(default_factory=dict)
    fast: bool = True
    fast_reason: str = ""
    index: int = -1

    @property
    def units(self) -> int:
        return self.heads

    def macs(self, tokens_q: int | None = None, tokens_kv: int | None = None) -> int:
        """Multiply-accumulates of this site for one sample (projections + QK^T + AV).

        Source: the standard transformer count (Kaplan et al. 2020, table 1), with the
        attention matmuls made explicit: QK^T is N*M*H*d_qk and AV is N*M*H*d_v.
        """
        n = self.tokens_q if tokens_q is None else tokens_q
        m = self.tokens_kv if tokens_kv is None else tokens_kv
        h, dq, dv = self.heads, self.head_dim, self.v_head_dim
        q = n * self.q_in * h * dq
        kv = m * self.kv_in * h * (dq + dv)
        scores = n * m * h * dq
        mix = n * m * h * dv
        out = n * h * dv * self.out_features
        return q + kv + scores + mix + out


@dataclass
class MlpSite:
    """One MLP: input projection(s), output projection, channel groups and cost."""

    name: str
    block: str
    module_class: str
    fc1: list[str]
    fc2: str
    in_features: int
    hidden: int
    out_features: int
    gated: bool
    groups: int
    tokens: int
    in_maps: list[UnitMap]
    out_map: UnitMap
    width: bool = True
    width_reason: str = ""
    token: bool = True
    token_reason: str = ""
    token_dims: int = 2
    fast: bool = True
    fast_reason: str = ""
    index: int = -1

    @property
    def units(self) -> int:
        return self.groups if self.width else 1

    @property
    def fc1_out(self) -> int:
        return self.hidden * 2 if self.gated else self.hidden

    def macs(self, tokens: int | None = None) -> int:
        """Multiply-accumulates of this MLP for one sample: N*D*F1 + N*F*D_out."""
        n = self.tokens if tokens is None else tokens
        return n * self.in_features * self.fc1_out + n * self.hidden * self.out_features

    def router_macs(self, tokens: int | None = None, reduction: int = 16) -> int:
        """MACs of this site's token router (D -> D/r -> 1) for one sample."""
        if not self.token:
            return 0
        n = self.tokens if tokens is None else tokens
        r = max(1, self.in_features // reduction)
        return n * (self.in_features * r + r)


@dataclass
class SkippedSite:
    """A candidate site that was not converted, and why."""

    name: str
    kind: Literal["attention", "mlp"]
    reason: str


Site = AttentionSite | MlpSite


@dataclass
class Plan:
    """Everything analysis found: sites to convert, sites skipped and the model's cost."""

    model_class: str
    timestep_arg: str
    capture: str
    coverage: str
    batch: int
    input_shapes: dict[str, list[int]]
    attention: list[AttentionSite]
    mlp: list[MlpSite]
    skipped: list[SkippedSite]
    static_macs: int
    other_macs: int
    version: int = PLAN_VERSION

    @property
    def sites(self) -> list[Site]:
        """All converted sites in execution order (their ``index``)."""
        return sorted([*self.attention, *self.mlp], key=lambda s: s.index)

    @property
    def blocks(self) -> list[str]:
        seen: dict[str, None] = {}
        for s in self.sites:
            seen.setdefault(s.block, None)
        return list(seen)

    @property
    def static_macs_per_sample(self) -> int:
        return self.static_macs // max(self.batch, 1)

    @property
    def blocks_macs_per_sample(self) -> int:
        """MACs of the converted attention and MLP sites (the paper's "blocks only")."""
        total = 0
        for s in self.sites:
            total += s.macs()
        return total

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Inverse of :meth:`to_dict`."""
        d = dict(data)

        def maps(items: list[dict]) -> list[UnitMap]:
            return [_unit_map(m) for m in items]

        d["attention"] = [
            AttentionSite(**{**a, "in_maps": maps(a["in_maps"]), "out_map": _unit_map(a["out_map"])})
            for a in d["attention"]
        ]
        d["mlp"] = [
            MlpSite(**{**m, "in_maps": maps(m["in_maps"]), "out_map": _unit_map(m["out_map"])})
            for m in d["mlp"]
        ]
        d["skipped"] = [SkippedSite(**s) for s in d["skipped"]]
        return cls(**d)


def _unit_map(d: dict[str, Any]) -> UnitMap:
    return UnitMap(
        linear=d["linear"],
        axis=d["axis"],
        units=d["units"],
        parts=[tuple(p) for p in d.get("parts", [])],
        explicit=d.get("explicit"),
    )
