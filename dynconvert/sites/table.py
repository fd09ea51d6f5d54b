"""Tables per head handed in: a tensor argument of the attention module that differs per head
(LTX-Video's rotary cos / sin tables over the whole width, (B, N, heads x d)). Removing a head
removes its positions of the table too: ``table_run.py`` cuts the argument on a sliced call.

Example:
    >>> from dynconvert.sites.units import UnitMap
    >>> rope = TableArg("[1]['rope'][0]", -1, UnitMap("[1]['rope'][0]", "rows", 2, [(0, 4, 4)]))
    >>> [m.linear for m in TableCut([rope]).head_maps()]
    ["[1]['rope'][0]"]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dynconvert.sites import AttentionPart, register_part
from dynconvert.sites.units import UnitMap


@dataclass
class TableArg:
    """A tensor argument of the attention module that differs per head (a rotary table over
    the whole width): the fast path cuts it along ``dim`` to the active heads' positions."""

    path: str  # where it is in the module's (args, kwargs), e.g. "[1]['image_rotary_emb'][0]"
    dim: int  # the axis cut (negative: counted from the end)
    map: UnitMap  # positions along ``dim`` of every unit (``map.linear`` is the path)


@register_part("table")
@dataclass
class TableCut(AttentionPart):
    """The per-head tables among the attention module's arguments."""

    args: list[TableArg]

    V2 = {"table_args": ("args", [])}

    def head_maps(self) -> list[UnitMap]:
        """Every table's positions per unit, keyed by its argument path."""
        return [t.map for t in self.args]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TableCut:
        """The part from its dict (tables and maps as objects again)."""
        return cls(
            [TableArg(t["path"], t["dim"], UnitMap.from_dict(t["map"])) for t in data["args"]]
        )
