"""Example inputs of the zoo's diffusers models, one maker per class (keyword arguments, as the
model is called)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dynconvert.testing.zoo.builders import flux_ids, gen, ones_mask, randn, steps


# -- diffusers: inputs per class -------------------------------------------------------------------
def dit_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = gen()
    return {
        "hidden_states": randn(g, batch, 4, 8, 8),
        "timestep": steps(batch, integer=True),
        "class_labels": torch.arange(batch) % 10,
    }


def pixart_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = gen()
    return {
        "hidden_states": randn(g, batch, 4, 8, 8),
        "encoder_hidden_states": randn(g, batch, 8, 12),
        "timestep": steps(batch, integer=True),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


def sana_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = gen()
    return {
        "hidden_states": randn(g, batch, 4, 8, 8),
        "encoder_hidden_states": randn(g, batch, 8, 8),
        "timestep": steps(batch, integer=True),
    }


def sd3_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = gen()
    return {
        "hidden_states": randn(g, batch, 4, 8, 8),
        "encoder_hidden_states": randn(g, batch, 8, 16),
        "pooled_projections": randn(g, batch, 8),
        "timestep": steps(batch),
    }


def flux_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = gen()
    img, txt = flux_ids(4, 4, 8)
    cfg = model.config
    out: dict[str, Any] = {
        "hidden_states": randn(g, batch, 16, cfg.in_channels),
        "encoder_hidden_states": randn(g, batch, 8, cfg.joint_attention_dim),
        "timestep": steps(batch, 1.0),
        "img_ids": img,
        "txt_ids": txt,
    }
    if "pooled_projection_dim" in cfg and cfg.pooled_projection_dim:
        out["pooled_projections"] = randn(g, batch, cfg.pooled_projection_dim)
    if cfg.get("guidance_embeds"):
        out["guidance"] = torch.full((batch,), 3.5)
    return out


def flux2_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = gen()
    img = torch.cartesian_prod(torch.arange(1), torch.arange(4), torch.arange(4), torch.arange(1))
    txt = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(8))
    return {
        "hidden_states": randn(g, batch, 16, 4),
        "encoder_hidden_states": randn(g, batch, 8, 32),
        "timestep": steps(batch, 1.0),
        "img_ids": img[None].expand(batch, -1, -1),
        "txt_ids": txt[None].expand(batch, -1, -1),
    }


def chroma_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = gen()
    img, txt = flux_ids(4, 4, 8)
    return {
        "hidden_states": randn(g, batch, 16, 4),
        "encoder_hidden_states": randn(g, batch, 8, 32),
        "timestep": steps(batch, 1.0),
        "img_ids": img,
        "txt_ids": txt,
    }


def auraflow_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = gen()
    return {
        "hidden_states": randn(g, batch, 4, 8, 8),
        "encoder_hidden_states": randn(g, batch, 8, 16),
        "timestep": steps(batch, 1.0),
    }


def cogvideox_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = gen()
    return {
        "hidden_states": randn(g, batch, 2, 4, 8, 8),
        "encoder_hidden_states": randn(g, batch, 8, 16),
        "timestep": steps(batch, integer=True),
    }


def cogview_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = gen()
    return {
        "hidden_states": randn(g, batch, 4, 8, 8),
        "encoder_hidden_states": randn(g, batch, 8, 16),
        "timestep": steps(batch, integer=True),
        "original_size": torch.tensor([[64.0, 64.0]] * batch),
        "target_size": torch.tensor([[64.0, 64.0]] * batch),
        "crop_coords": torch.zeros(batch, 2),
    }


def hunyuan_dit_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    g = gen()
    rope = get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4))  # head_dim 8, a 4x4 patch grid
    meta = torch.tensor([[64.0, 64.0, 64.0, 64.0, 0.0, 0.0]] * batch)
    return {
        "hidden_states": randn(g, batch, 4, 8, 8),
        "timestep": steps(batch).round(),
        "encoder_hidden_states": randn(g, batch, 4, 8),
        "text_embedding_mask": ones_mask(batch, 4, torch.float32),
        "encoder_hidden_states_t5": randn(g, batch, 4, 8),
        "text_embedding_mask_t5": ones_mask(batch, 4, torch.float32),
        "image_meta_size": meta,
        "style": torch.zeros(batch, dtype=torch.long),
        "image_rotary_emb": rope,
    }


def video_cf_inputs(
    text_dim: int,
    channels: int = 4,
    frames: int = 2,
    side: int = 8,
    scale: float = 1000.0,
    integer: bool = True,
) -> Callable[..., dict[str, Any]]:
    """Inputs (B, C, F, H, W) + text (B, 8, text_dim) + timestep, as Wan/Mochi-style models take."""

    def inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
        g = gen()
        return {
            "hidden_states": randn(g, batch, channels, frames, side, side),
            "encoder_hidden_states": randn(g, batch, 8, text_dim),
            "timestep": steps(batch, scale, integer),
        }

    return inputs


def mochi_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    out = video_cf_inputs(16)(model, batch)
    out["encoder_attention_mask"] = ones_mask(batch, 8, torch.bool)
    return out


def hunyuan_video_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = gen()
    return {
        "hidden_states": randn(g, batch, 4, 2, 4, 4),
        "timestep": steps(batch, integer=True),
        "encoder_hidden_states": randn(g, batch, 8, 16),
        "encoder_attention_mask": ones_mask(batch, 8),
        "pooled_projections": randn(g, batch, 8),
        "guidance": torch.full((batch,), 3500.0),
    }


def latte_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = gen()
    return {
        "hidden_states": randn(g, batch, 4, 2, 8, 8),
        "encoder_hidden_states": randn(g, batch, 8, 8),
        "timestep": steps(batch, integer=True),
    }


def allegro_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = gen()
    return {
        "hidden_states": randn(g, batch, 4, 2, 8, 8),
        "encoder_hidden_states": randn(g, batch, 8, 8),
        "timestep": steps(batch, integer=True),
    }


def lumina2_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = gen()
    return {
        "hidden_states": randn(g, batch, 4, 8, 8),
        "timestep": steps(batch, 1.0),
        "encoder_hidden_states": randn(g, batch, 8, 8),
        "encoder_attention_mask": ones_mask(batch, 8, torch.bool),
    }


def ltx_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = gen()
    return {
        "hidden_states": randn(g, batch, 2 * 4 * 4, 4),
        "encoder_hidden_states": randn(g, batch, 8, 16),
        "timestep": steps(batch, integer=True),
        "encoder_attention_mask": ones_mask(batch, 8),
        "num_frames": 2,
        "height": 4,
        "width": 4,
    }


def qwenimage_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = gen()
    return {
        "hidden_states": randn(g, batch, 16, 16),
        "encoder_hidden_states": randn(g, batch, 8, 16),
        "encoder_hidden_states_mask": ones_mask(batch, 8),
        "timestep": steps(batch, 1.0),
        "img_shapes": [(1, 4, 4)] * batch,
    }


def lumina_rope() -> torch.Tensor:
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    return get_2d_rotary_pos_embed_lumina(
        16, 32, 32
    )  # head_dim 16, a grid larger than the 4x4 patches


def ideogram4_inputs(batch: int, text: int = 4, side: int = 2) -> dict[str, Any]:
    from diffusers.models.transformers import transformer_ideogram4 as ideogram

    g, image = gen(), side * side
    hidden = torch.zeros(batch, text + image, 16)
    hidden[:, text:] = randn(g, batch, image, 16)
    context = torch.zeros(batch, text + image, 24)
    context[:, :text] = randn(g, batch, text, 24)
    pos = torch.zeros(batch, text + image, 3, dtype=torch.long)
    pos[:, :text] = torch.arange(text)[:, None]
    off = ideogram.IMAGE_POSITION_OFFSET
    pos[:, text:, 0] = off
    pos[:, text:, 1] = torch.arange(side).repeat_interleave(side) + off
    pos[:, text:, 2] = torch.arange(side).repeat(side) + off
    indicator = torch.full((batch, text + image), ideogram.OUTPUT_IMAGE_INDICATOR, dtype=torch.long)
    indicator[:, :text] = ideogram.LLM_TOKEN_INDICATOR
    return {
        "hidden_states": hidden,
        "encoder_hidden_states": context,
        "timestep": steps(batch, 1.0),
        "position_ids": pos,
        "segment_ids": torch.ones(batch, text + image, dtype=torch.long),
        "indicator": indicator,
    }


def krea2_positions(text: int, h: int, w: int) -> torch.Tensor:
    pos = torch.zeros(text + h * w, 3)
    pos[text:, 1] = torch.arange(h).repeat_interleave(w)
    pos[text:, 2] = torch.arange(w).repeat(h)
    return pos


def stable_audio_rope(dim: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    return get_1d_rotary_pos_embed(dim, length, use_real=True, repeat_interleave_real=False)


def minimax_h3_layout(text: int, audio: int, video: int) -> dict[str, Any]:
    n = text + audio + video
    text_i, audio_i, video_i = (
        torch.arange(text),
        torch.arange(text, text + audio),
        torch.arange(text + audio, n),
    )
    tags = torch.zeros(n, dtype=torch.long)
    tags[text_i], tags[audio_i] = 1, 2
    t_index = torch.zeros(n, dtype=torch.long)
    t_index[audio_i] = 1
    pos = torch.zeros(n, 3)
    pos[:, 0] = torch.arange(n, dtype=torch.float32)
    pos[video_i, 1] = torch.arange(video, dtype=torch.float32) % 4
    pos[video_i, 2] = torch.arange(video, dtype=torch.float32) % 2
    return {
        "timestep": torch.tensor([0.7, 0.3]),
        "timestep_indices": t_index,
        "token_tags": tags,
        "position_ids": pos,
        "video_indices": video_i,
        "audio_indices": audio_i,
        "text_indices": text_i,
    }


def camera(batch: int, frames: int, side: int = 8) -> torch.Tensor:
    c2w = torch.eye(4).repeat(batch, frames, 1, 1)
    c2w[..., 2, 3] = torch.arange(frames, dtype=torch.float32) * 0.1
    intrinsics = torch.tensor([float(side), float(side), side / 2, side / 2]).expand(
        batch, frames, 4
    )
    return torch.cat([c2w.flatten(start_dim=-2), intrinsics], dim=-1)
