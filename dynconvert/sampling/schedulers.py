"""Diffusers schedulers on a model family's DDPM training schedule, set up as DiT samples."""

from __future__ import annotations

from typing import Any

from dynconvert.errors import ConfigError
from dynconvert.sampling.spec import ModelSpec

SCHEDULERS = ("ddim", "dpm", "ddpm")
"""Scheduler names ``sample`` accepts (aliases: "dpm-solver", "dpmsolver++", "dpm++")."""

_ALIASES = {"dpm-solver": "dpm", "dpmsolver": "dpm", "dpmsolver++": "dpm", "dpm++": "dpm"}
# (beta_start, beta_end): DiT's linear schedule, and the scaled-linear one of U-ViT / SD.
_BETA_RANGE = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}


def make_scheduler(
    name: str = "ddim",
    *,
    beta_schedule: str = "linear",
    num_train_timesteps: int = 1000,
    prediction_type: str = "epsilon",
    learned_sigma: bool = False,
    clip_sample: bool = False,
) -> Any:
    """A diffusers scheduler on a DDPM training schedule, set up as DiT samples with it.

    "ddim": eta 0, timesteps 980, 960, ..., 0 for 50 steps (DiT's "ddim50"), alpha 1 at the end.
    "ddpm": ancestral sampling on timesteps ``round(linspace(0, 999, steps))`` (DiT's respacing:
    250 steps is the paper's setting), learned-range variance for learned-sigma models.
    "dpm": DPM-Solver++ (2nd order multistep).

    Args:
        name: "ddim", "dpm" or "ddpm" (aliases "dpm-solver", "dpmsolver++", "dpm++").
        beta_schedule: "linear" (1e-4..0.02) or "scaled_linear" (0.00085..0.012, U-ViT/SD).
        num_train_timesteps: Steps of the training schedule.
        prediction_type: "epsilon" or "v_prediction".
        learned_sigma: The model outputs variance channels (used by "ddpm").
        clip_sample: Clip the predicted x0 to [-1, 1] (pixel-space models; off for latents).

    Returns:
        The scheduler (call ``set_timesteps`` before use).

    Raises:
        ConfigError: Unknown name or schedule.

    Example:
        >>> s = make_scheduler("ddpm")
        >>> s.set_timesteps(250)
        >>> s.timesteps[:3].tolist()
        [999, 995, 991]
    """
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    kind = _ALIASES.get(name, name)
    if kind not in SCHEDULERS:
        raise ConfigError(
            f"unknown scheduler {name!r}; use one of {', '.join(SCHEDULERS)} or pass a diffusers "
            "scheduler instance"
        )
    if beta_schedule not in _BETA_RANGE:
        raise ConfigError(
            f"beta_schedule must be one of {', '.join(_BETA_RANGE)}; got {beta_schedule!r}"
        )
    start, end = _BETA_RANGE[beta_schedule]
    common = dict(
        num_train_timesteps=num_train_timesteps,
        beta_start=start,
        beta_end=end,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
    )
    if kind == "ddim":
        return DDIMScheduler(
            **common, clip_sample=clip_sample, set_alpha_to_one=True, timestep_spacing="leading"
        )
    if kind == "ddpm":
        return DDPMScheduler(
            **common,
            clip_sample=clip_sample,
            variance_type="learned_range" if learned_sigma else "fixed_small",
            timestep_spacing="linspace",
        )
    return DPMSolverMultistepScheduler(
        **common,
        algorithm_type="dpmsolver++",
        solver_order=2,
        thresholding=clip_sample,  # DPM-Solver++ clips x0 by thresholding, to [-1, 1] here
        sample_max_value=1.0,
    )


def fresh_scheduler(scheduler: str | Any, spec: ModelSpec, clip_sample: bool) -> Any:
    """A fresh scheduler for one chunk of samples (multistep schedulers keep state)."""
    if isinstance(scheduler, str):
        return make_scheduler(
            scheduler,
            beta_schedule=spec.beta_schedule,
            prediction_type=spec.prediction_type,
            learned_sigma=spec.learned_sigma,
            clip_sample=clip_sample,
        )
    if not hasattr(scheduler, "set_timesteps") or not hasattr(scheduler, "step"):
        raise ConfigError(
            f"scheduler must be one of {', '.join(SCHEDULERS)} or a diffusers scheduler; got "
            f"{type(scheduler).__name__}"
        )
    # A copy from the config: the caller's instance is never stepped, so it can be reused.
    return type(scheduler).from_config(scheduler.config)
