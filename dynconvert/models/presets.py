"""Preset factories: a model class with fixed constructor arguments, under a name.

DiT (``DIT_PRESETS``) and U-ViT (``UVIT_PRESETS``) build every preset with
:func:`preset_factory`; ``dynconvert.models.build_model`` looks them up by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.nn as nn

ModelT = TypeVar("ModelT", bound=nn.Module)


def preset_factory(model_cls: type[ModelT], name: str, **config) -> Callable[..., ModelT]:
    """A preset: ``model_cls(**config)``, with the caller's keyword arguments overriding config.

    The model it builds records ``preset`` (``name``) and ``preset_kwargs`` (the overrides), so
    that ``dynconvert.save`` can write down how to rebuild it. The factory carries
    ``model_cls``, against whose constructor ``build_model`` checks override names.

    Args:
        model_cls: The model class; its instances must accept the ``preset`` and
            ``preset_kwargs`` attributes.
        name: The preset's canonical name, e.g. ``"DiT-XL/2"``.
        **config: Constructor arguments of the preset.

    Returns:
        ``factory(**overrides) -> model``, a fresh model on every call.

    Example:
        >>> from dynconvert.models.dit import DiT
        >>> tiny = preset_factory(DiT, "dit-one", depth=1, hidden_size=32, num_heads=2)
        >>> model = tiny(input_size=8)
        >>> model.preset, model.preset_kwargs, len(model.blocks)
        ('dit-one', {'input_size': 8}, 1)
    """

    def build(**overrides) -> ModelT:
        model = model_cls(**{**config, **overrides})
        model.preset = name
        model.preset_kwargs = dict(overrides)
        return model

    args = ", ".join(f"{k}={v}" for k, v in config.items())
    build.__name__ = name.replace("-", "_").replace("/", "_")
    build.__doc__ = f"Build {name}: {model_cls.__name__}({args})."
    build.model_cls = model_cls
    return build
