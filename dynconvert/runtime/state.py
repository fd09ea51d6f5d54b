"""The state of a converted model: whether a model is converted, and its RouterBank.

One source of truth for "is this model converted?": the bank sits on the model as the submodule
``dynconvert`` and a flag marks the conversion. Everything that reads a converted model's
state (routing, FLOPs, save, calibration, verification) imports this module, not ``convert``,
so that runtime modules never depend on the converter.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from dynconvert.errors import NotConvertedError
from dynconvert.plugins import load_plugins
from dynconvert.runtime.bank import RouterBank

ATTR = "dynconvert"
"""Name of the RouterBank submodule on a converted model (router weights live under it)."""
FLAG = "_dynconvert_converted"
"""Instance attribute set to True by convert and removed by revert."""
ATTACH_HOOKS: list[Callable[[nn.Module], None]] = []
"""Called with the model at the end of :func:`attach` (convert, load); pretrained.py registers
the diffusers integration here (save_pretrained keeps the routers)."""
DETACH_HOOKS: list[Callable[[nn.Module], None]] = []
"""Called with the model at the start of :func:`detach` (revert): undo what ATTACH_HOOKS did."""


def is_converted(model: nn.Module) -> bool:
    """True when ``model`` has been converted by dynconvert.

    Example:
        >>> import dynconvert
        >>> from dynconvert.testing import tiny_dit
        >>> is_converted(tiny_dit()), is_converted(dynconvert.convert(tiny_dit(), 0.5))
        (False, True)
    """
    return bool(getattr(model, FLAG, False)) and isinstance(getattr(model, ATTR, None), RouterBank)


def get_state(model: nn.Module) -> RouterBank:
    """The RouterBank of a converted model: plan, config, budget, routers and routing state.

    Example:
        >>> import dynconvert
        >>> from dynconvert.testing import tiny_dit
        >>> get_state(dynconvert.convert(tiny_dit(), 0.5)).budget
        0.5
    """
    if not is_converted(model):
        raise NotConvertedError(
            f"{type(model).__name__} is not converted; call dynconvert.convert(model, budget) first"
        )
    return getattr(model, ATTR)


def attach(model: nn.Module, bank: RouterBank) -> None:
    """Attach ``bank`` as the model's state (the last step of convert and load)."""
    model.add_module(ATTR, bank)
    setattr(model, FLAG, True)
    load_plugins()  # the built-in integrations register their hooks (diffusers' save_pretrained)
    for hook in ATTACH_HOOKS:
        hook(model)


def detach(model: nn.Module) -> None:
    """Remove the state attached by :func:`attach` (the last step of revert)."""
    for hook in DETACH_HOOKS:
        hook(model)
    del model._modules[ATTR]
    model.__dict__.pop(FLAG, None)
