"""A converted diffusers transformer works in its pipeline, unchanged, and under torch.compile."""

from __future__ import annotations

import pytest
import torch

import dynconvert
from dynconvert.testing import randomize_routing, tiny_diffusers_dit, tiny_pixart


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=8,
    ).eval()


def _sample(pipe):
    """Three DDIM steps of two class-conditional samples, the same noise every call."""
    return pipe(
        class_labels=[1, 3],
        num_inference_steps=3,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


def test_dit_pipeline_runs_with_converted_transformer():
    from diffusers import DDIMScheduler, DiTPipeline

    transformer = tiny_diffusers_dit()
    pipe = DiTPipeline(transformer=transformer, vae=_tiny_vae(), scheduler=DDIMScheduler())
    reference = _sample(pipe)
    dynconvert.convert(pipe.transformer, 0.5)
    same = _sample(pipe)
    assert abs(same - reference).max() < 1e-4  # routers start all on
    randomize_routing(pipe.transformer, keep=0.5)
    dynamic = _sample(pipe)
    assert dynamic.shape == reference.shape and abs(dynamic - reference).max() > 1e-3
    bank = dynconvert.get_state(pipe.transformer)
    assert dynconvert.last_flops_ratio(bank).mean() < 1.0
    assert set(bank._table)  # the per-timestep mask table was filled by the sampler's timesteps


def test_pixart_pipeline_runs_with_converted_transformer():
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    transformer = dynconvert.convert(tiny_pixart(), 0.5)
    randomize_routing(transformer, keep=0.5)
    pipe = PixArtAlphaPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=_tiny_vae(),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 8, 12, generator=g)
    mask = torch.ones(1, 8, dtype=torch.long)
    out = pipe(
        prompt=None,
        negative_prompt=None,
        prompt_embeds=embeds,
        prompt_attention_mask=mask,
        negative_prompt_embeds=torch.zeros_like(embeds),
        negative_prompt_attention_mask=mask,
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        use_resolution_binning=False,
        generator=g,
    ).images
    assert out.shape == (1, 64, 64, 3)


@pytest.mark.slow  # Inductor compiles the model: about 20 s on 2 cores
def test_torch_compile_on_converted_model():
    model = dynconvert.convert(tiny_diffusers_dit(), 0.5)
    randomize_routing(model, keep=0.5)
    inputs = {
        "hidden_states": torch.randn(2, 4, 8, 8),
        "timestep": torch.tensor([500, 500]),
        "class_labels": torch.tensor([1, 2]),
    }
    eager = model(**inputs).sample
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(**inputs).sample, eager, atol=1e-4, rtol=1e-4)
    inputs["timestep"] = torch.tensor([20, 20])
    torch.testing.assert_close(
        compiled(**inputs).sample, model(**inputs).sample, atol=1e-4, rtol=1e-4
    )
