"""Typed checks of config fields: every value is checked against its annotation and its range.

Configs (``ConvertConfig``, ``CalibrationConfig``, the recipe sections) call :func:`check_fields`
first in ``__post_init__``, so a value of the wrong type never reaches the code that uses it: an
integer field takes ``5`` and refuses ``5.0``, ``"5"``, ``True`` and ``1e30``, and the message
gives the valid range. Integers are bounded (``INT_MAX`` unless a field says otherwise), floats
must be finite.

Example:
    >>> check_value("steps", 5, int, Range(1))
    >>> check_value("steps", 5.0, int, Range(1))
    Traceback (most recent call last):
    ...
    dynconvert.errors.ConfigError: steps must be an integer in [1, 2147483647]; got 5.0
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dynconvert.errors import ConfigError

INT_MAX = 2**31 - 1
"""Upper bound of an integer field unless it gives its own (counts, sizes, steps)."""

SEED_MAX = 2**32 - 1
"""Upper bound of a seed (numpy takes seeds below 2**32)."""


@dataclass(frozen=True)
class ParseLimits:
    """What a parsed file (a record, a recipe, ``run.json``) or a ``--set`` value may hold:
    checked by the readers before anything is built from it.

    Example:
        >>> ParseLimits().depth
        32
    """

    bytes: int = 1 << 20
    depth: int = 32
    nodes: int = 1_000_000
    string: int = 1 << 20
    int_digits: int = 40


RECORD_LIMITS = ParseLimits(bytes=64 << 20, nodes=500_000)
"""A record (``dynconvert.json``, ``run.json``, ``report.json``, config.json): 64 MiB and
500,000 values (a record's width masks hold at most 4 values per site and timestep change; a
million floats took 1.3 s of CPU to parse)."""

RECIPE_LIMITS = ParseLimits(bytes=16 << 10, nodes=2_000, string=16 << 10)
"""A recipe file or a ``--set`` item: 16 KiB and 2,000 values, YAML aliases counted at each
use (the shipped recipes are under 6 KiB and 200 values). YAML is parsed in Python (a 20 KB
list of 10,000 numbers took 5 s on a 2-core machine at load 21), so the limits keep the
slowest refusal short."""


@dataclass(frozen=True)
class Range:
    """The valid interval of a number field (``low_open``: ``low`` itself is excluded).

    Example:
        >>> Range(0, 1, low_open=True).describe()
        '(0, 1]'
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies in the interval."""
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def describe(self, integer: bool = False) -> str:
        """The interval as text, e.g. ``[1, 2147483647]`` or ``(0, inf)``."""
        low = self.low if self.low is not None else (-INT_MAX - 1 if integer else "-inf")
        high = self.high if self.high is not None else (INT_MAX if integer else "inf")
        left = "(" if self.low_open or self.low is None and not integer else "["
        right = ")" if self.high_open or self.high is None and not integer else "]"
        return f"{left}{_num(low)}, {_num(high)}{right}"


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _int_range(bounds: Range | None) -> Range:
    """An integer field's range: its own, with ``[-2**31, INT_MAX]`` where it gives no bound."""
    b = bounds or Range()
    return Range(
        -INT_MAX - 1 if b.low is None else b.low,
        INT_MAX if b.high is None else b.high,
        b.low_open,
        b.high_open,
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_float(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _describe(kind: Any, bounds: Range | None) -> str:
    """What a value of type ``kind`` must be, in words."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return "any value"
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a, bounds) for a in args if a is not type(None)]
        tail = " or null" if type(None) in args else ""
        return " or ".join(parts) + tail
    if kind is bool:
        return "true or false"
    if kind is int:
        return f"an integer in {_int_range(bounds).describe(integer=True)}"
    if kind is float:
        return "a finite number" if bounds is None else f"a number in {bounds.describe()}"
    if kind is str:
        return "a string"
    if origin is tuple:
        where = f" in {bounds.describe()}" if bounds is not None else ""
        return (
            f"a list of {len(args)} numbers{where}"
            if args and args[-1] is not Ellipsis
            else "a list"
        )
    if origin is list:
        inner = _describe(args[0], bounds) if args else "values"
        return f"a list (each item {inner})"
    if origin is dict or kind is dict:
        inner = (
            f" (each value {_describe(args[1], None)})"
            if len(args) == 2 and args[1] is not Any
            else ""
        )
        return f"a mapping{inner}"
    if origin is Callable or kind is Callable:
        return "a callable"
    return getattr(kind, "__name__", str(kind))


def _fits(value: Any, kind: Any, bounds: Range | None) -> bool:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(value is None if a is type(None) else _fits(value, a, bounds) for a in args)
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return _is_int(value) and _int_range(bounds).contains(value)
    if kind is float:
        return _is_float(value) and (bounds is None or bounds.contains(value))
    if kind is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        if args and args[-1] is Ellipsis:
            return all(_fits(v, args[0], bounds) for v in value)
        return len(value) == len(args) and all(_fits(v, a, bounds) for v, a in zip(value, args))
    if origin is list:
        return isinstance(value, list) and (
            not args or all(_fits(v, args[0], bounds) for v in value)
        )
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            return False
        if len(args) == 2:
            return all(
                _fits(k, args[0], None) and _fits(v, args[1], None) for k, v in value.items()
            )
        return True
    if origin is Callable or kind is Callable:
        return callable(value)
    return isinstance(value, kind) if isinstance(kind, type) else True


class _Short(reprlib.Repr):
    """A repr cut while it is built: a few items, levels and characters of each part."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother, self.maxlong = 3, 60, 60, 40
        self.maxdict = self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = 4

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:  # repr itself would cost (or refuse) thousands of digits
            return f"<an integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)

    def repr_bytes(self, x: bytes, level: int) -> str:
        return repr(x[: self.maxstring]) + ("..." if len(x) > self.maxstring else "")

    repr_bytearray = repr_bytes


_SHORT = _Short()


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` for a message, at most ``limit`` characters, cut before it is built (a
    100 MB string, a 5000-digit integer or a deeply shared YAML structure cost nothing).

    Example:
        >>> len(shown("x" * 10**8)), shown(10**5000)
        (60, '<an integer of 16610 bits>')
    """
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_value(name: str, value: Any, kind: Any, bounds: Range | None = None) -> None:
    """Refuse ``value`` unless it is of type ``kind`` (an annotation) and within ``bounds``.

    Args:
        name: The field's name as the user writes it (``calibration.steps``).
        value: The value given.
        kind: A type or annotation: ``int``, ``float``, ``bool``, ``str``, ``X | None``,
            ``list[int]``, ``tuple[float, float]``, ``dict[str, str]``, ``Callable``, ``Any``.
        bounds: The valid interval of a number (or of each number of a list or tuple).

    Raises:
        ConfigError: ``"<name> must be <what>; got <value>"``, with the valid range.

    Example:
        >>> check_value("tau", 2, float, Range(0, low_open=True))
    """
    if not _fits(value, kind, bounds):
        raise ConfigError(f"{name} must be {_describe(kind, bounds)}; got {shown(value)}")


def check_fields(obj: Any, ranges: Mapping[str, Range] | None = None, prefix: str = "") -> None:
    """Check every field of a dataclass instance against its annotation (and its range).

    Args:
        obj: The dataclass instance (its class's annotations are resolved).
        ranges: Field name -> :class:`Range` for number fields; an integer field without one
            must lie in ``[-2**31, INT_MAX]``.
        prefix: Put before each name in messages (``"calibration."``).

    Raises:
        ConfigError: The first field whose value does not fit.

    Example:
        >>> @dataclass
        ... class Cfg:
        ...     steps: int = 1
        >>> check_fields(Cfg(steps=3), {"steps": Range(1)})
    """
    hints = typing.get_type_hints(type(obj))
    ranges = ranges or {}
    for f in dataclasses.fields(obj):
        if f.init:
            check_value(prefix + f.name, getattr(obj, f.name), hints[f.name], ranges.get(f.name))
