"""The digits demo model: a small class-conditional DiT trained on scikit-learn's digits.

Images are the 8x8 digits scaled to [-1, 1] and upsampled to 16x16 (``dynconvert.demo.data.
digits(16)``), one channel, ten classes. The model is the built-in ``DiT`` (facebookresearch
layout) at 16x16 with patch 2 (64 tokens), hidden size 64, 4 blocks of 4 heads, learned sigma,
and class dropout 0.1 so that it samples with classifier-free guidance (null label 10). Its
trained weights ship with dynconvert (``dynconvert/assets/digits_dit.safetensors``, fp16);
``examples/train_digits.py`` reproduces them on a CPU in a few minutes.

Importing ``dynconvert.demo`` registers the preset ``digits`` (alias ``dit-digits``) with
``dynconvert.models.build_model`` (:func:`register`); ``import dynconvert`` does that, so the
preset is there for every user of the package, while ``dynconvert.models`` knows nothing of the
demo.

Example:
    >>> import dynconvert.demo
    >>> from dynconvert.models import build_model
    >>> model = build_model("digits")
    >>> model.num_classes, model.input_size
    (10, 16)
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from dynconvert.errors import CheckpointError, ConfigError
from dynconvert.io.save import atomic_save_tensors
from dynconvert.models import PRESETS, register_preset
from dynconvert.models.dit import DiT, dit_factory
from dynconvert.models.loading import load_checkpoint

DIGITS_WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "digits_dit.safetensors"
"""The shipped base weights of the digits DiT (fp16 safetensors)."""

DIGITS_CONFIG: dict = dict(
    input_size=16, patch_size=2, in_channels=1,  # 16x16 pixels, 64 tokens
    hidden_size=64, depth=4, num_heads=4, mlp_ratio=4.0,  # 4 blocks of 4 heads
    class_dropout_prob=0.1, num_classes=10, learn_sigma=True,  # CFG with null label 10
)  # fmt: skip
"""Constructor arguments of ``DiT`` for the digits model."""

DIGITS_SAMPLING: dict = dict(steps=50, cfg_scale=1.5, scheduler="ddim", clip_sample=True)
"""Sampler settings the demo uses (pixel space: the predicted x0 is clipped to [-1, 1])."""


def build_digits(pretrained: bool = True, **overrides) -> nn.Module:
    """Build the digits DiT, with the shipped trained weights unless ``pretrained=False``.

    Args:
        pretrained: Load ``DIGITS_WEIGHTS`` (only possible when the overrides keep every weight
            shape). ``False`` gives DiT's random initialisation.
        **overrides: ``DiT`` constructor arguments that replace ``DIGITS_CONFIG``.

    Returns:
        The model (in training mode, like every preset; call ``.eval()`` to sample).

    Raises:
        ConfigError: An override ``DiT`` does not take.
        CheckpointError: The weights file is missing, or the overrides change a weight shape
            (pass ``pretrained=False``).

    Example:
        >>> from dynconvert.demo.digits import build_digits
        >>> build_digits(pretrained=False, depth=2).preset_kwargs
        {'pretrained': False, 'depth': 2}
    """

    valid = [p for p in inspect.signature(DiT.__init__).parameters if p != "self"]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ConfigError(
            f"Unknown option(s) {', '.join(unknown)} for preset 'digits' (DiT); valid options: "
            f"pretrained, {', '.join(valid)}."
        )
    model = dit_factory("digits", **DIGITS_CONFIG)(**overrides)
    if not pretrained:
        model.preset_kwargs = {"pretrained": False, **overrides}
        return model
    if not DIGITS_WEIGHTS.is_file():
        raise CheckpointError(
            f"the digits weights {DIGITS_WEIGHTS} are missing from this installation; "
            "reinstall dynconvert, run examples/train_digits.py, or pass pretrained=False"
        )
    try:
        load_checkpoint(model, DIGITS_WEIGHTS)
    except CheckpointError as err:
        raise CheckpointError(
            f"{err} The shipped digits weights fit DIGITS_CONFIG only; pass pretrained=False "
            "to build a changed architecture with random weights."
        ) from err
    return model


DIGITS_PRESETS: dict[str, Callable[..., nn.Module]] = {"digits": build_digits}
"""Preset name -> factory, for ``dynconvert.models.PRESETS``."""

DIGITS_ALIASES: dict[str, str] = {"dit-digits": "digits"}
"""Alias -> preset name, for ``dynconvert.models.ALIASES``."""


def register() -> None:
    """Register the ``digits`` preset with ``dynconvert.models`` (no-op when already there).

    Example:
        >>> register()
        >>> from dynconvert.models import resolve_name
        >>> resolve_name("dit-digits")
        'digits'
    """
    if "digits" not in PRESETS:
        register_preset("digits", build_digits, aliases=tuple(DIGITS_ALIASES))


def save_digits_weights(model: nn.Module, path: str | os.PathLike = DIGITS_WEIGHTS) -> Path:
    """Write a digits model's state dict as fp16 safetensors, atomically (temp file, rename).

    ``pos_embed`` (a fixed sin-cos table) is kept, as in DiT checkpoints.

    Example:
        >>> import tempfile
        >>> p = save_digits_weights(build_digits(pretrained=False), tempfile.mkdtemp() + "/w.safetensors")
        >>> p.stat().st_size < 5_000_000
        True
    """
    state = {k: v.detach().cpu().half().contiguous() for k, v in model.state_dict().items()}
    return atomic_save_tensors(
        state, path, metadata={"format": "pt", "config": repr(DIGITS_CONFIG)}
    )


def digits_model_info() -> dict:
    """Facts about the digits model for reports: config, parameter count, weights file size.

    Example:
        >>> digits_model_info()["config"]["hidden_size"]
        64
    """
    with torch.device("meta"):
        params = sum(p.numel() for p in DiT(**DIGITS_CONFIG).parameters())
    return {
        "config": dict(DIGITS_CONFIG),
        "parameters": int(params),
        "weights": str(DIGITS_WEIGHTS),
        "weights_bytes": DIGITS_WEIGHTS.stat().st_size if DIGITS_WEIGHTS.is_file() else None,
    }
