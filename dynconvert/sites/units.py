"""Unit maps: which rows or columns of a Linear belong to each routed unit (a head, a key/value
head with its query heads, or an MLP channel group), the currency every site is written in.

Example:
    >>> UnitMap("mlp.fc1", "rows", units=4, parts=[(0, 32, 32)]).indices(2)[:3]
    [64, 65, 66]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


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
            >>> data = {"linear": "fc1", "axis": "rows", "units": 2, "parts": [[0, 4, 4]]}
            >>> UnitMap.from_dict(data)
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
