"""Site data, and the seam for attention forms: one module per form, registered once.

``units.py`` holds the unit maps every site is written in, ``attention.py`` the attention
site's core (projections, heads, unit maps, token counts, the streams of a joint attention; the
MLP site is still in ``plan.py``). An attention site also carries a dict of optional parts, one
per form the call takes: a gate on the output, keys and values compressed before the attention,
linear (kernel) attention, a norm across all heads cut after it (a partial site), tables per
head handed in as arguments. Each form lives in this folder, in modules named after it, one per
stage (``tests/test_imports.py`` places them in those layers):

- ``<form>.py`` (plan data): its part, a small dataclass registered with :func:`register_part`,
  with its MACs terms (the methods of :class:`AttentionPart`), the maps the fast path cuts with
  the heads, and the plan-version-2 fields it replaces (the migration and the old attribute
  names read them);
- ``<form>_find.py`` (analysis): its rule, registered with :func:`register_finder`: from what the
  core found about one attention call, the part (or None), raising ``ChainError`` with the
  reason when the form is there but cannot be converted;
- ``<form>_run.py`` (runtime), where it needs one: its hooks, registered with
  :func:`register_runtime` (more module hooks when convert attaches the site, a change to the
  attention module's arguments on a sliced call).

The core calls the registered terms and hooks instead of branching on fields; the modules of a
stage are imported (and so registered) by :func:`load`, so adding a form adds its modules and
its tests, nothing else. ``docs/site-kinds.md`` walks through one.

Example:
    >>> from dynconvert.sites import part_classes
    >>> sorted(part_classes())
    ['fused_in', 'gate', 'kv_compression', 'linear', 'partial', 'table']
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

STAGES = {"part": "", "find": "_find", "run": "_run"}
"""Stage -> the suffix of its modules' names (``gate.py``, ``gate_find.py``, ``gate_run.py``)."""
CORE = ("attention", "units")
"""Modules of this folder that are not forms."""

PARTS: dict[str, type[AttentionPart]] = {}
"""Form name -> its part class (filled as the ``<form>.py`` modules are imported)."""
FINDERS: dict[str, Callable[[Any], Any]] = {}
"""Form name -> its analysis rule (``<form>_find.py``)."""
RUNTIMES: dict[str, PartRuntime] = {}
"""Form name -> its runtime hooks (``<form>_run.py``)."""

_LOADED: set[str] = set()


class AttentionPart:
    """One optional part of an attention site: plain data, and its share of the site's cost.

    The defaults add nothing; a form overrides the terms it changes. ``site`` is the
    :class:`~dynconvert.plan.AttentionSite` the part belongs to, ``seen`` the tokens per row each
    Linear ran on in a call (missing ones: the plan's counts).
    """

    kind: ClassVar[str] = ""  # the form's name, set by register_part
    # Plan version 2 kept every form in flat fields of the site: old name -> (field of this
    # part, value meaning "not this form"). The migration and the old attribute names read it.
    V2: ClassVar[dict[str, tuple[str, Any]]] = {}

    def added_macs(self, site: Any, seen: dict[str, int]) -> int:
        """MACs per row this part adds to the projections and the attention (routed with it)."""
        return 0

    def keys_seen(self, keys: int) -> int:
        """Keys the attention sees, from the tokens a stream's key projection ran on."""
        return keys

    def attention_macs(self, site: Any, queries: int, keys: int) -> int | None:
        """MACs per row of the attention itself (None: softmax attention, QK^T plus AV)."""
        return None

    def fixed_macs(self, site: Any, seen: dict[str, int]) -> int:
        """MACs per row of the site that no routing saves (computed at full width)."""
        return 0

    def head_maps(self) -> list[Any]:
        """More UnitMaps the fast path cuts with the heads (keyed by their ``linear`` name)."""
        return []

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttentionPart:
        """Inverse of ``dataclasses.asdict`` (override where a field holds more dataclasses)."""
        return cls(**data)


class PartRuntime:
    """The runtime hooks of one form (``<form>_run.py``); the defaults do nothing.

    ``rt`` is the site's ``AttentionRuntime`` (``rt.fast``: the decision of the call running
    now, None on the masked or full path), ``part`` the site's part of this form.
    """

    def attach(self, rt: Any, part: Any, modules: dict[str, Any]) -> list[Any]:
        """Hooks on the model's modules (by fqn) at convert; returns their handles."""
        return []

    def arguments(
        self, rt: Any, part: Any, args: tuple, kwargs: dict, decision: Any
    ) -> tuple[tuple, dict] | None:
        """The attention module's arguments for a sliced call (None: unchanged)."""
        return None


P = TypeVar("P", bound=type[AttentionPart])


def register_part(kind: str) -> Callable[[P], P]:
    """Class decorator: the part of form ``kind`` (its key in ``AttentionSite.parts``).

    Example:
        >>> from dataclasses import dataclass
        >>> @register_part("doc_example")
        ... @dataclass
        ... class Doubled(AttentionPart):
        ...     def attention_macs(self, site, queries, keys):
        ...         return 2 * queries * keys
        >>> PARTS.pop("doc_example").kind
        'doc_example'
    """

    def add(cls: P) -> P:
        if kind in PARTS and PARTS[kind] is not cls:
            raise ValueError(f"two parts registered for the attention form {kind!r}")
        cls.kind = kind
        PARTS[kind] = cls
        return cls

    return add


def register_finder(kind: str) -> Callable[[Callable], Callable]:
    """Decorator: the analysis rule of form ``kind`` (``find(evidence) -> Finding | None``)."""

    def add(fn: Callable) -> Callable:
        FINDERS[kind] = fn
        return fn

    return add


def register_runtime(kind: str) -> Callable[[type[PartRuntime]], type[PartRuntime]]:
    """Class decorator: the runtime hooks of form ``kind`` (an instance is registered)."""

    def add(cls: type[PartRuntime]) -> type[PartRuntime]:
        RUNTIMES[kind] = cls()
        return cls

    return add


def load(stage: str) -> None:
    """Import every form module of ``stage`` ("part", "find" or "run") once, in name order:
    importing registers it. A stage's caller sits at that stage's layer or above."""
    if stage in _LOADED:
        return
    suffix = STAGES[stage]
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in CORE:
            continue
        form = info.name[: -len(suffix)] if suffix else info.name
        if suffix and not info.name.endswith(suffix):
            continue
        if not suffix and any(info.name.endswith(s) for s in STAGES.values() if s):
            continue
        if stage != "part":
            load("part")
            if form not in PARTS:
                raise ValueError(f"sites/{info.name}.py has no part: add sites/{form}.py")
        importlib.import_module(f"{__name__}.{info.name}")
    _LOADED.add(stage)


def part_classes() -> dict[str, type[AttentionPart]]:
    """Every registered part class by form name.

    Example:
        >>> "gate" in part_classes()
        True
    """
    load("part")
    return PARTS
