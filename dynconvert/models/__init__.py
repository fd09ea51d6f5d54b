"""Reference diffusion transformers (DiT, U-ViT) with the official state-dict layouts, by name.

Example:
    >>> from dynconvert.models import build_model, list_presets
    >>> model = build_model("dit-tiny")
    >>> out = model(*model.example_inputs(batch_size=2))
    >>> "DiT-XL/2" in list_presets()
    True
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Callable

import torch.nn as nn

from dynconvert.errors import ConfigError, ModelNotFoundError
from dynconvert.models.dit import DIT_PRESETS, DiT
from dynconvert.models.loading import load_checkpoint
from dynconvert.models.uvit import UVIT_PRESETS, UViT
from dynconvert.plugins import Registry

__all__ = [
    "ALIASES",
    "PRESETS",
    "DiT",
    "UViT",
    "build_from_checkpoint",
    "build_model",
    "list_presets",
    "load_checkpoint",
    "register_preset",
    "resolve_name",
]

PRESETS: dict[str, Callable[..., nn.Module]] = Registry({**DIT_PRESETS, **UVIT_PRESETS})
"""Canonical preset name -> factory taking keyword overrides and returning a fresh model.

Other packages add theirs with :func:`register_preset` (the digits demo adds ``digits``)."""

ALIASES: dict[str, str] = {
    "dit-s": "DiT-S/2",
    "dit-b": "DiT-B/2",
    "dit-l": "DiT-L/2",
    "dit-xl": "DiT-XL/2",
    "uvit-l": "U-ViT-L/2",
    "uvit-h": "U-ViT-H/2",
    "U-ViT-H/4": "U-ViT-H/4-512",
}
"""Short name -> canonical preset name."""


def _lookup_table() -> dict[str, str]:
    """Lower-cased preset and alias names -> canonical preset name."""
    table = {name.lower(): name for name in PRESETS}
    table.update({alias.lower(): target for alias, target in ALIASES.items()})
    return table


def list_presets() -> list[str]:
    """List the canonical preset names (aliases not included), in registration order.

    Returns:
        The names ``build_model`` accepts, besides the aliases in ``ALIASES``.

    Example:
        >>> from dynconvert.models import list_presets
        >>> [name for name in list_presets() if name.startswith("DiT-XL")][:2]
        ['DiT-XL/2', 'DiT-XL/2-512']
    """
    return list(PRESETS)


def resolve_name(name: str) -> str:
    """Turn a preset name or alias, in any letter case, into its canonical preset name.

    Args:
        name: A preset name such as ``"DiT-XL/2"`` or an alias such as ``"dit-xl"``.

    Returns:
        The canonical name, a key of ``PRESETS``.

    Raises:
        ModelNotFoundError: The name is unknown; the message lists close matches.

    Example:
        >>> from dynconvert.models import resolve_name
        >>> resolve_name("DIT-XL")
        'DiT-XL/2'
    """
    table = _lookup_table()
    key = name.strip().lower()
    if key in table:
        return table[key]
    close = difflib.get_close_matches(key, list(table), n=6, cutoff=0.6)
    close += [k for k in table if key and key in k and k not in close]
    suggestions = list(dict.fromkeys(_display(k) for k in close))
    hint = f" Did you mean: {', '.join(suggestions[:8])}?" if suggestions else ""
    raise ModelNotFoundError(
        f"Unknown model preset {name!r}.{hint} dynconvert.models.list_presets() lists all presets."
    )


def _display(lowered: str) -> str:
    """The spelling under which a lower-cased table key was registered."""
    for name in list(PRESETS) + list(ALIASES):
        if name.lower() == lowered:
            return name
    return lowered


def _check_overrides(name: str, factory: Callable[..., nn.Module], overrides: dict) -> None:
    """Reject override keys the preset's model class does not take, listing the valid ones."""
    model_cls = getattr(factory, "model_cls", None)
    if model_cls is None or not overrides:
        return
    params = inspect.signature(model_cls.__init__).parameters
    valid = [p for p in params if p != "self"]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ConfigError(
            f"Unknown option(s) {', '.join(unknown)} for preset {name!r} "
            f"({model_cls.__name__}); valid options: {', '.join(valid)}."
        )


def build_model(name: str, **overrides) -> nn.Module:
    """Build a model from a preset name, with random weights.

    The model records where it came from in ``model.preset`` (the canonical name) and
    ``model.preset_kwargs`` (the overrides), and offers ``model.example_inputs()``.

    Args:
        name: A preset name or alias, in any letter case (see ``list_presets()`` and ``ALIASES``).
        **overrides: Constructor arguments that replace the preset's, e.g. ``num_classes=10``.

    Returns:
        A freshly built ``nn.Module`` on the default device, in training mode.

    Raises:
        ModelNotFoundError: Unknown name; the message lists close matches.
        ConfigError: An override the model class does not take; the message lists the valid ones.

    Example:
        >>> from dynconvert.models import build_model
        >>> model = build_model("dit-tiny", depth=1)
        >>> model.preset, model.preset_kwargs
        ('dit-tiny', {'depth': 1})
    """
    canonical = resolve_name(name)
    factory = PRESETS[canonical]
    _check_overrides(canonical, factory, overrides)
    model = factory(**overrides)
    model.preset = canonical
    model.preset_kwargs = dict(overrides)
    return model


def register_preset(
    name: str,
    factory: Callable[..., nn.Module],
    *,
    aliases: tuple[str, ...] = (),
    overwrite: bool = False,
) -> None:
    """Make a model factory available to ``build_model`` under ``name`` (and ``aliases``).

    The factory takes keyword overrides and returns a fresh model. Give it a ``model_cls``
    attribute to have ``build_model`` check override names against that class's constructor.

    Args:
        name: The canonical name; matching is case-insensitive.
        factory: A callable ``factory(**overrides) -> nn.Module``.
        aliases: Other names that resolve to ``name``.
        overwrite: Replace an existing preset or alias of the same name instead of raising.

    Raises:
        ConfigError: The name or an alias is taken (and ``overwrite`` is False), or ``factory`` is
            not callable.

    Example:
        >>> from dynconvert.models import build_model, register_preset
        >>> from dynconvert.models.dit import DiT
        >>> register_preset("dit-one-block", lambda **kw: DiT(**{"depth": 1, "hidden_size": 32,
        ...     "num_heads": 2, "input_size": 8, **kw}), overwrite=True)
        >>> build_model("dit-one-block").preset
        'dit-one-block'
    """
    if not callable(factory):
        raise ConfigError(f"register_preset({name!r}, ...) needs a callable factory")
    table = _lookup_table()
    for new in (name, *aliases):
        taken = table.get(new.lower())
        if taken is not None and not overwrite:
            raise ConfigError(
                f"Preset name {new!r} is already taken (it builds {taken!r}); pick another "
                "name or pass overwrite=True to replace it."
            )
    for existing in [k for k in PRESETS if k.lower() == name.lower()]:
        del PRESETS[existing]
    for existing in [k for k in ALIASES if k.lower() in {a.lower() for a in (name, *aliases)}]:
        del ALIASES[existing]
    PRESETS[name] = factory
    for alias in aliases:
        ALIASES[alias] = name


def build_from_checkpoint(
    name: str,
    path: str | os.PathLike,
    *,
    strict: bool = True,
    key: str | None = None,
    **overrides,
) -> nn.Module:
    """Build a preset and load a checkpoint into it: ``build_model`` then ``load_checkpoint``.

    Args:
        name: Preset name or alias (see ``dynconvert.models.list_presets()``).
        path: The checkpoint file.
        strict: As for ``load_checkpoint``.
        key: As for ``load_checkpoint``.
        **overrides: Constructor arguments replacing the preset's.

    Returns:
        The model with the checkpoint's weights, in training mode (call ``.eval()`` to sample).

    Raises:
        ModelNotFoundError: Unknown preset name.
        CheckpointError: As for ``load_checkpoint``.

    Example:
        >>> from dynconvert.models import build_from_checkpoint
        >>> path = "imagenet256_uvit_huge.pth"
        >>> model = build_from_checkpoint("U-ViT-H/2", path)  # doctest: +SKIP
    """
    model = build_model(name, **overrides)
    return load_checkpoint(model, path, strict=strict, key=key)
