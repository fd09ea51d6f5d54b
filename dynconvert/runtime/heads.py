"""Head-count attributes that read the calling thread's routing (timm ``num_heads``, diffusers
``heads``, ...).

An attention module reshapes q, k and v with its own head count. On a sliced call the routed
Linears return only the active heads' rows, so for that call the count must be the active one:
left as is, the reshape either fails or, when the sizes happen to divide, silently splits the
channels into wrong heads. The count cannot simply be lowered on the module for the call, as it
once was: a module is shared by every thread calling the model, and a thread running the full
model would read another thread's lowered count.

So the attribute becomes a property of the module's class (a subclass made once per class, with
the same name, so ``isinstance`` and class-name checks still hold): it reads the value the
module holds, except while an attention site routing it has a sliced decision in the calling
thread's current call (between its pre- and post-hook), where it reads
``active units x value per unit``. Assigning it sets the held value, as before.

Example:
    >>> import torch
    >>> from types import SimpleNamespace
    >>> class Attn(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.heads = 4
    >>> attn, rt = Attn(), SimpleNamespace(fast=None)
    >>> route_head_count(attn, "heads", rt, 1)
    >>> attn.heads, isinstance(attn, Attn), type(attn).__name__
    (4, True, 'Attn')
    >>> rt.fast = SimpleNamespace(key=(0, 2))  # a sliced call with two heads on, in this thread
    >>> attn.heads
    2
    >>> restore_head_counts(attn); type(attn) is Attn
    True
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dynconvert.runtime.compiled import eager_now, run_eagerly

ROUTES = "_dc_head_routes"
"""Instance attribute: {attribute name: [(attention runtime, value per unit), ...]}."""


class RoutedHeadCounts:
    """Mixin of a module whose head-count attributes read the calling thread's routing."""

    _dc_heads_base: type  # the module's class before (restore_head_counts puts it back)


_CLASSES: dict[type, type] = {}


def route_head_count(owner: nn.Module, name: str, runtime: Any, per: int) -> None:
    """Make ``owner.<name>`` read ``len(runtime.fast.key) * per`` while ``runtime`` (an
    attention runtime, whose ``fast`` is the calling thread's sliced decision or None) has one,
    and the value it holds otherwise."""
    cls = type(owner)
    if not issubclass(cls, RoutedHeadCounts):
        routed = _CLASSES.get(cls)
        if routed is None:
            attrs = {"_dc_heads_base": cls, "__module__": cls.__module__}
            routed = _CLASSES[cls] = type(cls.__name__, (RoutedHeadCounts, cls), attrs)
            routed.__qualname__ = cls.__qualname__
        owner.__class__ = routed
        cls = routed
    if not isinstance(cls.__dict__.get(name), _HeadCount):
        setattr(cls, name, _HeadCount(name))
    owner.__dict__.setdefault(ROUTES, {}).setdefault(name, []).append((runtime, per))


def restore_head_counts(owner: nn.Module) -> None:
    """Undo :func:`route_head_count` on ``owner`` (revert): its class and plain attributes."""
    if isinstance(owner, RoutedHeadCounts):
        owner.__class__ = type(owner)._dc_heads_base
    owner.__dict__.pop(ROUTES, None)


class _HeadCount:
    """The data descriptor of one head-count attribute (see the module docstring)."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, owner: Any, cls: type | None = None) -> Any:
        if owner is None:
            return self
        routes = owner.__dict__.get(ROUTES, {}).get(self.name, ())
        # A traced fast call reads the count eagerly: traced, the read is a guard on the site's
        # progress, and the int differs per site (compiled.py); out of it, an int dynamo makes
        # dynamic once a second site differs.
        if routes and eager_now(getattr(routes[0][0], "bank", None)):
            return run_eagerly(self.__get__, owner, cls)
        for runtime, per in routes:
            d = runtime.fast  # this thread's sliced decision at that site, or None
            if d is not None:
                return len(d.key) * per
        if self.name in owner.__dict__:
            return owner.__dict__[self.name]
        return getattr(super(type(owner), owner), self.name)  # a class-level value

    def __set__(self, owner: Any, value: Any) -> None:
        owner.__dict__[self.name] = value
