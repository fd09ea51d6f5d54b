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
        import diffusers

        torch.manual_seed(seed)
        model = getattr(diffusers, class_name)(**config)
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
}
"""Zoo name -> :class:`ZooEntry`."""

ZOO_EXCLUDED: dict[str, str] = {
    "AceStepTransformer1DModel": "pending: no tiny config in the zoo yet",
    "AnyFlowFARTransformer3DModel": "pending: no tiny config in the zoo yet",
    "AnyFlowTransformer3DModel": "pending: no tiny config in the zoo yet",
    "BriaFibo2Transformer2DModel": "pending: no tiny config in the zoo yet",
    "BriaFiboTransformer2DModel": "pending: no tiny config in the zoo yet",
    "BriaTransformer2DModel": "pending: no tiny config in the zoo yet",
    "ChronoEditTransformer3DModel": "pending: no tiny config in the zoo yet",
    "ConsisIDTransformer3DModel": "pending: no tiny config in the zoo yet",
    "Cosmos3OmniTransformer": "pending: no tiny config in the zoo yet",
    "CosmosTransformer3DModel": "pending: no tiny config in the zoo yet",
    "DreamLiteTransformer2DModel": "pending: no tiny config in the zoo yet",
    "DualTransformer2DModel": "pending: no tiny config in the zoo yet",
    "EasyAnimateTransformer3DModel": "pending: no tiny config in the zoo yet",
    "ErnieImageTransformer2DModel": "pending: no tiny config in the zoo yet",
    "Flux3Transformer2DModel": "pending: no tiny config in the zoo yet",
    "GlmImageTransformer2DModel": "pending: no tiny config in the zoo yet",
    "HeliosTransformer3DModel": "pending: no tiny config in the zoo yet",
    "HiDreamImageTransformer2DModel": "pending: no tiny config in the zoo yet",
    "HunyuanImageTransformer2DModel": "pending: no tiny config in the zoo yet",
    "HunyuanVideo15Transformer3DModel": "pending: no tiny config in the zoo yet",
    "HunyuanVideoFramepackTransformer3DModel": "pending: no tiny config in the zoo yet",
    "Ideogram4Transformer2DModel": "pending: no tiny config in the zoo yet",
    "JoyImageEditPlusTransformer3DModel": "pending: no tiny config in the zoo yet",
    "JoyImageEditTransformer3DModel": "pending: no tiny config in the zoo yet",
    "Kandinsky5Transformer3DModel": "pending: no tiny config in the zoo yet",
    "Kandinsky6SRTransformer3DModel": "pending: no tiny config in the zoo yet",
    "Kandinsky6Transformer3DModel": "pending: no tiny config in the zoo yet",
    "Krea2Transformer2DModel": "pending: no tiny config in the zoo yet",
    "LTX2VideoTransformer3DModel": "pending: no tiny config in the zoo yet",
    "LongCatAudioDiTTransformer": "pending: no tiny config in the zoo yet",
    "LongCatImageTransformer2DModel": "pending: no tiny config in the zoo yet",
    "LuminaNextDiT2DModel": "pending: no tiny config in the zoo yet",
    "MiniMaxH3Transformer3DModel": "pending: no tiny config in the zoo yet",
    "MiniMaxMusic3RVQDepthDecoder": "pending: no tiny config in the zoo yet",
    "MiniMaxMusic3Transformer1DModel": "pending: no tiny config in the zoo yet",
    "MotifVideoTransformer3DModel": "pending: no tiny config in the zoo yet",
    "NucleusMoEImageTransformer2DModel": "pending: no tiny config in the zoo yet",
    "OmniGenTransformer2DModel": "pending: no tiny config in the zoo yet",
    "OvisImageTransformer2DModel": "pending: no tiny config in the zoo yet",
    "PRXTransformer2DModel": "pending: no tiny config in the zoo yet",
    "PriorTransformer": "pending: no tiny config in the zoo yet",
    "QwenImage21Transformer2DModel": "pending: no tiny config in the zoo yet",
    "RFD4ProteinaTransformer": "pending: no tiny config in the zoo yet",
    "SanaVideoTransformer3DModel": "pending: no tiny config in the zoo yet",
    "SanaWMLTX2RefinerTransformer3DModel": "pending: no tiny config in the zoo yet",
    "SanaWMTransformer3DModel": "pending: no tiny config in the zoo yet",
    "SkyReelsV2Transformer3DModel": "pending: no tiny config in the zoo yet",
    "StableAudio3DiTModel": "pending: no tiny config in the zoo yet",
    "StableAudioDiTModel": "pending: no tiny config in the zoo yet",
    "T5FilmDecoder": "pending: no tiny config in the zoo yet",
    "Transformer2DModel": "pending: no tiny config in the zoo yet",
    "TransformerTemporalModel": "pending: no tiny config in the zoo yet",
    "WanAnimate2Transformer3DModel": "pending: no tiny config in the zoo yet",
    "WanAnimateTransformer3DModel": "pending: no tiny config in the zoo yet",
    "WanVACETransformer3DModel": "pending: no tiny config in the zoo yet",
    "ZImageTransformer2DModel": "pending: no tiny config in the zoo yet",
}
"""diffusers class name -> why it has no zoo entry (cannot be built or run here)."""


def zoo_names(family: str | None = None) -> list[str]:
    """Names of the zoo entries, in registry order (only those of ``family`` when given)."""
    return [k for k, e in ZOO.items() if family is None or e.family == family]
