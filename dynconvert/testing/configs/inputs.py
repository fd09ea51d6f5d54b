"""Example inputs of the real-size families at any size, one maker per diffusers class.

A maker takes the model (for its config), a :class:`Size` in latent cells (the units of the
family's ``resolution`` in the shipped table: for Flux and QwenImage the packed token grid, for
the others the VAE latent) and a batch size, and returns the keyword arguments the model is
called with in its pipeline: random latents and text states, position ids, masks of ones, one
timestep per sample in the model's own convention. Everything is made on the CPU (values are
needed: some models compute lengths from their masks); ``dynconvert.analysis`` moves them to
the meta device for a model without weights.

Example:
    >>> size = Size(h=4, w=4, txt=8)
    >>> size.tokens(patch=2)
    4
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dynconvert.testing.zoo.builders import flux_ids, gen, ones_mask, randn, steps


@dataclass(frozen=True)
class Size:
    """A size in latent cells: height, width, frames (1 for images) and text tokens."""

    h: int
    w: int
    f: int = 1
    txt: int = 0

    def tokens(self, patch: int = 1, patch_t: int = 1) -> int:
        """Image or video tokens at this size for a patch of ``patch`` x ``patch`` cells."""
        return (self.f // patch_t) * (self.h // patch) * (self.w // patch)


Maker = Callable[[nn.Module, Size, int], dict[str, Any]]


def _t(batch: int, scale: float = 1000.0, integer: bool = False) -> torch.Tensor:
    return steps(batch, scale, integer)


def _dit(model: nn.Module, s: Size, batch: int = 1) -> dict[str, Any]:
    g = gen()
    return {
        "hidden_states": randn(g, batch, model.config.in_channels, s.h, s.w),
        "timestep": _t(batch, integer=True),
        "class_labels": torch.arange(batch) % 1000,
    }


def _flux(model: nn.Module, s: Size, batch: int = 1) -> dict[str, Any]:
    g, cfg = gen(), model.config
    img, txt = flux_ids(s.h, s.w, s.txt)
    out: dict[str, Any] = {
        "hidden_states": randn(g, batch, s.h * s.w, cfg.in_channels),
        "encoder_hidden_states": randn(g, batch, s.txt, cfg.joint_attention_dim),
        "timestep": _t(batch, 1.0),
        "img_ids": img,
        "txt_ids": txt,
    }
    if cfg.get("pooled_projection_dim"):
        out["pooled_projections"] = randn(g, batch, cfg.pooled_projection_dim)
    if cfg.get("guidance_embeds"):
        out["guidance"] = torch.full((batch,), 3.5)
    return out


def _flux2(model: nn.Module, s: Size, batch: int = 1) -> dict[str, Any]:
    g, cfg = gen(), model.config
    a = torch.arange
    img = torch.cartesian_prod(a(1), a(s.h), a(s.w), a(1))  # (h*w, 4): t, row, col, text pos
    txt = torch.cartesian_prod(a(1), a(1), a(1), a(s.txt))
    out: dict[str, Any] = {
        "hidden_states": randn(g, batch, s.h * s.w, cfg.in_channels),
        "encoder_hidden_states": randn(g, batch, s.txt, cfg.joint_attention_dim),
        "timestep": _t(batch, 1.0),
        "img_ids": img[None].expand(batch, -1, -1),
        "txt_ids": txt[None].expand(batch, -1, -1),
    }
    if cfg.get("guidance_embeds"):
        out["guidance"] = torch.full((batch,), 4.0)
    return out


def _sd3(model: nn.Module, s: Size, batch: int = 1) -> dict[str, Any]:
    g, cfg = gen(), model.config
    return {
        "hidden_states": randn(g, batch, cfg.in_channels, s.h, s.w),
        "encoder_hidden_states": randn(g, batch, s.txt, cfg.joint_attention_dim),
        "pooled_projections": randn(g, batch, cfg.pooled_projection_dim),
        "timestep": _t(batch),
    }


def _pixart(model: nn.Module, s: Size, batch: int = 1) -> dict[str, Any]:
    g, cfg = gen(), model.config
    return {
        "hidden_states": randn(g, batch, cfg.in_channels, s.h, s.w),
        "encoder_hidden_states": randn(g, batch, s.txt, cfg.caption_channels),
        "timestep": _t(batch, integer=True),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


def _sana(model: nn.Module, s: Size, batch: int = 1) -> dict[str, Any]:
    g, cfg = gen(), model.config
    return {
        "hidden_states": randn(g, batch, cfg.in_channels, s.h, s.w),
        "encoder_hidden_states": randn(g, batch, s.txt, cfg.caption_channels),
        "timestep": _t(batch, integer=True),
    }


def _lumina2(model: nn.Module, s: Size, batch: int = 1) -> dict[str, Any]:
    g, cfg = gen(), model.config
    return {
        "hidden_states": randn(g, batch, cfg.in_channels, s.h, s.w),
        "timestep": _t(batch, 1.0),
        "encoder_hidden_states": randn(g, batch, s.txt, cfg.cap_feat_dim),
        "encoder_attention_mask": ones_mask(batch, s.txt, torch.bool),
    }


def _cogview4(model: nn.Module, s: Size, batch: int = 1) -> dict[str, Any]:
    g, cfg = gen(), model.config
    pixels = torch.tensor([[s.h * 8.0, s.w * 8.0]] * batch)
    return {
        "hidden_states": randn(g, batch, cfg.in_channels, s.h, s.w),
        "encoder_hidden_states": randn(g, batch, s.txt, cfg.text_embed_dim),
        "timestep": _t(batch, integer=True),
        "original_size": pixels,
        "target_size": pixels,
        "crop_coords": torch.zeros(batch, 2),
    }


def _qwen_image(model: nn.Module, s: Size, batch: int = 1) -> dict[str, Any]:
    g, cfg = gen(), model.config
    return {
        "hidden_states": randn(g, batch, s.h * s.w, cfg.in_channels),
        "encoder_hidden_states": randn(g, batch, s.txt, cfg.joint_attention_dim),
        "encoder_hidden_states_mask": ones_mask(batch, s.txt),
        "timestep": _t(batch, 1.0),
        "img_shapes": [(1, s.h, s.w)] * batch,
    }


def _hunyuan_dit(model: nn.Module, s: Size, batch: int = 1) -> dict[str, Any]:
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    g, cfg = gen(), model.config
    grid = (s.h // cfg.patch_size, s.w // cfg.patch_size)
    clip, t5 = cfg.text_len, cfg.text_len_t5  # its pooling reads exactly text_len_t5 tokens
    return {
        "hidden_states": randn(g, batch, cfg.in_channels, s.h, s.w),
        "timestep": _t(batch).round(),
        "encoder_hidden_states": randn(g, batch, clip, cfg.cross_attention_dim),
        "text_embedding_mask": ones_mask(batch, clip, torch.float32),
        "encoder_hidden_states_t5": randn(g, batch, t5, cfg.cross_attention_dim_t5),
        "text_embedding_mask_t5": ones_mask(batch, t5, torch.float32),
        "image_meta_size": torch.tensor([[s.h * 8.0, s.w * 8.0] * 2 + [0.0, 0.0]] * batch),
        "style": torch.zeros(batch, dtype=torch.long),
        "image_rotary_emb": get_2d_rotary_pos_embed(cfg.attention_head_dim, ((0, 0), grid), grid),
    }


def _auraflow(model: nn.Module, s: Size, batch: int = 1) -> dict[str, Any]:
    g, cfg = gen(), model.config
    return {
        "hidden_states": randn(g, batch, cfg.in_channels, s.h, s.w),
        "encoder_hidden_states": randn(g, batch, s.txt, cfg.joint_attention_dim),
        "timestep": _t(batch, 1.0),
    }


def _wan(model: nn.Module, s: Size, batch: int = 1) -> dict[str, Any]:
    g, cfg = gen(), model.config
    return {
        "hidden_states": randn(g, batch, cfg.in_channels, s.f, s.h, s.w),
        "encoder_hidden_states": randn(g, batch, s.txt, cfg.text_dim),
        "timestep": _t(batch, integer=True),
    }


def _mochi(model: nn.Module, s: Size, batch: int = 1) -> dict[str, Any]:
    g, cfg = gen(), model.config
    return {
        "hidden_states": randn(g, batch, cfg.in_channels, s.f, s.h, s.w),
        "encoder_hidden_states": randn(g, batch, s.txt, cfg.text_embed_dim),
        "timestep": _t(batch, integer=True),
        "encoder_attention_mask": ones_mask(batch, s.txt, torch.bool),
    }


def _hunyuan_video(model: nn.Module, s: Size, batch: int = 1) -> dict[str, Any]:
    g, cfg = gen(), model.config
    out = {
        "hidden_states": randn(g, batch, cfg.in_channels, s.f, s.h, s.w),
        "timestep": _t(batch, integer=True),
        "encoder_hidden_states": randn(g, batch, s.txt, cfg.text_embed_dim),
        "encoder_attention_mask": ones_mask(batch, s.txt),
        "pooled_projections": randn(g, batch, cfg.pooled_projection_dim),
    }
    if cfg.get("guidance_embeds"):
        out["guidance"] = torch.full((batch,), 6000.0)  # the pipeline passes 6.0 x 1000
    return out


def _cogvideox(model: nn.Module, s: Size, batch: int = 1) -> dict[str, Any]:
    g, cfg = gen(), model.config
    out = {
        "hidden_states": randn(g, batch, s.f, cfg.in_channels, s.h, s.w),  # frames first
        "encoder_hidden_states": randn(g, batch, s.txt, cfg.text_embed_dim),
        "timestep": _t(batch, integer=True),
    }
    if cfg.get("use_rotary_positional_embeddings"):
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        grid = (s.h // cfg.patch_size, s.w // cfg.patch_size)
        out["image_rotary_emb"] = get_3d_rotary_pos_embed(
            cfg.attention_head_dim, ((0, 0), grid), grid, s.f, use_real=True
        )
    return out


def _ltx(model: nn.Module, s: Size, batch: int = 1) -> dict[str, Any]:
    g, cfg = gen(), model.config
    return {
        "hidden_states": randn(g, batch, s.f * s.h * s.w, cfg.in_channels),
        "encoder_hidden_states": randn(g, batch, s.txt, cfg.caption_channels),
        "timestep": _t(batch, integer=True),
        "encoder_attention_mask": ones_mask(batch, s.txt),
        "num_frames": s.f,
        "height": s.h,
        "width": s.w,
    }


MAKERS: dict[str, Maker] = {
    "DiTTransformer2DModel": _dit,
    "FluxTransformer2DModel": _flux,
    "Flux2Transformer2DModel": _flux2,
    "SD3Transformer2DModel": _sd3,
    "PixArtTransformer2DModel": _pixart,
    "SanaTransformer2DModel": _sana,
    "Lumina2Transformer2DModel": _lumina2,
    "CogView4Transformer2DModel": _cogview4,
    "QwenImageTransformer2DModel": _qwen_image,
    "HunyuanDiT2DModel": _hunyuan_dit,
    "AuraFlowTransformer2DModel": _auraflow,
    "WanTransformer3DModel": _wan,
    "MochiTransformer3DModel": _mochi,
    "HunyuanVideoTransformer3DModel": _hunyuan_video,
    "CogVideoXTransformer3DModel": _cogvideox,
    "LTXVideoTransformer3DModel": _ltx,
}
"""diffusers class name -> its input maker."""
