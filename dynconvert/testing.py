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

import math
from typing import Any

import torch
from torch import nn

from dynconvert.inputs import split_inputs
from dynconvert.synthetic import randomize_routing, synthetic_routing

__all__ = [
    "TINY_BUILDERS", "call", "randomize_routing", "randomize_weights", "synthetic_routing",
    "tiny_diffusers_dit", "tiny_dit", "tiny_pixart", "tiny_uvit",
]  # fmt: skip


def randomize_weights(model: nn.Module, seed: int = 0, std: float = 0.2) -> nn.Module:
    """Re-draw every floating parameter from N(0, std^2 / fan_in-ish) so no path is inert."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            if p.dim() >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif name.endswith("weight"):
                p.copy_(1.0 + std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


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


def tiny_diffusers_dit(seed: int = 0, layers: int = 2) -> nn.Module:
    """diffusers DiTTransformer2DModel (adaLN-Zero blocks), 2 heads x 8 dims, 8x8x4 latents."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    m = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
        num_layers=layers, sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero",
    )
    return randomize_weights(m.eval(), seed)


def tiny_pixart(seed: int = 0, layers: int = 2) -> nn.Module:
    """diffusers PixArtTransformer2DModel (self- and cross-attention), tiny, random weights."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    m = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=layers,
        sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=12, norm_num_groups=1,
    )
    return randomize_weights(m.eval(), seed)


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
