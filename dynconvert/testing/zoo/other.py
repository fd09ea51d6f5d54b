"""Audio entries and other denoisers of the zoo (music, speech, spectrogram, building blocks)."""

from __future__ import annotations

import torch

from dynconvert.testing.zoo.builders import (
    M,
    T,
    ZooEntry,
    diffusers,
    gen,
    kw,
    steps,
)

# A table: one entry per model, kept dense.
# fmt: off
OTHER: dict[str, ZooEntry] = {
    # diffusers, audio
    "stable-audio3": ZooEntry("StableAudio3DiTModel", "audio", diffusers(
        "StableAudio3DiTModel", io_channels=8, patch_size=1, embed_dim=32, depth=2, num_heads=2, cond_token_dim=16,
        global_cond_dim=16, local_add_cond_dim=4, timestep_features_dim=16, num_memory_tokens=4), kw(
        hidden_states=(8, 16), timestep=T(1.0), encoder_hidden_states=(8, 16), global_hidden_states=(16,)),
        "differential attention, memory tokens"),
    "minimax-music3": ZooEntry("MiniMaxMusic3Transformer1DModel", "audio", diffusers(
        "MiniMaxMusic3Transformer1DModel", in_channels=8, condition_dim=16, num_layers=2, num_attention_heads=2,
        attention_head_dim=8, ff_inner_dim=32, rotary_dim=8, fourier_embedding_dim=16), kw(
        hidden_states=(8, 16), timestep=T(1.0), encoder_hidden_states=(16, 16))),
    "longcat-audio": ZooEntry("LongCatAudioDiTTransformer", "audio", diffusers(
        "LongCatAudioDiTTransformer", dit_dim=32, dit_depth=2, dit_heads=2, dit_text_dim=16, latent_dim=8), kw(
        hidden_states=(16, 8), encoder_hidden_states=(8, 16), encoder_attention_mask=M(8, torch.bool),
        timestep=T(1.0))),
    "ace-step": ZooEntry("AceStepTransformer1DModel", "audio", diffusers(
        "AceStepTransformer1DModel", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, in_channels=24, audio_acoustic_hidden_dim=8,
        patch_size=2, sliding_window=4, encoder_hidden_size=16), kw(
        hidden_states=(16, 8), timestep=T(1.0), timestep_r=T(0.5), encoder_hidden_states=(8, 16),
        context_latents=(16, 16))),
    # diffusers, other denoisers and building blocks
    "dual-transformer2d": ZooEntry("DualTransformer2DModel", "other", diffusers(
        "DualTransformer2DModel", num_attention_heads=2, attention_head_dim=8, in_channels=16, num_layers=1,
        norm_num_groups=4, cross_attention_dim=16), kw(
        hidden_states=(16, 4, 4), encoder_hidden_states=(77 + 257, 16), timestep=T(integer=True)),
        "Versatile Diffusion's pair of Transformer2DModels (text 77 + image 257 condition tokens)"),
    "t5-film": ZooEntry("T5FilmDecoder", "audio", diffusers(
        "T5FilmDecoder", input_dims=8, targets_length=16, d_model=32, num_layers=2, num_heads=2, d_kv=8, d_ff=64,
        dropout_rate=0.0), lambda model, batch=2: {
        "encodings_and_masks": [(torch.randn(batch, 8, 32, generator=gen()), torch.ones(batch, 8, dtype=torch.bool))],
        "decoder_input_tokens": torch.randn(batch, 16, 8, generator=gen()), "decoder_noise_time": steps(batch, 1.0)},
        "spectrogram diffusion decoder (music)"),
}
# fmt: on
