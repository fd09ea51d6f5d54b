"""What a forward call of a converted model runs with, and ``with routing(...)`` per thread.

:class:`RoutingSettings` is resolved once, when a call begins (:func:`settings_of`): the
innermost ``with dynconvert.routing(...)`` override active in the calling context, else the
model's defaults, which ``set_routing`` sets for every caller. The overrides live in a context
variable, so a ``with routing(...)`` applies to the thread (and the asyncio task) that entered
it and to no other. The FLOPs budget of a budget-conditioned model (``set_budget``,
``with budget(...)``) is one more field of :class:`RoutingSettings`, resolved in the same place.

Example:
    >>> import torch
    >>> bank = torch.nn.Module()
    >>> defaults = RoutingSettings("eval")
    >>> token = push_override(bank, RoutingSettings("full"))
    >>> settings_of(bank, defaults).mode
    'full'
    >>> pop_override(token)
    >>> settings_of(bank, defaults).mode
    'eval'
"""

from __future__ import annotations

import weakref
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from dynconvert.runtime.modes import ExecutionMode


class RoutingSettings(NamedTuple):
    """What a forward call runs with (resolved when it begins).

    Attributes:
        mode: "train", "eval" or "full"; None follows ``model.training``.
        execution: the evaluation execution mode; None: the model's default.
        budget: the FLOPs budget of a budget-conditioned model's calls; None: the model's.
        inherit: the mode comes from the enclosing override (or the model's defaults): an
            override that sets a budget alone (``with budget(...)``) leaves the mode alone.
    """

    mode: str | None = None
    execution: ExecutionMode | None = None
    budget: float | None = None
    inherit: bool = False


# id(bank) -> (a weak reference to the bank, the override). Never mutated: every change makes a
# new dict, so a copied context (an asyncio task, asyncio.to_thread) keeps its own.
_OVERRIDES: ContextVar[dict[int, tuple[Any, RoutingSettings]] | None] = ContextVar(
    "dynconvert_routing", default=None
)


def override_of(bank: object) -> RoutingSettings | None:
    """The innermost ``with routing(...)`` override of ``bank`` in this context, or None.

    Example:
        >>> override_of(object()) is None
        True
    """
    found = (_OVERRIDES.get() or {}).get(id(bank))
    if found is None or found[0]() is not bank:  # none, or a dead bank's id reused
        return None
    return found[1]


def push_override(bank: object, settings: RoutingSettings) -> Token:
    """Make ``settings`` this context's override of ``bank`` until :func:`pop_override`; an
    execution or a budget of None keeps the enclosing override's, and so does ``inherit``
    for the mode.

    Example:
        >>> import torch
        >>> bank = torch.nn.Module()
        >>> token = push_override(bank, RoutingSettings("full"))
        >>> override_of(bank).mode
        'full'
        >>> pop_override(token); override_of(bank) is None
        True
    """
    outer = override_of(bank)
    if outer is not None:
        if settings.execution is None:
            settings = settings._replace(execution=outer.execution)
        if settings.budget is None:
            settings = settings._replace(budget=outer.budget)
        if settings.inherit:
            settings = settings._replace(mode=outer.mode, inherit=outer.inherit)
    current = _OVERRIDES.get() or {}
    live = {k: v for k, v in current.items() if v[0]() is not None}  # drop dead banks' entries
    live[id(bank)] = (weakref.ref(bank), settings)
    return _OVERRIDES.set(live)


def pop_override(token: Token) -> None:
    """Undo :func:`push_override` (the enclosing override, or none, applies again)."""
    _OVERRIDES.reset(token)


def settings_of(bank: object, defaults: RoutingSettings) -> RoutingSettings:
    """What a call of ``bank``'s model begun now in this context runs with: the innermost
    ``with routing(...)`` override, else the model's ``defaults`` (``set_routing``,
    ``set_budget``); what an override leaves unset (execution, budget, an inherited mode)
    comes from the defaults.

    Example:
        >>> from dynconvert.runtime.modes import execution_mode
        >>> settings_of(object(), RoutingSettings("eval", execution_mode("fast"))).mode
        'eval'
    """
    over = override_of(bank)
    if over is None:
        return defaults
    return RoutingSettings(
        defaults.mode if over.inherit else over.mode,
        over.execution or defaults.execution,
        defaults.budget if over.budget is None else over.budget,
    )
