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
demo. The machinery is shared with the translated-digits demo (``dynconvert.demo.models``).

Example:
    >>> import dynconvert.demo
    >>> from dynconvert.models import build_model
    >>> model = build_model("digits")
    >>> model.num_classes, model.input_size
    (10, 16)
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import torch.nn as nn

from dynconvert.demo import data
from dynconvert.demo.models import DemoModel, build_demo, demo_model_info, register_demo
from dynconvert.demo.models import save_demo_weights as _save

DIGITS_CONFIG: dict = dict(
    input_size=16, patch_size=2, in_channels=1,  # 16x16 pixels, 64 tokens
    hidden_size=64, depth=4, num_heads=4, mlp_ratio=4.0,  # 4 blocks of 4 heads
    class_dropout_prob=0.1, num_classes=10, learn_sigma=True,  # CFG with null label 10
)  # fmt: skip
"""Constructor arguments of ``DiT`` for the digits model."""

DIGITS_SAMPLING: dict = dict(steps=50, cfg_scale=1.5, scheduler="ddim", clip_sample=True)
"""Sampler settings the demo uses (pixel space: the predicted x0 is clipped to [-1, 1])."""

DIGITS = DemoModel(
    "digits",
    DIGITS_CONFIG,
    DIGITS_SAMPLING,
    data=partial(data.digits, 16),
    train_data=partial(data.digits, 16),
    training=dict(steps=3000, batch_size=64, lr=2e-3, classifier_epochs=30),
    aliases=("dit-digits",),
)
"""The digits demo."""

DIGITS_WEIGHTS = DIGITS.weights
"""The shipped base weights of the digits DiT (fp16 safetensors)."""


def build_digits(pretrained: bool = True, **overrides) -> nn.Module:
    """Build the digits DiT, with the shipped trained weights unless ``pretrained=False``.

    See :func:`dynconvert.demo.models.build_demo` for the arguments and errors.

    Example:
        >>> build_digits(pretrained=False, depth=2).preset_kwargs
        {'pretrained': False, 'depth': 2}
    """
    return build_demo("digits", pretrained, **overrides)


def register() -> None:
    """Register the ``digits`` demo and preset (no-op when already there).

    Example:
        >>> register()
        >>> from dynconvert.models import resolve_name
        >>> resolve_name("dit-digits")
        'digits'
    """
    register_demo(DIGITS)


def save_digits_weights(model: nn.Module, path: str | os.PathLike = DIGITS_WEIGHTS) -> Path:
    """Write a digits model's state dict as fp16 safetensors (``save_demo_weights``).

    Example:
        >>> import tempfile
        >>> path = tempfile.mkdtemp() + "/w.safetensors"
        >>> p = save_digits_weights(build_digits(pretrained=False), path)
        >>> p.stat().st_size < 5_000_000
        True
    """
    return _save(model, "digits", path)


def digits_model_info() -> dict:
    """Facts about the digits model for reports: config, parameter count, weights file size.

    Example:
        >>> digits_model_info()["config"]["hidden_size"]
        64
    """
    return demo_model_info("digits")
