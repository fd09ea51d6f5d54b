"""Tiny diffusers transformers with random weights everywhere: for tests and CLI trials.

``randomize_weights`` re-draws every parameter, zero-initialised gates included (adaLN-Zero
starts every block as the identity), so that every head, group and token really matters.
Names a run accepts as ``model``: the keys of :data:`TINY_DIFFUSERS`.

Example:
    >>> m = tiny_pixart()
    >>> type(m).__name__
    'PixArtTransformer2DModel'
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


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


def tiny_diffusers_dit(seed: int = 0, layers: int = 2) -> nn.Module:
    """diffusers DiTTransformer2DModel (adaLN-Zero blocks), 2 heads x 8 dims, 8x8x4 latents."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    m = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_type="ada_norm_zero",
    )
    return randomize_weights(m.eval(), seed)


def tiny_pixart(seed: int = 0, layers: int = 2) -> nn.Module:
    """diffusers PixArtTransformer2DModel (self- and cross-attention), tiny, random weights."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    m = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        sample_size=8,
        patch_size=2,
        cross_attention_dim=16,
        caption_channels=12,
        norm_num_groups=1,
    )
    return randomize_weights(m.eval(), seed)


TINY_DIFFUSERS: dict[str, Callable[..., nn.Module]] = {
    "diffusers-dit-tiny": tiny_diffusers_dit,
    "pixart-tiny": tiny_pixart,
}
"""Run-level model names of the tiny diffusers models (``convert --model pixart-tiny``)."""
