"""Video entries of the zoo: diffusers' video transformers."""

from __future__ import annotations

import torch

from dynconvert.testing.zoo.builders import (
    M,
    T,
    Z,
    ZooEntry,
    diffusers,
    gen,
    kw,
    steps,
)
from dynconvert.testing.zoo.inputs import (
    allegro_inputs,
    cogvideox_inputs,
    hunyuan_video_inputs,
    latte_inputs,
    ltx_inputs,
    mochi_inputs,
    video_cf_inputs,
)

# A table: one entry per model, kept dense.
# fmt: off
VIDEO: dict[str, ZooEntry] = {
    # diffusers, video
    "cogvideox": ZooEntry("CogVideoXTransformer3DModel", "video", diffusers(
        "CogVideoXTransformer3DModel", num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=5,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=8), cogvideox_inputs),
    "latte": ZooEntry("LatteTransformer3DModel", "video", diffusers(
        "LatteTransformer3DModel", sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8,
        num_attention_heads=2, caption_channels=8, in_channels=4, cross_attention_dim=16, out_channels=8,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, video_length=2), latte_inputs),
    "allegro": ZooEntry("AllegroTransformer3DModel", "video", diffusers(
        "AllegroTransformer3DModel", num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        num_layers=2, cross_attention_dim=16, sample_width=8, sample_height=8, sample_frames=8,
        caption_channels=8), allegro_inputs),
    "hunyuan-video": ZooEntry("HunyuanVideoTransformer3DModel", "video", diffusers(
        "HunyuanVideoTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
        attention_head_dim=8, num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
        patch_size_t=1, guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 2)), hunyuan_video_inputs),
    "ltx": ZooEntry("LTXVideoTransformer3DModel", "video", diffusers(
        "LTXVideoTransformer3DModel", in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
        num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, num_layers=2,
        caption_channels=16), ltx_inputs),
    "mochi": ZooEntry("MochiTransformer3DModel", "video", diffusers(
        "MochiTransformer3DModel", patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=4,
        max_sequence_length=16), mochi_inputs),
    "wan": ZooEntry("WanTransformer3DModel", "video", diffusers(
        "WanTransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
        in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32), video_cf_inputs(16)),
    # diffusers, video (batch 2)
    "skyreels-v2": ZooEntry("SkyReelsV2Transformer3DModel", "video", diffusers(
        "SkyReelsV2Transformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
        in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
        rope_max_seq_len=32), video_cf_inputs(16)),
    "chronoedit": ZooEntry("ChronoEditTransformer3DModel", "video", diffusers(
        "ChronoEditTransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
        in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
        rope_max_seq_len=32), video_cf_inputs(16)),
    "wan-vace": ZooEntry("WanVACETransformer3DModel", "video", diffusers(
        "WanVACETransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
        in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
        rope_max_seq_len=32, vace_layers=[0], vace_in_channels=8), kw(
        hidden_states=(4, 2, 8, 8), encoder_hidden_states=(8, 16), timestep=T(integer=True),
        control_hidden_states=(8, 2, 8, 8), control_hidden_states_scale=lambda b: torch.ones(1))),
    "anyflow": ZooEntry("AnyFlowTransformer3DModel", "video", diffusers(
        "AnyFlowTransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
        in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
        rope_max_seq_len=32), kw(
        hidden_states=(2, 4, 8, 8), timestep=lambda b: steps(b)[:, None].repeat(1, 2),
        r_timestep=lambda b: steps(b)[:, None].repeat(1, 2) * 0.5,
        encoder_hidden_states=(8, 16))),
    "anyflow-far": ZooEntry("AnyFlowFARTransformer3DModel", "video", diffusers(
        "AnyFlowFARTransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
        in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
        chunk_partition=(1, 1)), kw(
        hidden_states=(2, 4, 8, 8), timestep=lambda b: steps(b)[:, None].repeat(1, 2),
        r_timestep=lambda b: steps(b)[:, None].repeat(1, 2) * 0.5, encoder_hidden_states=(8, 16),
        chunk_partition=[1, 1]), "frame-autoregressive without a KV cache; flex attention (compiled on the first call)"),
    "sana-video": ZooEntry("SanaVideoTransformer3DModel", "video", diffusers(
        "SanaVideoTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
        num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
        caption_channels=8, sample_size=8, patch_size=(1, 2, 2), rope_max_seq_len=32), kw(
        hidden_states=(4, 2, 8, 8), encoder_hidden_states=(8, 8), timestep=T(integer=True))),
    "hunyuan-video15": ZooEntry("HunyuanVideo15Transformer3DModel", "video", diffusers(
        "HunyuanVideo15Transformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
        attention_head_dim=8, num_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1,
        text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16,
        task_type="t2v"), kw(
        hidden_states=(4, 1, 8, 8), timestep=T(), encoder_hidden_states=(6, 16), encoder_hidden_states_2=(4, 8),
        encoder_attention_mask=M(6, torch.float32), encoder_attention_mask_2=M(4, torch.float32),
        image_embeds=Z(3, 12))),
    "hunyuan-video-framepack": ZooEntry("HunyuanVideoFramepackTransformer3DModel", "video", diffusers(
        "HunyuanVideoFramepackTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
        attention_head_dim=8, num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
        patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 2),
        image_condition_type=None, has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True), kw(
        hidden_states=(4, 2, 8, 8), timestep=T(integer=True), encoder_hidden_states=(8, 16),
        encoder_attention_mask=M(8), pooled_projections=(8,), image_embeds=(4, 16),
        indices_latents=lambda b: torch.arange(2), guidance=lambda b: torch.full((b,), 3500.0),
        latents_clean=(4, 1, 8, 8), indices_latents_clean=lambda b: torch.arange(1),
        latents_history_2x=(4, 1, 8, 8), indices_latents_history_2x=lambda b: torch.arange(1),
        latents_history_4x=(4, 4, 8, 8), indices_latents_history_4x=lambda b: torch.arange(4))),
    "cosmos": ZooEntry("CosmosTransformer3DModel", "video", diffusers(
        "CosmosTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12,
        num_layers=2, mlp_ratio=2, text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32),
        patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=True,
        extra_pos_embed_type="learnable"), kw(
        hidden_states=(4, 2, 8, 8), timestep=T(integer=True), encoder_hidden_states=(8, 16),
        attention_mask=M(8, torch.float32), fps=30, padding_mask=lambda b: torch.zeros(1, 1, 8, 8))),
    "easyanimate": ZooEntry("EasyAnimateTransformer3DModel", "video", diffusers(
        "EasyAnimateTransformer3DModel", attention_head_dim=16, num_attention_heads=2, in_channels=4, mmdit_layers=2,
        num_layers=2, out_channels=4, patch_size=2, sample_height=8, sample_width=8, text_embed_dim=16,
        time_embed_dim=8, time_position_encoding_type="3d_rope"), kw(
        hidden_states=(4, 2, 8, 8), timestep=T(integer=True), encoder_hidden_states=(8, 16))),
    "consisid": ZooEntry("ConsisIDTransformer3DModel", "video", diffusers(
        "ConsisIDTransformer3DModel", num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=5,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=8, is_train_face=False), cogvideox_inputs,
        "no face branch (is_train_face=False): the CogVideoX backbone"),
    "kandinsky5": ZooEntry("Kandinsky5Transformer3DModel", "video", diffusers(
        "Kandinsky5Transformer3DModel", in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16,
        out_visual_dim=4, patch_size=(1, 2, 2), model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2,
        axes_dims=(4, 6, 6)), kw(
        hidden_states=lambda b: torch.randn(b, 2, 8, 8, 4, generator=gen()), encoder_hidden_states=(8, 16),
        timestep=T(), pooled_projections=(8,),
        visual_rope_pos=lambda b: (torch.arange(2), torch.arange(4), torch.arange(4)),
        text_rope_pos=lambda b: torch.arange(8))),
}
# fmt: on
