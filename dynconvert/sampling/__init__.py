"""Sample from original and converted diffusion transformers, and write image grids.

``sample`` runs a diffusers scheduler (DDIM, DPM-Solver++, or DDPM respaced by
``set_timesteps``) configured with the model family's training schedule: linear betas
1e-4..0.02 over 1000 steps for DiT, diffusers DiT and PixArt; scaled-linear 0.00085..0.012 for
U-ViT, which also sees ``t + 1`` (it was trained on 1..1000). The model is always called with the
scheduler's original training timestep values, which is what converted models key their width
masks on. Classifier-free guidance doubles the batch with the null label (or null caption), so
both halves run at the same timestep and share one set of width masks. Learned-sigma models
guide the eps half; with DDPM the conditional half's variance channels set the step variance
(``variance_type="learned_range"``, DiT's own 250-step setting).

The same ``seed`` draws the same initial noise for any model of the same sample shape, so the
original and the converted model can be compared image by image.

The code lives in five modules: ``spec`` (what a model needs: family, sample shape, schedule,
labels), ``schedulers`` (the diffusers schedulers on that schedule), ``sampler`` (``sample``
and its denoising loop), ``grids`` (PNG grids of the samples) and ``budget`` (router thresholds
shifted so the sampler spends the target).

Example:
    >>> import torch
    >>> from dynconvert.sampling import sample
    >>> from dynconvert.testing import tiny_dit
    >>> images = sample(tiny_dit(), labels=torch.arange(4), steps=5)
    >>> tuple(images.shape)
    (4, 4, 8, 8)
"""

from dynconvert.sampling.budget import (
    BudgetGridMatch,
    BudgetMatch,
    match_budget_grid,
    match_sampling_budget,
)
from dynconvert.sampling.grids import (
    compare_grid,
    comparison_titles,
    grid_array,
    save_grid,
    titled,
)
from dynconvert.sampling.sampler import sample
from dynconvert.sampling.schedulers import SCHEDULERS, make_scheduler
from dynconvert.sampling.spec import ModelSpec, model_spec

__all__ = [
    "SCHEDULERS",
    "BudgetGridMatch",
    "BudgetMatch",
    "ModelSpec",
    "compare_grid",
    "comparison_titles",
    "grid_array",
    "make_scheduler",
    "match_budget_grid",
    "match_sampling_budget",
    "model_spec",
    "sample",
    "save_grid",
    "titled",
]
