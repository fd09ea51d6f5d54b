"""A zoo of tiny denoising transformers: every image and video DiT class of the installed diffusers,
the built-in DiT and U-ViT, and a timm-based DiT, each with random weights and example inputs.

Each entry builds a model from a config small enough that its forward pass runs on a CPU in
milliseconds (1-2 layers, 2-4 heads of 8-16 channels, tiny latents), and makes inputs exactly as the
model is called (keyword arguments). The support matrix (``dynconvert.support``) converts every
entry; classes that cannot be built or run here are listed in :data:`ZOO_EXCLUDED` with the reason.

Example:
    >>> from dynconvert.models.zoo import ZOO
    >>> entry = ZOO["flux"]
    >>> model = entry.build(0)
    >>> out = model(**entry.inputs(model, batch=2))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dynconvert.models.tiny import randomize_weights, tiny_diffusers_dit, tiny_pixart

__all__ = ["ZOO", "ZOO_EXCLUDED", "TimmDiT", "ZooEntry", "zoo_names"]


@dataclass(frozen=True)
class ZooEntry:
    """One tiny model of the zoo.

    Attributes:
        class_name: the model's class name (a diffusers class, or a built-in one).
        family: ``"image"``, ``"video"``, ``"audio"`` or ``"other"``.
        build: ``build(seed) -> model`` in eval mode with random weights.
        inputs: ``inputs(model, batch=2) -> dict`` of keyword arguments, as the model is called.
        note: what the tiny config leaves out or chooses (empty when nothing notable).
    """

    class_name: str
    family: str
    build: Callable[[int], nn.Module]
    inputs: Callable[..., dict[str, Any]]
    note: str = ""


# -- helpers ---------------------------------------------------------------------------------------
def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _steps(batch: int, scale: float = 1000.0, integer: bool = False) -> torch.Tensor:
    """Distinct timesteps, one per sample, spread over (0, scale)."""
    t = torch.linspace(0.9, 0.1, batch) * scale if batch > 1 else torch.tensor([0.5 * scale])
    return t.round().long() if integer else t


def _diffusers(class_name: str, **config: Any) -> Callable[[int], nn.Module]:
    """A builder of ``diffusers.<class_name>(**config)`` with random weights, in eval mode."""

    def build(seed: int = 0) -> nn.Module:
        import diffusers.models.transformers as transformers

        torch.manual_seed(seed)
        model = getattr(transformers, class_name)(**config)
        return randomize_weights(model.eval(), seed)

    return build


def _ones_mask(batch: int, length: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
    return torch.ones(batch, length, dtype=dtype)


def _flux_ids(h: int, w: int, text: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flux-style position ids: (h*w, 3) image ids (0, row, col) and (text, 3) zero text ids."""
    img = torch.zeros(h, w, 3)
    img[..., 1] = torch.arange(h)[:, None]
    img[..., 2] = torch.arange(w)[None, :]
    return img.reshape(h * w, 3), torch.zeros(text, 3)


def _T(scale: float = 1000.0, integer: bool = False) -> Callable[[int], torch.Tensor]:
    """Spec of a timestep input: distinct per sample, in (0, scale)."""
    return lambda batch: _steps(batch, scale, integer)


def _M(length: int, dtype: torch.dtype = torch.long) -> Callable[[int], torch.Tensor]:
    """Spec of an all-ones (B, length) mask."""
    return lambda batch: _ones_mask(batch, length, dtype)


def _Z(*shape: int) -> Callable[[int], torch.Tensor]:
    """Spec of a zero (B, *shape) tensor."""
    return lambda batch: torch.zeros(batch, *shape)


def _kw(**spec: Any) -> Callable[..., dict[str, Any]]:
    """Inputs from a spec: a tuple is a random (B, *tuple) tensor, a callable gets the batch
    size, anything else is passed as it is."""

    def inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
        g = _gen()
        out: dict[str, Any] = {}
        for key, value in spec.items():
            if isinstance(value, tuple):
                out[key] = _randn(g, batch, *value)
            elif callable(value):
                out[key] = value(batch)
            else:
                out[key] = value
        return out

    return inputs


# -- built-in and timm models ----------------------------------------------------------------------
def _builtin(name: str) -> Callable[[int], nn.Module]:
    def build(seed: int = 0) -> nn.Module:
        from dynconvert.models import build_model

        torch.manual_seed(seed)
        return randomize_weights(build_model(name).eval(), seed)

    return build


def _builtin_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    import inspect

    args = model.example_inputs(batch_size=batch)
    names = [p for p in inspect.signature(model.forward).parameters]
    return dict(zip(names, args))


def _timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimmDiT(nn.Module):
    """A DiT built from timm's ViT parts: PatchEmbed, ``vision_transformer.Block`` and a timestep
    embedding added to every token (no adaLN: the blocks are timm's own, unchanged).

    Args:
        img_size: latent side.
        patch_size: patch side.
        in_chans: latent channels.
        dim: token width.
        depth: number of timm Blocks.
        heads: attention heads.
        mlp_ratio: MLP hidden width / dim.
    """

    def __init__(self, img_size: int = 8, patch_size: int = 2, in_chans: int = 4, dim: int = 32,
                 depth: int = 2, heads: int = 2, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block, PatchEmbed

        self.patch_size, self.in_chans, self.dim = patch_size, in_chans, dim
        self.x_embedder = PatchEmbed(img_size, patch_size, in_chans, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, dim))
        self.t_embedder = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, patch_size * patch_size * in_chans)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predict the noise of ``x`` (B, C, H, W) at timesteps ``t`` (B,)."""
        b, c, h, w = x.shape
        tokens = self.x_embedder(x) + self.pos_embed
        tokens = tokens + self.t_embedder(_timestep_embedding(t, self.dim))[:, None]
        for block in self.blocks:
            tokens = block(tokens)
        out = self.head(self.norm(tokens))
        p = self.patch_size
        out = out.reshape(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, c, h, w)


def _timm_dit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_weights(TimmDiT().eval(), seed)


def _timm_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = _gen()
    return {"x": _randn(g, batch, 4, 8, 8), "t": _steps(batch, integer=True)}


# -- diffusers: inputs per class -------------------------------------------------------------------
def _dit_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = _gen()
    return {"hidden_states": _randn(g, batch, 4, 8, 8), "timestep": _steps(batch, integer=True),
            "class_labels": torch.arange(batch) % 10}


def _pixart_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = _gen()
    return {"hidden_states": _randn(g, batch, 4, 8, 8), "encoder_hidden_states": _randn(g, batch, 8, 12),
            "timestep": _steps(batch, integer=True), "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


def _sana_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = _gen()
    return {"hidden_states": _randn(g, batch, 4, 8, 8), "encoder_hidden_states": _randn(g, batch, 8, 8),
            "timestep": _steps(batch, integer=True)}


def _sd3_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = _gen()
    return {"hidden_states": _randn(g, batch, 4, 8, 8), "encoder_hidden_states": _randn(g, batch, 8, 16),
            "pooled_projections": _randn(g, batch, 8), "timestep": _steps(batch)}


def _flux_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = _gen()
    img, txt = _flux_ids(4, 4, 8)
    cfg = model.config
    out: dict[str, Any] = {
        "hidden_states": _randn(g, batch, 16, cfg.in_channels),
        "encoder_hidden_states": _randn(g, batch, 8, cfg.joint_attention_dim),
        "timestep": _steps(batch, 1.0), "img_ids": img, "txt_ids": txt,
    }
    if "pooled_projection_dim" in cfg and cfg.pooled_projection_dim:
        out["pooled_projections"] = _randn(g, batch, cfg.pooled_projection_dim)
    if cfg.get("guidance_embeds"):
        out["guidance"] = torch.full((batch,), 3.5)
    return out


def _flux2_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = _gen()
    img = torch.cartesian_prod(torch.arange(1), torch.arange(4), torch.arange(4), torch.arange(1))
    txt = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(8))
    return {"hidden_states": _randn(g, batch, 16, 4), "encoder_hidden_states": _randn(g, batch, 8, 32),
            "timestep": _steps(batch, 1.0), "img_ids": img[None].expand(batch, -1, -1),
            "txt_ids": txt[None].expand(batch, -1, -1)}


def _chroma_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = _gen()
    img, txt = _flux_ids(4, 4, 8)
    return {"hidden_states": _randn(g, batch, 16, 4), "encoder_hidden_states": _randn(g, batch, 8, 32),
            "timestep": _steps(batch, 1.0), "img_ids": img, "txt_ids": txt}


def _auraflow_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = _gen()
    return {"hidden_states": _randn(g, batch, 4, 8, 8), "encoder_hidden_states": _randn(g, batch, 8, 16),
            "timestep": _steps(batch, 1.0)}


def _cogvideox_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = _gen()
    return {"hidden_states": _randn(g, batch, 2, 4, 8, 8), "encoder_hidden_states": _randn(g, batch, 8, 16),
            "timestep": _steps(batch, integer=True)}


def _cogview_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = _gen()
    return {"hidden_states": _randn(g, batch, 4, 8, 8), "encoder_hidden_states": _randn(g, batch, 8, 16),
            "timestep": _steps(batch, integer=True), "original_size": torch.tensor([[64.0, 64.0]] * batch),
            "target_size": torch.tensor([[64.0, 64.0]] * batch), "crop_coords": torch.zeros(batch, 2)}


def _hunyuan_dit_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    g = _gen()
    rope = get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4))  # head_dim 8, a 4x4 patch grid
    meta = torch.tensor([[64.0, 64.0, 64.0, 64.0, 0.0, 0.0]] * batch)
    return {"hidden_states": _randn(g, batch, 4, 8, 8), "timestep": _steps(batch).round(),
            "encoder_hidden_states": _randn(g, batch, 4, 8), "text_embedding_mask": _ones_mask(batch, 4, torch.float32),
            "encoder_hidden_states_t5": _randn(g, batch, 4, 8), "text_embedding_mask_t5": _ones_mask(batch, 4, torch.float32),
            "image_meta_size": meta, "style": torch.zeros(batch, dtype=torch.long), "image_rotary_emb": rope}


def _video_cf_inputs(text_dim: int, channels: int = 4, frames: int = 2, side: int = 8,
                     scale: float = 1000.0, integer: bool = True) -> Callable[..., dict[str, Any]]:
    """Inputs (B, C, F, H, W) + text (B, 8, text_dim) + timestep, as Wan/Mochi-style models take."""

    def inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
        g = _gen()
        return {"hidden_states": _randn(g, batch, channels, frames, side, side),
                "encoder_hidden_states": _randn(g, batch, 8, text_dim), "timestep": _steps(batch, scale, integer)}

    return inputs


def _mochi_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    out = _video_cf_inputs(16)(model, batch)
    out["encoder_attention_mask"] = _ones_mask(batch, 8, torch.bool)
    return out


def _hunyuan_video_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = _gen()
    return {"hidden_states": _randn(g, batch, 4, 2, 4, 4), "timestep": _steps(batch, integer=True),
            "encoder_hidden_states": _randn(g, batch, 8, 16), "encoder_attention_mask": _ones_mask(batch, 8),
            "pooled_projections": _randn(g, batch, 8), "guidance": torch.full((batch,), 3500.0)}


def _latte_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = _gen()
    return {"hidden_states": _randn(g, batch, 4, 2, 8, 8), "encoder_hidden_states": _randn(g, batch, 8, 8),
            "timestep": _steps(batch, integer=True)}


def _allegro_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = _gen()
    return {"hidden_states": _randn(g, batch, 4, 2, 8, 8), "encoder_hidden_states": _randn(g, batch, 8, 8),
            "timestep": _steps(batch, integer=True)}


def _lumina2_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = _gen()
    return {"hidden_states": _randn(g, batch, 4, 8, 8), "timestep": _steps(batch, 1.0),
            "encoder_hidden_states": _randn(g, batch, 8, 8), "encoder_attention_mask": _ones_mask(batch, 8, torch.bool)}


def _ltx_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = _gen()
    return {"hidden_states": _randn(g, batch, 2 * 4 * 4, 4), "encoder_hidden_states": _randn(g, batch, 8, 16),
            "timestep": _steps(batch, integer=True), "encoder_attention_mask": _ones_mask(batch, 8),
            "num_frames": 2, "height": 4, "width": 4}


def _qwenimage_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = _gen()
    return {"hidden_states": _randn(g, batch, 16, 16), "encoder_hidden_states": _randn(g, batch, 8, 16),
            "encoder_hidden_states_mask": _ones_mask(batch, 8), "timestep": _steps(batch, 1.0),
            "img_shapes": [(1, 4, 4)] * batch}


def _lumina_rope() -> torch.Tensor:
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    return get_2d_rotary_pos_embed_lumina(16, 32, 32)  # head_dim 16, a grid larger than the 4x4 patches


def _ideogram4_inputs(batch: int, text: int = 4, side: int = 2) -> dict[str, Any]:
    from diffusers.models.transformers import transformer_ideogram4 as ideogram

    g, image = _gen(), side * side
    hidden = torch.zeros(batch, text + image, 16)
    hidden[:, text:] = _randn(g, batch, image, 16)
    context = torch.zeros(batch, text + image, 24)
    context[:, :text] = _randn(g, batch, text, 24)
    pos = torch.zeros(batch, text + image, 3, dtype=torch.long)
    pos[:, :text] = torch.arange(text)[:, None]
    off = ideogram.IMAGE_POSITION_OFFSET
    pos[:, text:, 0] = off
    pos[:, text:, 1] = torch.arange(side).repeat_interleave(side) + off
    pos[:, text:, 2] = torch.arange(side).repeat(side) + off
    indicator = torch.full((batch, text + image), ideogram.OUTPUT_IMAGE_INDICATOR, dtype=torch.long)
    indicator[:, :text] = ideogram.LLM_TOKEN_INDICATOR
    return {"hidden_states": hidden, "encoder_hidden_states": context, "timestep": _steps(batch, 1.0),
            "position_ids": pos, "segment_ids": torch.ones(batch, text + image, dtype=torch.long),
            "indicator": indicator}


def _krea2_positions(text: int, h: int, w: int) -> torch.Tensor:
    pos = torch.zeros(text + h * w, 3)
    pos[text:, 1] = torch.arange(h).repeat_interleave(w)
    pos[text:, 2] = torch.arange(w).repeat(h)
    return pos


def _stable_audio_rope(dim: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    return get_1d_rotary_pos_embed(dim, length, use_real=True, repeat_interleave_real=False)


def _minimax_h3_layout(text: int, audio: int, video: int) -> dict[str, Any]:
    n = text + audio + video
    text_i, audio_i, video_i = torch.arange(text), torch.arange(text, text + audio), torch.arange(text + audio, n)
    tags = torch.zeros(n, dtype=torch.long)
    tags[text_i], tags[audio_i] = 1, 2
    t_index = torch.zeros(n, dtype=torch.long)
    t_index[audio_i] = 1
    pos = torch.zeros(n, 3)
    pos[:, 0] = torch.arange(n, dtype=torch.float32)
    pos[video_i, 1] = torch.arange(video, dtype=torch.float32) % 4
    pos[video_i, 2] = torch.arange(video, dtype=torch.float32) % 2
    return {"timestep": torch.tensor([0.7, 0.3]), "timestep_indices": t_index, "token_tags": tags,
            "position_ids": pos, "video_indices": video_i, "audio_indices": audio_i, "text_indices": text_i}


def _camera(batch: int, frames: int, side: int = 8) -> torch.Tensor:
    c2w = torch.eye(4).repeat(batch, frames, 1, 1)
    c2w[..., 2, 3] = torch.arange(frames, dtype=torch.float32) * 0.1
    intrinsics = torch.tensor([float(side), float(side), side / 2, side / 2]).expand(batch, frames, 4)
    return torch.cat([c2w.flatten(start_dim=-2), intrinsics], dim=-1)


# -- the zoo ---------------------------------------------------------------------------------------
ZOO: dict[str, ZooEntry] = {
    # built-in and timm
    "dit": ZooEntry("DiT", "image", _builtin("dit-tiny"), _builtin_inputs),
    "uvit": ZooEntry("UViT", "image", _builtin("uvit-tiny"), _builtin_inputs),
    "timm-dit": ZooEntry("TimmDiT", "image", _timm_dit, _timm_inputs,
                         "timm PatchEmbed + vision_transformer.Block, timestep added to the tokens"),
    # diffusers, image
    "diffusers-dit": ZooEntry("DiTTransformer2DModel", "image", tiny_diffusers_dit, _dit_inputs),
    "pixart": ZooEntry("PixArtTransformer2DModel", "image", tiny_pixart, _pixart_inputs),
    "sana": ZooEntry("SanaTransformer2DModel", "image", _diffusers(
        "SanaTransformer2DModel", in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
        num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
        caption_channels=8, sample_size=8, patch_size=1), _sana_inputs),
    "sd3": ZooEntry("SD3Transformer2DModel", "image", _diffusers(
        "SD3Transformer2DModel", sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
        out_channels=4, pos_embed_max_size=16), _sd3_inputs),
    "sd35": ZooEntry("SD3Transformer2DModel", "image", _diffusers(
        "SD3Transformer2DModel", sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
        out_channels=4, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm"), _sd3_inputs,
        "SD3.5 layout: dual attention in block 0, RMS qk-norm"),
    "flux": ZooEntry("FluxTransformer2DModel", "image", _diffusers(
        "FluxTransformer2DModel", patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8)), _flux_inputs),
    "flux2": ZooEntry("Flux2Transformer2DModel", "image", _diffusers(
        "Flux2Transformer2DModel", patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False), _flux2_inputs),
    "chroma": ZooEntry("ChromaTransformer2DModel", "image", _diffusers(
        "ChromaTransformer2DModel", patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8),
        approximator_num_channels=8, approximator_hidden_dim=16, approximator_layers=1), _chroma_inputs),
    "auraflow": ZooEntry("AuraFlowTransformer2DModel", "image", _diffusers(
        "AuraFlowTransformer2DModel", sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1,
        num_single_dit_layers=1, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
        caption_projection_dim=16, out_channels=4, pos_embed_max_size=64), _auraflow_inputs),
    "cogview3plus": ZooEntry("CogView3PlusTransformer2DModel", "image", _diffusers(
        "CogView3PlusTransformer2DModel", patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, out_channels=4, text_embed_dim=16, time_embed_dim=8, condition_dim=2,
        pos_embed_max_size=8, sample_size=8), _cogview_inputs),
    "cogview4": ZooEntry("CogView4Transformer2DModel", "image", _diffusers(
        "CogView4Transformer2DModel", patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, out_channels=4, text_embed_dim=16, time_embed_dim=8, condition_dim=2,
        rope_axes_dim=(4, 4)), _cogview_inputs),
    "hunyuan-dit": ZooEntry("HunyuanDiT2DModel", "image", _diffusers(
        "HunyuanDiT2DModel", sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, cross_attention_dim=8, cross_attention_dim_t5=8, pooled_projection_dim=4,
        hidden_size=16, text_len=4, text_len_t5=4, activation_fn="gelu-approximate"), _hunyuan_dit_inputs),
    "lumina2": ZooEntry("Lumina2Transformer2DModel", "image", _diffusers(
        "Lumina2Transformer2DModel", sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=1,
        num_refiner_layers=1, num_attention_heads=2, num_kv_heads=2, multiple_of=16, axes_dim_rope=(4, 2, 2),
        axes_lens=(64, 64, 64), cap_feat_dim=8), _lumina2_inputs),
    "qwenimage": ZooEntry("QwenImageTransformer2DModel", "image", _diffusers(
        "QwenImageTransformer2DModel", patch_size=2, in_channels=16, out_channels=4, num_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4)),
        _qwenimage_inputs),
    # diffusers, video
    "cogvideox": ZooEntry("CogVideoXTransformer3DModel", "video", _diffusers(
        "CogVideoXTransformer3DModel", num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=5,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=8), _cogvideox_inputs),
    "latte": ZooEntry("LatteTransformer3DModel", "video", _diffusers(
        "LatteTransformer3DModel", sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8,
        num_attention_heads=2, caption_channels=8, in_channels=4, cross_attention_dim=16, out_channels=8,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, video_length=2), _latte_inputs),
    "allegro": ZooEntry("AllegroTransformer3DModel", "video", _diffusers(
        "AllegroTransformer3DModel", num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        num_layers=2, cross_attention_dim=16, sample_width=8, sample_height=8, sample_frames=8,
        caption_channels=8), _allegro_inputs),
    "hunyuan-video": ZooEntry("HunyuanVideoTransformer3DModel", "video", _diffusers(
        "HunyuanVideoTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
        attention_head_dim=8, num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
        patch_size_t=1, guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 2)), _hunyuan_video_inputs),
    "ltx": ZooEntry("LTXVideoTransformer3DModel", "video", _diffusers(
        "LTXVideoTransformer3DModel", in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
        num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, num_layers=2,
        caption_channels=16), _ltx_inputs),
    "mochi": ZooEntry("MochiTransformer3DModel", "video", _diffusers(
        "MochiTransformer3DModel", patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=4,
        max_sequence_length=16), _mochi_inputs),
    "wan": ZooEntry("WanTransformer3DModel", "video", _diffusers(
        "WanTransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
        in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32), _video_cf_inputs(16)),
    # diffusers, image (batch 2)
    "bria": ZooEntry("BriaTransformer2DModel", "image", _diffusers(
        "BriaTransformer2DModel", patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8)),
        _chroma_inputs),
    "longcat-image": ZooEntry("LongCatImageTransformer2DModel", "image", _diffusers(
        "LongCatImageTransformer2DModel", patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8)), _chroma_inputs),
    "ovis-image": ZooEntry("OvisImageTransformer2DModel", "image", _diffusers(
        "OvisImageTransformer2DModel", patch_size=1, in_channels=4, out_channels=4, num_layers=1,
        num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        axes_dims_rope=(4, 4, 8)), _chroma_inputs),
    "hidream": ZooEntry("HiDreamImageTransformer2DModel", "image", _diffusers(
        "HiDreamImageTransformer2DModel", patch_size=2, in_channels=4, out_channels=4, num_layers=1,
        num_single_layers=1, attention_head_dim=8, num_attention_heads=4, caption_channels=[8, 4], text_emb_dim=8,
        num_routed_experts=2, num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(16, 16),
        llama_layers=(0, 1), force_inference_output=True), _kw(
        hidden_states=(4, 16, 16), encoder_hidden_states_t5=(8, 8),
        encoder_hidden_states_llama3=lambda b: torch.randn(2, b, 8, 4, generator=_gen()),
        pooled_embeds=(8,), timesteps=_T(integer=True)), "mixture-of-experts MLPs (2 experts, both active)"),
    "omnigen": ZooEntry("OmniGenTransformer2DModel", "image", _diffusers(
        "OmniGenTransformer2DModel", hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, num_layers=2, pad_token_id=0, vocab_size=100, in_channels=4, time_step_dim=4,
        rope_scaling={"long_factor": list(range(1, 9)), "short_factor": list(range(1, 9))}), _kw(
        hidden_states=(4, 8, 8), timestep=_T(1.0), input_ids=lambda b: torch.arange(8).repeat(b, 1) % 10,
        input_img_latents=[], input_image_sizes={},
        attention_mask=lambda b: torch.ones(b, 8 + 1 + 16, 8 + 1 + 16),
        position_ids=lambda b: torch.arange(8 + 1 + 16).repeat(b, 1))),
    "lumina-next": ZooEntry("LuminaNextDiT2DModel", "image", _diffusers(
        "LuminaNextDiT2DModel", sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2,
        num_attention_heads=2, num_kv_heads=2, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5,
        learn_sigma=True, qk_norm=True, cross_attention_dim=16, scaling_factor=1.0), _kw(
        hidden_states=(4, 8, 8), timestep=_T(1.0), encoder_hidden_states=(8, 16), encoder_mask=_M(8),
        image_rotary_emb=lambda b: _lumina_rope(), cross_attention_kwargs={})),
    "hunyuan-image": ZooEntry("HunyuanImageTransformer2DModel", "image", _diffusers(
        "HunyuanImageTransformer2DModel", in_channels=4, out_channels=4, num_attention_heads=2,
        attention_head_dim=8, num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=(1, 1),
        guidance_embeds=False, text_embed_dim=16, rope_axes_dim=(4, 4)), _kw(
        hidden_states=(4, 4, 4), timestep=_T(), encoder_hidden_states=(8, 16),
        encoder_attention_mask=_M(8))),
    "z-image": ZooEntry("ZImageTransformer2DModel", "image", _diffusers(
        "ZImageTransformer2DModel", all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32,
        n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=16,
        axes_dims=[8, 4, 4], axes_lens=[64, 16, 16]), lambda model, batch=2: {
        "x": [torch.randn(4, 1, 8, 8, generator=_gen()) for _ in range(batch)],
        "cap_feats": [torch.randn(8, 16, generator=_gen()) for _ in range(batch)], "t": _steps(batch, 1.0)},
        "inputs are lists of per-sample tensors"),
    "transformer2d": ZooEntry("Transformer2DModel", "image", _diffusers(
        "Transformer2DModel", num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
        num_layers=2, sample_size=8, patch_size=2, norm_type="ada_norm_zero", num_embeds_ada_norm=10,
        norm_elementwise_affine=False, activation_fn="gelu-approximate"), _dit_inputs,
        "patched ada_norm_zero config (the DiT layout of the generic class)"),
    "motif-video": ZooEntry("MotifVideoTransformer3DModel", "video", _diffusers(
        "MotifVideoTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
        num_layers=1, num_single_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
        rope_axes_dim=(2, 2, 4)), _kw(
        hidden_states=(4, 2, 8, 8), timestep=_T(integer=True), encoder_hidden_states=(8, 16),
        encoder_attention_mask=_M(8))),
    "helios": ZooEntry("HeliosTransformer3DModel", "video", _diffusers(
        "HeliosTransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
        in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, rope_dim=(4, 4, 4),
        has_multi_term_memory_patch=False), _video_cf_inputs(16), "no history latents (plain text-to-video call)"),
    "prior": ZooEntry("PriorTransformer", "other", _diffusers(
        "PriorTransformer", num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=16,
        num_embeddings=7, additional_embeddings=4), _kw(
        hidden_states=(16,), timestep=_T(integer=True), proj_embedding=(16,), encoder_hidden_states=(7, 16),
        attention_mask=_M(7, torch.bool)), "unCLIP prior: denoises a CLIP image embedding, not a latent image"),
    "stable-audio": ZooEntry("StableAudioDiTModel", "audio", _diffusers(
        "StableAudioDiTModel", sample_size=16, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, num_key_value_attention_heads=2, out_channels=4, cross_attention_dim=16,
        time_proj_dim=8, global_states_input_dim=16, cross_attention_input_dim=16), _kw(
        hidden_states=(4, 16), timestep=_T(integer=True), encoder_hidden_states=(8, 16),
        global_hidden_states=(1, 16), rotary_embedding=lambda b: _stable_audio_rope(4, 17))),
    "ltx2": ZooEntry("LTX2VideoTransformer3DModel", "video", _diffusers(
        "LTX2VideoTransformer3DModel", in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
        num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, audio_in_channels=4,
        audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=8, audio_cross_attention_dim=16,
        num_layers=2, qk_norm="rms_norm_across_heads", caption_channels=16, rope_double_precision=False), _kw(
        hidden_states=(2 * 4 * 4, 4), audio_hidden_states=(5, 4), encoder_hidden_states=(8, 16),
        audio_encoder_hidden_states=(8, 16), timestep=_T(), encoder_attention_mask=_M(8, torch.bool),
        num_frames=2, height=4, width=4, audio_num_frames=5, fps=25.0), "joint video and audio streams"),
    "kandinsky6": ZooEntry("Kandinsky6Transformer3DModel", "video", _diffusers(
        "Kandinsky6Transformer3DModel", in_visual_dim=4, out_visual_dim=4, in_text_dim=8, in_text_dim2=8,
        time_dim=16, patch_size=(1, 2, 2), model_dim=48, ff_dim=64, num_text_blocks=1, num_visual_blocks=2,
        axes_dims=(4, 4, 4), visual_cond=False, in_audio_dim=4, out_audio_dim=4), _kw(
        hidden_states=lambda b: torch.randn(b, 2, 8, 8, 4, generator=_gen()), encoder_hidden_states=(6, 8),
        pooled_projections=(8,), timestep=_T())),
    "wan-animate": ZooEntry("WanAnimateTransformer3DModel", "video", _diffusers(
        "WanAnimateTransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
        in_channels=12, latent_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
        image_dim=16, rope_max_seq_len=32, motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16},
        motion_encoder_size=16, motion_style_dim=8, motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16,
        face_encoder_num_heads=2, inject_face_latents_blocks=2), _kw(
        hidden_states=(12, 21, 4, 4), timestep=_T(integer=True), encoder_hidden_states=(8, 16),
        encoder_hidden_states_image=(4, 16), pose_hidden_states=(4, 20, 4, 4), face_pixel_values=(3, 77, 16, 16)),
        "motion and face encoders at their smallest"),
    "minimax-h3": ZooEntry("MiniMaxH3Transformer3DModel", "video", _diffusers(
        "MiniMaxH3Transformer3DModel", num_attention_heads=2, attention_head_dim=16, hidden_size=24, num_layers=2,
        num_refiner_layers=1, ffn_dim=32, in_channels=4, audio_in_channels=6, patch_size=(1, 2, 2), text_dim=8,
        freq_dim=8, time_embed_hidden_dim=24, time_embed_dim=16, rope_freq_dim=2), lambda model, batch=2: {
        **_kw(hidden_states=(8, 16), audio_hidden_states=(6, 6), encoder_hidden_states=(4, 8))(model, batch),
        **_minimax_h3_layout(4, 6, 8)}, "one packed text+audio+video sequence; timesteps per row group, not per sample"),
    "sana-wm": ZooEntry("SanaWMTransformer3DModel", "video", _diffusers(
        "SanaWMTransformer3DModel", in_channels=4, num_layers=2, hidden_size=32, num_attention_heads=2,
        patch_size=(1, 1, 1), softmax_every_n=2, linear_head_dim=16, t_kernel_size=3, conv_kernel_size=4,
        caption_channels=8, mlp_ratio=2.0, chunk_plucker_channels=8, chunk_plucker_post_attn_blocks=2), _kw(
        hidden_states=(4, 4, 8, 8), timestep=lambda b: _steps(b)[:, None, None].repeat(1, 1, 4),
        encoder_hidden_states=(1, 16, 8), encoder_attention_mask=_M(16), camera_conditions=lambda b: _camera(b, 4),
        chunk_plucker=(8, 4, 8, 8)), "camera-controlled world model: linear (GDN) and softmax attention blocks"),
    "sana-wm-refiner": ZooEntry("SanaWMLTX2RefinerTransformer3DModel", "video", _diffusers(
        "SanaWMLTX2RefinerTransformer3DModel", in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
        num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, audio_in_channels=4,
        audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=8, audio_cross_attention_dim=16,
        num_layers=2, qk_norm="rms_norm_across_heads", caption_channels=16, rope_double_precision=False),
        lambda model, batch=2: {
            **_kw(hidden_states=(32, 4), encoder_hidden_states=(8, 16), encoder_attention_mask=_M(8, torch.float32))(
                model, batch),
            "timestep": _steps(batch)[:, None].repeat(1, 32),
            "video_rotary_emb": model.build_rotary_emb_for_absolute_positions(
                batch_size=batch, frame_positions=[0, 1], height=4, width=4, device=torch.device("cpu"), fps=24.0)},
        "per-token timesteps (B, tokens), the same for every token of a sample"),
    "kandinsky6-sr": ZooEntry("Kandinsky6SRTransformer3DModel", "video", _diffusers(
        "Kandinsky6SRTransformer3DModel", in_visual_dim=4, out_visual_dim=8, time_dim=16, patch_size=(1, 2, 2),
        model_dim=24, ff_dim=32, num_visual_blocks=2, axes_dims=(4, 4, 4)), _kw(
        hidden_states=lambda b: torch.randn(b, 2, 16, 16, 9, generator=_gen()), timestep=_T()),
        "video super-resolution; sparse (nabla) flex attention"),
    # diffusers, image (batch 3)
    "ernie-image": ZooEntry("ErnieImageTransformer2DModel", "image", _diffusers(
        "ErnieImageTransformer2DModel", hidden_size=32, num_attention_heads=2, num_layers=2, ffn_hidden_size=64,
        in_channels=4, out_channels=4, patch_size=1, text_in_dim=16, rope_axes_dim=(8, 4, 4),
        qk_layernorm=True), _kw(
        hidden_states=(4, 4, 4), timestep=_T(), text_bth=(8, 16), text_lens=lambda b: torch.full((b,), 8))),
    "ideogram4": ZooEntry("Ideogram4Transformer2DModel", "image", _diffusers(
        "Ideogram4Transformer2DModel", in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        intermediate_size=32, adaln_dim=16, llm_features_dim=24, rope_theta=10_000, mrope_section=(2, 1, 1)),
        lambda model, batch=2: _ideogram4_inputs(batch), "text and image tokens in one sequence"),
    "krea2": ZooEntry("Krea2Transformer2DModel", "image", _diffusers(
        "Krea2Transformer2DModel", in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=32, timestep_embed_dim=8, text_hidden_dim=16, num_text_layers=3,
        text_num_attention_heads=2, text_num_key_value_heads=1, text_intermediate_size=16,
        num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 2, 2)), _kw(
        hidden_states=(16, 16), encoder_hidden_states=(4, 3, 16), timestep=_T(1.0),
        position_ids=lambda b: _krea2_positions(4, 4, 4), encoder_attention_mask=_M(4, torch.bool)),
        "grouped-query attention (4 heads, 2 key/value heads)"),
    "glm-image": ZooEntry("GlmImageTransformer2DModel", "image", _diffusers(
        "GlmImageTransformer2DModel", patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, text_embed_dim=32, time_embed_dim=16, condition_dim=8,
        prior_vq_quantizer_codebook_size=64), _kw(
        hidden_states=(4, 8, 8), encoder_hidden_states=(8, 32),
        prior_token_id=lambda b: (torch.arange(16)[None] + torch.arange(b)[:, None]) % 64,
        prior_token_drop=lambda b: torch.zeros(b, dtype=torch.bool), timestep=_T(integer=True),
        target_size=lambda b: torch.tensor([[8.0, 8.0]] * b), crop_coords=lambda b: torch.zeros(b, 2))),
    "qwenimage21": ZooEntry("QwenImage21Transformer2DModel", "image", _diffusers(
        "QwenImage21Transformer2DModel", patch_size=1, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=16, num_attention_heads=2, context_in_dim=8, mlp_ratio=2, axes_dims_rope=(4, 6, 6)),
        _kw(hidden_states=(16, 4), encoder_hidden_states=(4, 8), encoder_hidden_states_mask=_M(4),
            timestep=_T(1.0), img_shapes=lambda b: [[(1, 4, 4)]] * b,
            img_mask=lambda b: torch.tensor([[False] * 4 + [True] * 4] * b)),
        "block-causal attention over text, condition and target tokens"),
    "flux3": ZooEntry("Flux3Transformer2DModel", "image", _diffusers(
        "Flux3Transformer2DModel", in_channels=4, cond_in_channels=4, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, timestep_channels=256,
        axes_dims_rope=(4, 4, 4, 4)), lambda model, batch=2: {
        k: (v[0] if k.endswith("_ids") else v) for k, v in _flux2_inputs(model, batch).items()}),
    "bria-fibo": ZooEntry("BriaFiboTransformer2DModel", "image", _diffusers(
        "BriaFiboTransformer2DModel", patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8),
        text_encoder_dim=16), lambda model, batch=2: {
        **_chroma_inputs(model, batch), "text_encoder_layers": [torch.randn(batch, 8, 16, generator=_gen())] * 2}),
    "prx": ZooEntry("PRXTransformer2DModel", "image", _diffusers(
        "PRXTransformer2DModel", in_channels=4, patch_size=2, context_in_dim=16, hidden_size=32, mlp_ratio=2.0,
        num_heads=2, depth=2, axes_dim=[8, 8]), _kw(
        hidden_states=(4, 8, 8), timestep=_T(1.0), encoder_hidden_states=(8, 16))),
    "nucleus-moe-image": ZooEntry("NucleusMoEImageTransformer2DModel", "image", _diffusers(
        "NucleusMoEImageTransformer2DModel", patch_size=2, in_channels=16, out_channels=4, num_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
        num_experts=4, moe_intermediate_dim=16, dense_moe_strategy="leave_first_three_and_last_block_dense"),
        _kw(hidden_states=(16, 16), img_shapes=lambda b: [(1, 4, 4)] * b, encoder_hidden_states=(8, 16),
            encoder_hidden_states_mask=_M(8), timestep=_T(1.0)), "mixture-of-experts MLPs"),
    "dreamlite": ZooEntry("DreamLiteTransformer2DModel", "image", _diffusers(
        "DreamLiteTransformer2DModel", num_attention_heads=2, attention_head_dim=8, in_channels=16, out_channels=16,
        num_layers=1, norm_num_groups=4, cross_attention_dim=16), _kw(
        hidden_states=(16, 4, 4), encoder_hidden_states=(8, 16), timestep=_T(integer=True)),
        "a U-Net transformer block (continuous input, no timestep conditioning inside)"),
    "joyimage-edit": ZooEntry("JoyImageEditTransformer3DModel", "image", _diffusers(
        "JoyImageEditTransformer3DModel", patch_size=[1, 2, 2], in_channels=4, hidden_size=32, num_attention_heads=2,
        text_dim=16, num_layers=2, rope_dim_list=[4, 6, 6]), _kw(
        hidden_states=(4, 1, 8, 8), timestep=_T(), encoder_hidden_states=(8, 16))),
    "joyimage-edit-plus": ZooEntry("JoyImageEditPlusTransformer3DModel", "image", _diffusers(
        "JoyImageEditPlusTransformer3DModel", patch_size=[1, 2, 2], in_channels=4, hidden_size=32,
        num_attention_heads=2, text_dim=16, num_layers=2, rope_dim_list=[4, 6, 6]), _kw(
        hidden_states=(16, 4, 1, 2, 2), timestep=_T(), encoder_hidden_states=(8, 16),
        encoder_hidden_states_mask=_M(8), shape_list=lambda b: [[(1, 4, 4)]] * b),
        "inputs are patchified: (B, patches, C, pt, ph, pw)"),
    "bria-fibo2": ZooEntry("BriaFibo2Transformer2DModel", "image", _diffusers(
        "BriaFibo2Transformer2DModel", in_channels=4, patch_size=2, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, cap_feat_dim=24, injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=4,
        max_num_gist_tokens=8, gist_step=4, gist_min_text_len=4, gist_max_text_len=16, axes_dims=(4, 6, 6),
        axes_lens=(16, 16, 16)), _kw(hidden_states=(4, 8, 8), timestep=_T(1.0), encoder_hidden_states=(2, 6, 24)),
        "Perceiver text compression into gist tokens, text injection blocks"),
    # diffusers, video (batch 2)
    "skyreels-v2": ZooEntry("SkyReelsV2Transformer3DModel", "video", _diffusers(
        "SkyReelsV2Transformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
        in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
        rope_max_seq_len=32), _video_cf_inputs(16)),
    "chronoedit": ZooEntry("ChronoEditTransformer3DModel", "video", _diffusers(
        "ChronoEditTransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
        in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
        rope_max_seq_len=32), _video_cf_inputs(16)),
    "wan-vace": ZooEntry("WanVACETransformer3DModel", "video", _diffusers(
        "WanVACETransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
        in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
        rope_max_seq_len=32, vace_layers=[0], vace_in_channels=8), _kw(
        hidden_states=(4, 2, 8, 8), encoder_hidden_states=(8, 16), timestep=_T(integer=True),
        control_hidden_states=(8, 2, 8, 8), control_hidden_states_scale=lambda b: torch.ones(1))),
    "anyflow": ZooEntry("AnyFlowTransformer3DModel", "video", _diffusers(
        "AnyFlowTransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
        in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
        rope_max_seq_len=32), _kw(
        hidden_states=(2, 4, 8, 8), timestep=lambda b: _steps(b)[:, None].repeat(1, 2),
        r_timestep=lambda b: _steps(b)[:, None].repeat(1, 2) * 0.5,
        encoder_hidden_states=(8, 16))),
    "anyflow-far": ZooEntry("AnyFlowFARTransformer3DModel", "video", _diffusers(
        "AnyFlowFARTransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
        in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
        chunk_partition=(1, 1)), _kw(
        hidden_states=(2, 4, 8, 8), timestep=lambda b: _steps(b)[:, None].repeat(1, 2),
        r_timestep=lambda b: _steps(b)[:, None].repeat(1, 2) * 0.5, encoder_hidden_states=(8, 16),
        chunk_partition=[1, 1]), "frame-autoregressive without a KV cache; flex attention (compiled on the first call)"),
    "sana-video": ZooEntry("SanaVideoTransformer3DModel", "video", _diffusers(
        "SanaVideoTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
        num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
        caption_channels=8, sample_size=8, patch_size=(1, 2, 2), rope_max_seq_len=32), _kw(
        hidden_states=(4, 2, 8, 8), encoder_hidden_states=(8, 8), timestep=_T(integer=True))),
    "hunyuan-video15": ZooEntry("HunyuanVideo15Transformer3DModel", "video", _diffusers(
        "HunyuanVideo15Transformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
        attention_head_dim=8, num_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1,
        text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16,
        task_type="t2v"), _kw(
        hidden_states=(4, 1, 8, 8), timestep=_T(), encoder_hidden_states=(6, 16), encoder_hidden_states_2=(4, 8),
        encoder_attention_mask=_M(6, torch.float32), encoder_attention_mask_2=_M(4, torch.float32),
        image_embeds=_Z(3, 12))),
    "hunyuan-video-framepack": ZooEntry("HunyuanVideoFramepackTransformer3DModel", "video", _diffusers(
        "HunyuanVideoFramepackTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
        attention_head_dim=8, num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
        patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 2),
        image_condition_type=None, has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True), _kw(
        hidden_states=(4, 2, 8, 8), timestep=_T(integer=True), encoder_hidden_states=(8, 16),
        encoder_attention_mask=_M(8), pooled_projections=(8,), image_embeds=(4, 16),
        indices_latents=lambda b: torch.arange(2), guidance=lambda b: torch.full((b,), 3500.0),
        latents_clean=(4, 1, 8, 8), indices_latents_clean=lambda b: torch.arange(1),
        latents_history_2x=(4, 1, 8, 8), indices_latents_history_2x=lambda b: torch.arange(1),
        latents_history_4x=(4, 4, 8, 8), indices_latents_history_4x=lambda b: torch.arange(4))),
    "cosmos": ZooEntry("CosmosTransformer3DModel", "video", _diffusers(
        "CosmosTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12,
        num_layers=2, mlp_ratio=2, text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32),
        patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=True,
        extra_pos_embed_type="learnable"), _kw(
        hidden_states=(4, 2, 8, 8), timestep=_T(integer=True), encoder_hidden_states=(8, 16),
        attention_mask=_M(8, torch.float32), fps=30, padding_mask=lambda b: torch.zeros(1, 1, 8, 8))),
    "easyanimate": ZooEntry("EasyAnimateTransformer3DModel", "video", _diffusers(
        "EasyAnimateTransformer3DModel", attention_head_dim=16, num_attention_heads=2, in_channels=4, mmdit_layers=2,
        num_layers=2, out_channels=4, patch_size=2, sample_height=8, sample_width=8, text_embed_dim=16,
        time_embed_dim=8, time_position_encoding_type="3d_rope"), _kw(
        hidden_states=(4, 2, 8, 8), timestep=_T(integer=True), encoder_hidden_states=(8, 16))),
    "consisid": ZooEntry("ConsisIDTransformer3DModel", "video", _diffusers(
        "ConsisIDTransformer3DModel", num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=5,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=8, is_train_face=False), _cogvideox_inputs,
        "no face branch (is_train_face=False): the CogVideoX backbone"),
    "kandinsky5": ZooEntry("Kandinsky5Transformer3DModel", "video", _diffusers(
        "Kandinsky5Transformer3DModel", in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16,
        out_visual_dim=4, patch_size=(1, 2, 2), model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2,
        axes_dims=(4, 6, 6)), _kw(
        hidden_states=lambda b: torch.randn(b, 2, 8, 8, 4, generator=_gen()), encoder_hidden_states=(8, 16),
        timestep=_T(), pooled_projections=(8,),
        visual_rope_pos=lambda b: (torch.arange(2), torch.arange(4), torch.arange(4)),
        text_rope_pos=lambda b: torch.arange(8))),
    # diffusers, audio
    "stable-audio3": ZooEntry("StableAudio3DiTModel", "audio", _diffusers(
        "StableAudio3DiTModel", io_channels=8, patch_size=1, embed_dim=32, depth=2, num_heads=2, cond_token_dim=16,
        global_cond_dim=16, local_add_cond_dim=4, timestep_features_dim=16, num_memory_tokens=4), _kw(
        hidden_states=(8, 16), timestep=_T(1.0), encoder_hidden_states=(8, 16), global_hidden_states=(16,)),
        "differential attention, memory tokens"),
    "minimax-music3": ZooEntry("MiniMaxMusic3Transformer1DModel", "audio", _diffusers(
        "MiniMaxMusic3Transformer1DModel", in_channels=8, condition_dim=16, num_layers=2, num_attention_heads=2,
        attention_head_dim=8, ff_inner_dim=32, rotary_dim=8, fourier_embedding_dim=16), _kw(
        hidden_states=(8, 16), timestep=_T(1.0), encoder_hidden_states=(16, 16))),
    "longcat-audio": ZooEntry("LongCatAudioDiTTransformer", "audio", _diffusers(
        "LongCatAudioDiTTransformer", dit_dim=32, dit_depth=2, dit_heads=2, dit_text_dim=16, latent_dim=8), _kw(
        hidden_states=(16, 8), encoder_hidden_states=(8, 16), encoder_attention_mask=_M(8, torch.bool),
        timestep=_T(1.0))),
    "ace-step": ZooEntry("AceStepTransformer1DModel", "audio", _diffusers(
        "AceStepTransformer1DModel", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, in_channels=24, audio_acoustic_hidden_dim=8,
        patch_size=2, sliding_window=4, encoder_hidden_size=16), _kw(
        hidden_states=(16, 8), timestep=_T(1.0), timestep_r=_T(0.5), encoder_hidden_states=(8, 16),
        context_latents=(16, 16))),
    # diffusers, other denoisers and building blocks
    "dual-transformer2d": ZooEntry("DualTransformer2DModel", "other", _diffusers(
        "DualTransformer2DModel", num_attention_heads=2, attention_head_dim=8, in_channels=16, num_layers=1,
        norm_num_groups=4, cross_attention_dim=16), _kw(
        hidden_states=(16, 4, 4), encoder_hidden_states=(77 + 257, 16), timestep=_T(integer=True)),
        "Versatile Diffusion's pair of Transformer2DModels (text 77 + image 257 condition tokens)"),
    "t5-film": ZooEntry("T5FilmDecoder", "audio", _diffusers(
        "T5FilmDecoder", input_dims=8, targets_length=16, d_model=32, num_layers=2, num_heads=2, d_kv=8, d_ff=64,
        dropout_rate=0.0), lambda model, batch=2: {
        "encodings_and_masks": [(torch.randn(batch, 8, 32, generator=_gen()), torch.ones(batch, 8, dtype=torch.bool))],
        "decoder_input_tokens": torch.randn(batch, 16, 8, generator=_gen()), "decoder_noise_time": _steps(batch, 1.0)},
        "spectrogram diffusion decoder (music)"),
}
"""Zoo name -> :class:`ZooEntry`."""

ZOO_EXCLUDED: dict[str, str] = {
    "TransformerTemporalModel": (
        "not a denoiser on its own: the temporal layer of video U-Nets, called without a timestep"
    ),
    "Cosmos3OmniTransformer": (
        "not attempted yet: an omni (text, vision, sound, action) generator whose forward takes packed sequences, per-modality index tensors and token lists built by its pipeline"
    ),
    "MiniMaxMusic3RVQDepthDecoder": (
        "not a denoiser: the autoregressive codebook-depth decoder of a music tokenizer (inputs_embeds only, no timestep)"
    ),
    "RFD4ProteinaTransformer": (
        "protein structure generator, not image/video: a pair representation and a dozen structural feature tensors; not attempted"
    ),
    "WanAnimate2Transformer3DModel": (
        "its denoising call reads a KV cache that a separate reference call (kv_cache_mode='extract') must fill first: a two-call protocol with state between calls, not one call that can be captured and converted"
    ),
}
"""diffusers class name -> why it has no zoo entry (cannot be built or run here)."""


def zoo_names(family: str | None = None) -> list[str]:
    """Names of the zoo entries, in registry order (only those of ``family`` when given)."""
    return [k for k, e in ZOO.items() if family is None or e.family == family]
