"""Image entries of the zoo: the built-in DiT and U-ViT, a timm DiT, and diffusers' image
transformers."""

from __future__ import annotations

import torch

from dynconvert.models.tiny import tiny_diffusers_dit, tiny_pixart
from dynconvert.testing.zoo.builders import (
    M,
    T,
    ZooEntry,
    builtin,
    builtin_inputs,
    diffusers,
    gen,
    kw,
    steps,
    timm_dit,
    timm_inputs,
)
from dynconvert.testing.zoo.inputs import (
    auraflow_inputs,
    camera,
    chroma_inputs,
    cogview_inputs,
    dit_inputs,
    flux2_inputs,
    flux_inputs,
    hunyuan_dit_inputs,
    ideogram4_inputs,
    krea2_positions,
    lumina2_inputs,
    lumina_rope,
    minimax_h3_layout,
    pixart_inputs,
    qwenimage_inputs,
    sana_inputs,
    sd3_inputs,
    stable_audio_rope,
    video_cf_inputs,
)

# A table: one entry per model, kept dense.
# fmt: off
IMAGE: dict[str, ZooEntry] = {
    # built-in and timm
    "dit": ZooEntry("DiT", "image", builtin("dit-tiny"), builtin_inputs),
    "uvit": ZooEntry("UViT", "image", builtin("uvit-tiny"), builtin_inputs),
    "timm-dit": ZooEntry("TimmDiT", "image", timm_dit, timm_inputs,
                         "timm PatchEmbed + vision_transformer.Block, timestep added to the tokens"),
    # diffusers, image
    "diffusers-dit": ZooEntry("DiTTransformer2DModel", "image", tiny_diffusers_dit, dit_inputs),
    "pixart": ZooEntry("PixArtTransformer2DModel", "image", tiny_pixart, pixart_inputs),
    "sana": ZooEntry("SanaTransformer2DModel", "image", diffusers(
        "SanaTransformer2DModel", in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
        num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
        caption_channels=8, sample_size=8, patch_size=1), sana_inputs),
    "sd3": ZooEntry("SD3Transformer2DModel", "image", diffusers(
        "SD3Transformer2DModel", sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
        out_channels=4, pos_embed_max_size=16), sd3_inputs),
    "sd35": ZooEntry("SD3Transformer2DModel", "image", diffusers(
        "SD3Transformer2DModel", sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
        out_channels=4, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm"), sd3_inputs,
        "SD3.5 layout: dual attention in block 0, RMS qk-norm"),
    "flux": ZooEntry("FluxTransformer2DModel", "image", diffusers(
        "FluxTransformer2DModel", patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8)), flux_inputs),
    "flux2": ZooEntry("Flux2Transformer2DModel", "image", diffusers(
        "Flux2Transformer2DModel", patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False), flux2_inputs),
    "chroma": ZooEntry("ChromaTransformer2DModel", "image", diffusers(
        "ChromaTransformer2DModel", patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8),
        approximator_num_channels=8, approximator_hidden_dim=16, approximator_layers=1), chroma_inputs),
    "auraflow": ZooEntry("AuraFlowTransformer2DModel", "image", diffusers(
        "AuraFlowTransformer2DModel", sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1,
        num_single_dit_layers=1, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
        caption_projection_dim=16, out_channels=4, pos_embed_max_size=64), auraflow_inputs),
    "cogview3plus": ZooEntry("CogView3PlusTransformer2DModel", "image", diffusers(
        "CogView3PlusTransformer2DModel", patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, out_channels=4, text_embed_dim=16, time_embed_dim=8, condition_dim=2,
        pos_embed_max_size=8, sample_size=8), cogview_inputs),
    "cogview4": ZooEntry("CogView4Transformer2DModel", "image", diffusers(
        "CogView4Transformer2DModel", patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, out_channels=4, text_embed_dim=16, time_embed_dim=8, condition_dim=2,
        rope_axes_dim=(4, 4)), cogview_inputs),
    "hunyuan-dit": ZooEntry("HunyuanDiT2DModel", "image", diffusers(
        "HunyuanDiT2DModel", sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, cross_attention_dim=8, cross_attention_dim_t5=8, pooled_projection_dim=4,
        hidden_size=16, text_len=4, text_len_t5=4, activation_fn="gelu-approximate"), hunyuan_dit_inputs),
    "lumina2": ZooEntry("Lumina2Transformer2DModel", "image", diffusers(
        "Lumina2Transformer2DModel", sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=1,
        num_refiner_layers=1, num_attention_heads=2, num_kv_heads=2, multiple_of=16, axes_dim_rope=(4, 2, 2),
        axes_lens=(64, 64, 64), cap_feat_dim=8), lumina2_inputs),
    "qwenimage": ZooEntry("QwenImageTransformer2DModel", "image", diffusers(
        "QwenImageTransformer2DModel", patch_size=2, in_channels=16, out_channels=4, num_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4)),
        qwenimage_inputs),
    # diffusers, image (batch 2)
    "bria": ZooEntry("BriaTransformer2DModel", "image", diffusers(
        "BriaTransformer2DModel", patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8)),
        chroma_inputs),
    "longcat-image": ZooEntry("LongCatImageTransformer2DModel", "image", diffusers(
        "LongCatImageTransformer2DModel", patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8)), chroma_inputs),
    "ovis-image": ZooEntry("OvisImageTransformer2DModel", "image", diffusers(
        "OvisImageTransformer2DModel", patch_size=1, in_channels=4, out_channels=4, num_layers=1,
        num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        axes_dims_rope=(4, 4, 8)), chroma_inputs),
    "hidream": ZooEntry("HiDreamImageTransformer2DModel", "image", diffusers(
        "HiDreamImageTransformer2DModel", patch_size=2, in_channels=4, out_channels=4, num_layers=1,
        num_single_layers=1, attention_head_dim=8, num_attention_heads=4, caption_channels=[8, 4], text_emb_dim=8,
        num_routed_experts=2, num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(16, 16),
        llama_layers=(0, 1), force_inference_output=True), kw(
        hidden_states=(4, 16, 16), encoder_hidden_states_t5=(8, 8),
        encoder_hidden_states_llama3=lambda b: torch.randn(2, b, 8, 4, generator=gen()),
        pooled_embeds=(8,), timesteps=T(integer=True)), "mixture-of-experts MLPs (2 experts, both active)"),
    "omnigen": ZooEntry("OmniGenTransformer2DModel", "image", diffusers(
        "OmniGenTransformer2DModel", hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, num_layers=2, pad_token_id=0, vocab_size=100, in_channels=4, time_step_dim=4,
        rope_scaling={"long_factor": list(range(1, 9)), "short_factor": list(range(1, 9))}), kw(
        hidden_states=(4, 8, 8), timestep=T(1.0), input_ids=lambda b: torch.arange(8).repeat(b, 1) % 10,
        input_img_latents=[], input_image_sizes={},
        attention_mask=lambda b: torch.ones(b, 8 + 1 + 16, 8 + 1 + 16),
        position_ids=lambda b: torch.arange(8 + 1 + 16).repeat(b, 1))),
    "lumina-next": ZooEntry("LuminaNextDiT2DModel", "image", diffusers(
        "LuminaNextDiT2DModel", sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2,
        num_attention_heads=2, num_kv_heads=2, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5,
        learn_sigma=True, qk_norm=True, cross_attention_dim=16, scaling_factor=1.0), kw(
        hidden_states=(4, 8, 8), timestep=T(1.0), encoder_hidden_states=(8, 16), encoder_mask=M(8),
        image_rotary_emb=lambda b: lumina_rope(), cross_attention_kwargs={})),
    "hunyuan-image": ZooEntry("HunyuanImageTransformer2DModel", "image", diffusers(
        "HunyuanImageTransformer2DModel", in_channels=4, out_channels=4, num_attention_heads=2,
        attention_head_dim=8, num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=(1, 1),
        guidance_embeds=False, text_embed_dim=16, rope_axes_dim=(4, 4)), kw(
        hidden_states=(4, 4, 4), timestep=T(), encoder_hidden_states=(8, 16),
        encoder_attention_mask=M(8))),
    "z-image": ZooEntry("ZImageTransformer2DModel", "image", diffusers(
        "ZImageTransformer2DModel", all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32,
        n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=16,
        axes_dims=[8, 4, 4], axes_lens=[64, 16, 16]), lambda model, batch=2: {
        "x": [torch.randn(4, 1, 8, 8, generator=gen()) for _ in range(batch)],
        "cap_feats": [torch.randn(8, 16, generator=gen()) for _ in range(batch)], "t": steps(batch, 1.0)},
        "inputs are lists of per-sample tensors"),
    "transformer2d": ZooEntry("Transformer2DModel", "image", diffusers(
        "Transformer2DModel", num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
        num_layers=2, sample_size=8, patch_size=2, norm_type="ada_norm_zero", num_embeds_ada_norm=10,
        norm_elementwise_affine=False, activation_fn="gelu-approximate"), dit_inputs,
        "patched ada_norm_zero config (the DiT layout of the generic class)"),
    "motif-video": ZooEntry("MotifVideoTransformer3DModel", "video", diffusers(
        "MotifVideoTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
        num_layers=1, num_single_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
        rope_axes_dim=(2, 2, 4)), kw(
        hidden_states=(4, 2, 8, 8), timestep=T(integer=True), encoder_hidden_states=(8, 16),
        encoder_attention_mask=M(8))),
    "helios": ZooEntry("HeliosTransformer3DModel", "video", diffusers(
        "HeliosTransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
        in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, rope_dim=(4, 4, 4),
        has_multi_term_memory_patch=False), video_cf_inputs(16), "no history latents (plain text-to-video call)"),
    "prior": ZooEntry("PriorTransformer", "other", diffusers(
        "PriorTransformer", num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=16,
        num_embeddings=7, additional_embeddings=4), kw(
        hidden_states=(16,), timestep=T(integer=True), proj_embedding=(16,), encoder_hidden_states=(7, 16),
        attention_mask=M(7, torch.bool)), "unCLIP prior: denoises a CLIP image embedding, not a latent image"),
    "stable-audio": ZooEntry("StableAudioDiTModel", "audio", diffusers(
        "StableAudioDiTModel", sample_size=16, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, num_key_value_attention_heads=2, out_channels=4, cross_attention_dim=16,
        time_proj_dim=8, global_states_input_dim=16, cross_attention_input_dim=16), kw(
        hidden_states=(4, 16), timestep=T(integer=True), encoder_hidden_states=(8, 16),
        global_hidden_states=(1, 16), rotary_embedding=lambda b: stable_audio_rope(4, 17))),
    "ltx2": ZooEntry("LTX2VideoTransformer3DModel", "video", diffusers(
        "LTX2VideoTransformer3DModel", in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
        num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, audio_in_channels=4,
        audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=8, audio_cross_attention_dim=16,
        num_layers=2, qk_norm="rms_norm_across_heads", caption_channels=16, rope_double_precision=False), kw(
        hidden_states=(2 * 4 * 4, 4), audio_hidden_states=(5, 4), encoder_hidden_states=(8, 16),
        audio_encoder_hidden_states=(8, 16), timestep=T(), encoder_attention_mask=M(8, torch.bool),
        num_frames=2, height=4, width=4, audio_num_frames=5, fps=25.0), "joint video and audio streams"),
    "kandinsky6": ZooEntry("Kandinsky6Transformer3DModel", "video", diffusers(
        "Kandinsky6Transformer3DModel", in_visual_dim=4, out_visual_dim=4, in_text_dim=8, in_text_dim2=8,
        time_dim=16, patch_size=(1, 2, 2), model_dim=48, ff_dim=64, num_text_blocks=1, num_visual_blocks=2,
        axes_dims=(4, 4, 4), visual_cond=False, in_audio_dim=4, out_audio_dim=4), kw(
        hidden_states=lambda b: torch.randn(b, 2, 8, 8, 4, generator=gen()), encoder_hidden_states=(6, 8),
        pooled_projections=(8,), timestep=T())),
    "wan-animate": ZooEntry("WanAnimateTransformer3DModel", "video", diffusers(
        "WanAnimateTransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
        in_channels=12, latent_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
        image_dim=16, rope_max_seq_len=32, motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16},
        motion_encoder_size=16, motion_style_dim=8, motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16,
        face_encoder_num_heads=2, inject_face_latents_blocks=2), kw(
        hidden_states=(12, 21, 4, 4), timestep=T(integer=True), encoder_hidden_states=(8, 16),
        encoder_hidden_states_image=(4, 16), pose_hidden_states=(4, 20, 4, 4), face_pixel_values=(3, 77, 16, 16)),
        "motion and face encoders at their smallest"),
    "minimax-h3": ZooEntry("MiniMaxH3Transformer3DModel", "video", diffusers(
        "MiniMaxH3Transformer3DModel", num_attention_heads=2, attention_head_dim=16, hidden_size=24, num_layers=2,
        num_refiner_layers=1, ffn_dim=32, in_channels=4, audio_in_channels=6, patch_size=(1, 2, 2), text_dim=8,
        freq_dim=8, time_embed_hidden_dim=24, time_embed_dim=16, rope_freq_dim=2), lambda model, batch=2: {
        **kw(hidden_states=(8, 16), audio_hidden_states=(6, 6), encoder_hidden_states=(4, 8))(model, batch),
        **minimax_h3_layout(4, 6, 8)}, "one packed text+audio+video sequence; timesteps per row group, not per sample"),
    "sana-wm": ZooEntry("SanaWMTransformer3DModel", "video", diffusers(
        "SanaWMTransformer3DModel", in_channels=4, num_layers=2, hidden_size=32, num_attention_heads=2,
        patch_size=(1, 1, 1), softmax_every_n=2, linear_head_dim=16, t_kernel_size=3, conv_kernel_size=4,
        caption_channels=8, mlp_ratio=2.0, chunk_plucker_channels=8, chunk_plucker_post_attn_blocks=2), kw(
        hidden_states=(4, 4, 8, 8), timestep=lambda b: steps(b)[:, None, None].repeat(1, 1, 4),
        encoder_hidden_states=(1, 16, 8), encoder_attention_mask=M(16), camera_conditions=lambda b: camera(b, 4),
        chunk_plucker=(8, 4, 8, 8)), "camera-controlled world model: linear (GDN) and softmax attention blocks"),
    "sana-wm-refiner": ZooEntry("SanaWMLTX2RefinerTransformer3DModel", "video", diffusers(
        "SanaWMLTX2RefinerTransformer3DModel", in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
        num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, audio_in_channels=4,
        audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=8, audio_cross_attention_dim=16,
        num_layers=2, qk_norm="rms_norm_across_heads", caption_channels=16, rope_double_precision=False),
        lambda model, batch=2: {
            **kw(hidden_states=(32, 4), encoder_hidden_states=(8, 16), encoder_attention_mask=M(8, torch.float32))(
                model, batch),
            "timestep": steps(batch)[:, None].repeat(1, 32),
            "video_rotary_emb": model.build_rotary_emb_for_absolute_positions(
                batch_size=batch, frame_positions=[0, 1], height=4, width=4, device=torch.device("cpu"), fps=24.0)},
        "per-token timesteps (B, tokens), the same for every token of a sample"),
    "kandinsky6-sr": ZooEntry("Kandinsky6SRTransformer3DModel", "video", diffusers(
        "Kandinsky6SRTransformer3DModel", in_visual_dim=4, out_visual_dim=8, time_dim=16, patch_size=(1, 2, 2),
        model_dim=24, ff_dim=32, num_visual_blocks=2, axes_dims=(4, 4, 4)), kw(
        hidden_states=lambda b: torch.randn(b, 2, 16, 16, 9, generator=gen()), timestep=T()),
        "video super-resolution; sparse (nabla) flex attention"),
    # diffusers, image (batch 3)
    "ernie-image": ZooEntry("ErnieImageTransformer2DModel", "image", diffusers(
        "ErnieImageTransformer2DModel", hidden_size=32, num_attention_heads=2, num_layers=2, ffn_hidden_size=64,
        in_channels=4, out_channels=4, patch_size=1, text_in_dim=16, rope_axes_dim=(8, 4, 4),
        qk_layernorm=True), kw(
        hidden_states=(4, 4, 4), timestep=T(), text_bth=(8, 16), text_lens=lambda b: torch.full((b,), 8))),
    "ideogram4": ZooEntry("Ideogram4Transformer2DModel", "image", diffusers(
        "Ideogram4Transformer2DModel", in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        intermediate_size=32, adaln_dim=16, llm_features_dim=24, rope_theta=10_000, mrope_section=(2, 1, 1)),
        lambda model, batch=2: ideogram4_inputs(batch), "text and image tokens in one sequence"),
    "krea2": ZooEntry("Krea2Transformer2DModel", "image", diffusers(
        "Krea2Transformer2DModel", in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=32, timestep_embed_dim=8, text_hidden_dim=16, num_text_layers=3,
        text_num_attention_heads=2, text_num_key_value_heads=1, text_intermediate_size=16,
        num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 2, 2)), kw(
        hidden_states=(16, 16), encoder_hidden_states=(4, 3, 16), timestep=T(1.0),
        position_ids=lambda b: krea2_positions(4, 4, 4), encoder_attention_mask=M(4, torch.bool)),
        "grouped-query attention (4 heads, 2 key/value heads)"),
    "glm-image": ZooEntry("GlmImageTransformer2DModel", "image", diffusers(
        "GlmImageTransformer2DModel", patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, text_embed_dim=32, time_embed_dim=16, condition_dim=8,
        prior_vq_quantizer_codebook_size=64), kw(
        hidden_states=(4, 8, 8), encoder_hidden_states=(8, 32),
        prior_token_id=lambda b: (torch.arange(16)[None] + torch.arange(b)[:, None]) % 64,
        prior_token_drop=lambda b: torch.zeros(b, dtype=torch.bool), timestep=T(integer=True),
        target_size=lambda b: torch.tensor([[8.0, 8.0]] * b), crop_coords=lambda b: torch.zeros(b, 2))),
    "qwenimage21": ZooEntry("QwenImage21Transformer2DModel", "image", diffusers(
        "QwenImage21Transformer2DModel", patch_size=1, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=16, num_attention_heads=2, context_in_dim=8, mlp_ratio=2, axes_dims_rope=(4, 6, 6)),
        kw(hidden_states=(16, 4), encoder_hidden_states=(4, 8), encoder_hidden_states_mask=M(4),
            timestep=T(1.0), img_shapes=lambda b: [[(1, 4, 4)]] * b,
            img_mask=lambda b: torch.tensor([[False] * 4 + [True] * 4] * b)),
        "block-causal attention over text, condition and target tokens"),
    "flux3": ZooEntry("Flux3Transformer2DModel", "image", diffusers(
        "Flux3Transformer2DModel", in_channels=4, cond_in_channels=4, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, timestep_channels=256,
        axes_dims_rope=(4, 4, 4, 4)), lambda model, batch=2: {
        k: (v[0] if k.endswith("_ids") else v) for k, v in flux2_inputs(model, batch).items()}),
    "bria-fibo": ZooEntry("BriaFiboTransformer2DModel", "image", diffusers(
        "BriaFiboTransformer2DModel", patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8),
        text_encoder_dim=16), lambda model, batch=2: {
        **chroma_inputs(model, batch), "text_encoder_layers": [torch.randn(batch, 8, 16, generator=gen())] * 2}),
    "prx": ZooEntry("PRXTransformer2DModel", "image", diffusers(
        "PRXTransformer2DModel", in_channels=4, patch_size=2, context_in_dim=16, hidden_size=32, mlp_ratio=2.0,
        num_heads=2, depth=2, axes_dim=[8, 8]), kw(
        hidden_states=(4, 8, 8), timestep=T(1.0), encoder_hidden_states=(8, 16))),
    "nucleus-moe-image": ZooEntry("NucleusMoEImageTransformer2DModel", "image", diffusers(
        "NucleusMoEImageTransformer2DModel", patch_size=2, in_channels=16, out_channels=4, num_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
        num_experts=4, moe_intermediate_dim=16, dense_moe_strategy="leave_first_three_and_last_block_dense"),
        kw(hidden_states=(16, 16), img_shapes=lambda b: [(1, 4, 4)] * b, encoder_hidden_states=(8, 16),
            encoder_hidden_states_mask=M(8), timestep=T(1.0)), "mixture-of-experts MLPs"),
    "dreamlite": ZooEntry("DreamLiteTransformer2DModel", "image", diffusers(
        "DreamLiteTransformer2DModel", num_attention_heads=2, attention_head_dim=8, in_channels=16, out_channels=16,
        num_layers=1, norm_num_groups=4, cross_attention_dim=16), kw(
        hidden_states=(16, 4, 4), encoder_hidden_states=(8, 16), timestep=T(integer=True)),
        "a U-Net transformer block (continuous input, no timestep conditioning inside)"),
    "joyimage-edit": ZooEntry("JoyImageEditTransformer3DModel", "image", diffusers(
        "JoyImageEditTransformer3DModel", patch_size=[1, 2, 2], in_channels=4, hidden_size=32, num_attention_heads=2,
        text_dim=16, num_layers=2, rope_dim_list=[4, 6, 6]), kw(
        hidden_states=(4, 1, 8, 8), timestep=T(), encoder_hidden_states=(8, 16))),
    "joyimage-edit-plus": ZooEntry("JoyImageEditPlusTransformer3DModel", "image", diffusers(
        "JoyImageEditPlusTransformer3DModel", patch_size=[1, 2, 2], in_channels=4, hidden_size=32,
        num_attention_heads=2, text_dim=16, num_layers=2, rope_dim_list=[4, 6, 6]), kw(
        hidden_states=(16, 4, 1, 2, 2), timestep=T(), encoder_hidden_states=(8, 16),
        encoder_hidden_states_mask=M(8), shape_list=lambda b: [[(1, 4, 4)]] * b),
        "inputs are patchified: (B, patches, C, pt, ph, pw)"),
    "bria-fibo2": ZooEntry("BriaFibo2Transformer2DModel", "image", diffusers(
        "BriaFibo2Transformer2DModel", in_channels=4, patch_size=2, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, cap_feat_dim=24, injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=4,
        max_num_gist_tokens=8, gist_step=4, gist_min_text_len=4, gist_max_text_len=16, axes_dims=(4, 6, 6),
        axes_lens=(16, 16, 16)), kw(hidden_states=(4, 8, 8), timestep=T(1.0), encoder_hidden_states=(2, 6, 24)),
        "Perceiver text compression into gist tokens, text injection blocks"),
}
# fmt: on
