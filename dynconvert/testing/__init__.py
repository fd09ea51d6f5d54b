"""Tiny models and routing helpers for tests (shipped, like torchao.testing).

Every builder returns a small model with *random* weights everywhere (zero-initialised gates,
as in DiT's adaLN-Zero, are re-drawn) so that every head, group and token really matters.

Example:
    >>> from dynconvert.testing import tiny_dit, randomize_routing
    >>> import dynconvert
    >>> model = dynconvert.convert(tiny_dit(), budget=0.5)
    >>> randomize_routing(model, keep=0.5)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dynconvert.inputs import split_inputs
from dynconvert.models.tiny import randomize_weights, tiny_diffusers_dit, tiny_pixart
from dynconvert.runtime.synthetic import randomize_routing, synthetic_routing
from dynconvert.testing.attention_forms import FORMS
from dynconvert.testing.patterns import PATTERNS, mmdit, rotary_dit, video_dit

__all__ = [
    "PATTERN_MODELS", "TINY_BUILDERS", "call", "mmdit", "randomize_routing", "rotary_dit",
    "video_dit", "randomize_weights", "synthetic_routing",
    "tiny_diffusers_dit", "tiny_dit", "tiny_pixart", "tiny_uvit",
]  # fmt: skip

PATTERN_MODELS = {**PATTERNS, **FORMS}
"""Every pattern model by name (testing/patterns/ and testing/attention_forms.py): small
models written as other codebases write them, each returning ``(model, example_inputs)``."""


def tiny_dit(seed: int = 0, **overrides: Any) -> nn.Module:
    """Built-in DiT, 2 blocks, 2 heads x 16 dims, 8x8x4 latents, 10 classes, random weights."""
    from dynconvert.models import build_model

    torch.manual_seed(seed)
    return randomize_weights(build_model("dit-tiny", **overrides).eval(), seed)


def tiny_uvit(seed: int = 0, **overrides: Any) -> nn.Module:
    """Built-in U-ViT (in/mid/out blocks with long skips), tiny, random weights."""
    from dynconvert.models import build_model

    torch.manual_seed(seed)
    return randomize_weights(build_model("uvit-tiny", **overrides).eval(), seed)


TINY_BUILDERS = {
    "dit": tiny_dit,
    "uvit": tiny_uvit,
    "diffusers-dit": tiny_diffusers_dit,
    "pixart": tiny_pixart,
}


def call(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Run a model on (args, kwargs) or a tuple/dict and return its output tensor."""
    args, kwargs = split_inputs(inputs)
    out = model(*args, **kwargs)
    return out.sample if hasattr(out, "sample") else out
