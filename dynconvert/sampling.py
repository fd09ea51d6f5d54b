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

Example:
    >>> import torch
    >>> from dynconvert.sampling import sample
    >>> from dynconvert.testing import tiny_dit
    >>> images = sample(tiny_dit(), labels=torch.arange(4), steps=5)
    >>> tuple(images.shape)
    (4, 4, 8, 8)
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from dynconvert.errors import ConfigError

SCHEDULERS = ("ddim", "dpm", "ddpm")
"""Scheduler names ``sample`` accepts (aliases: "dpm-solver", "dpmsolver++", "dpm++")."""

_ALIASES = {"dpm-solver": "dpm", "dpmsolver": "dpm", "dpmsolver++": "dpm", "dpm++": "dpm"}
_BETA_RANGE = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}


@dataclass
class ModelSpec:
    """What ``sample`` needs to know about a model: how to call it and its training schedule."""

    adapter: Any
    channels: int | None
    image_size: int | None
    beta_schedule: str
    timestep_offset: int
    prediction_type: str
    num_classes: int | None
    null_label: int | None
    uses_labels: bool
    learned_sigma: bool


def model_spec(model: nn.Module, null_label: int | None = None) -> ModelSpec:
    """Read the family, sample shape, schedule and labels of a (converted) model.

    Args:
        model: A built-in DiT or U-ViT, a diffusers DiT or PixArt transformer, or a model the
            generic adapter can call.
        null_label: Overrides the null (unconditional) label found from the model.

    Returns:
        The ``ModelSpec``.

    Example:
        >>> from dynconvert.testing import tiny_dit
        >>> spec = model_spec(tiny_dit())
        >>> spec.channels, spec.image_size, spec.null_label
        (4, 8, 10)
    """
    from dynconvert.calibrate.adapters import resolve_labels, select_adapter

    adapter = select_adapter(model)
    if adapter.objective == "flow":
        raise ConfigError(
            f"sample() runs DDPM-family schedulers; the {adapter.name} adapter trains a flow "
            "model, which needs a flow-matching sampler"
        )
    config = getattr(model, "config", None)
    channels = _first_int(model, config, ("in_channels", "in_chans"))
    image_size = _first_int(model, config, ("input_size", "img_size", "sample_size"))
    overrides = SimpleNamespace(num_classes=None, null_label=null_label, label_dropout=None)
    labels = resolve_labels(model, adapter, overrides)
    out_channels = _first_int(model, config, ("out_channels",))
    learned_sigma = bool(getattr(model, "learn_sigma", False)) or (
        channels is not None and out_channels == 2 * channels
    )
    return ModelSpec(
        adapter=adapter,
        channels=channels,
        image_size=image_size,
        beta_schedule=adapter.beta_schedule,
        timestep_offset=adapter.timestep_offset,
        prediction_type="v_prediction" if adapter.objective == "v" else "epsilon",
        num_classes=labels.num_classes,
        null_label=labels.null_label,
        uses_labels=labels.uses_labels
        and labels.num_classes is not None
        and not adapter.needs_cond,
        learned_sigma=learned_sigma,
    )


def _first_int(model: nn.Module, config: Any, names: Sequence[str]) -> int | None:
    for source in (config, model):  # diffusers: read the config, not the deprecated attribute
        for name in names:
            value = getattr(source, name, None) if source is not None else None
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


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
        thresholding=clip_sample,
        sample_max_value=1.0,
    )


def sample(
    model: nn.Module,
    *,
    labels: torch.Tensor | Sequence[int] | None = None,
    cond: torch.Tensor | None = None,
    cond_mask: torch.Tensor | None = None,
    steps: int = 50,
    cfg_scale: float = 1.5,
    seed: int = 0,
    scheduler: str | Any = "ddim",
    image_size: int | None = None,
    channels: int | None = None,
    device: torch.device | str | None = None,
    null_label: int | None = None,
    generator: torch.Generator | None = None,
    on_step: Callable[[int, int], None] | None = None,
    num_samples: int | None = None,
    null_cond: torch.Tensor | None = None,
    null_cond_mask: torch.Tensor | None = None,
    clip_sample: bool = False,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Generate latents (or images, for pixel-space models) with a diffusers scheduler.

    The model runs in eval mode under ``torch.no_grad`` (its training flag is restored after).
    A converted model samples with its current routing mode (``None`` follows eval: the
    dynamic model); wrap the call in ``dynconvert.routing(model, "full")`` for the original.

    Args:
        model: The model (original or converted): built-in DiT / U-ViT, diffusers DiT / PixArt.
        labels: Class labels (N,) for a class-conditional model; N samples are drawn.
        cond: Caption embeddings (N, L, D) for a text-conditional model (PixArt).
        cond_mask: Their attention mask (N, L).
        steps: Denoising steps (the paper: 250 with "ddpm").
        cfg_scale: Classifier-free guidance scale; 1.0 turns guidance off (one batch, no null
            label needed).
        seed: Seed of the initial noise (and of DDPM's step noise), drawn on the CPU so that a
            seed gives the same noise on every device. Ignored when ``generator`` is given.
        scheduler: "ddim", "dpm", "ddpm", or a diffusers scheduler instance (used as given).
        image_size: Side of the samples (default: from the model).
        channels: Channels of the samples (default: from the model).
        device: Where to run (default: the model's device; the model must already be there).
        null_label: The unconditional label for guidance (default: DiT's ``num_classes``,
            diffusers DiT's ``num_embeds_ada_norm``, U-ViT's last class of 1001).
        generator: A CPU ``torch.Generator`` to draw the noise from instead of ``seed``.
        on_step: Called as ``on_step(done, total)`` after each denoising step (``total`` is
            ``steps`` times the number of chunks).
        num_samples: How many samples an unconditional model draws (N when no labels/cond).
        null_cond: Caption embeddings of the empty prompt, (L, D) or (1 or N, L, D), for
            guidance of a text-conditional model.
        null_cond_mask: Their mask, (L,) or (1 or N, L); default all ones.
        clip_sample: Clip the predicted x0 to [-1, 1] at every step (pixel-space models).
        batch_size: At most this many samples per model call (default: all at once).

    Returns:
        float32 samples (N, C, H, W) on ``device``.

    Raises:
        ConfigError: Missing labels or null label for guidance, labels out of range, unknown
            scheduler, or a sample shape that cannot be found.

    Example:
        >>> import torch, dynconvert
        >>> from dynconvert.sampling import sample
        >>> from dynconvert.testing import tiny_dit
        >>> model = dynconvert.convert(tiny_dit(), budget=0.5)
        >>> dynamic = sample(model, labels=[1, 2], steps=4, seed=3)
        >>> with dynconvert.routing(model, "full"):
        ...     original = sample(model, labels=[1, 2], steps=4, seed=3)
    """
    spec = model_spec(model, null_label)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise ConfigError(
            f"steps must be an integer in 1..1000 (the training steps); got {steps!r}"
        )
    if not isinstance(cfg_scale, (int, float)) or not math.isfinite(cfg_scale):
        raise ConfigError(
            f"cfg_scale must be a finite number (1.0: no guidance); got {cfg_scale!r}"
        )
    param = next(model.parameters(), None)
    run_device = (
        torch.device(device)
        if device is not None
        else (param.device if param is not None else torch.device("cpu"))
    )
    if param is not None and not _same_device(param.device, run_device):
        raise ConfigError(
            f"the model is on {param.device} but device={run_device}; move it first with "
            f"model.to({str(run_device)!r})"
        )
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32

    y, n = _labels(spec, labels, cond, num_samples)
    guided = float(cfg_scale) != 1.0 and (y is not None or cond is not None)
    if guided and y is not None and spec.null_label is None:
        raise ConfigError(
            "classifier-free guidance needs a null label and this model has none known: pass "
            "null_label=..., or cfg_scale=1.0 to sample without guidance"
        )
    if guided and cond is not None and null_cond is None:
        raise ConfigError(
            "classifier-free guidance of a text-conditional model needs the empty prompt's "
            "embeddings: pass null_cond=... (and null_cond_mask), or cfg_scale=1.0"
        )
    c = channels or spec.channels
    size = image_size or spec.image_size
    if not c or not size:
        raise ConfigError(
            f"cannot tell the sample shape of {type(model).__name__}; pass image_size= and channels="
        )

    gen = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    noise = torch.randn((n, c, size, size), generator=gen, dtype=torch.float32)
    chunk = n if batch_size is None else max(1, int(batch_size))
    starts = list(range(0, n, chunk))
    total = steps * len(starts)
    outputs = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for k, start in enumerate(starts):
                rows = slice(start, start + chunk)
                batch = _batch(
                    y, cond, cond_mask, rows, guided, spec, null_cond, null_cond_mask, run_device
                )
                sched = _scheduler(scheduler, spec, clip_sample)
                sched.set_timesteps(steps, device=run_device)

                def progress(i: int, k: int = k) -> None:
                    if on_step is not None:
                        on_step(k * steps + i, total)

                x = noise[rows].to(run_device) * float(sched.init_noise_sigma)
                outputs.append(
                    _denoise(
                        model, spec, sched, x, batch, guided, float(cfg_scale), gen, dtype, progress
                    )
                )
    finally:
        model.train(was_training)
    return torch.cat(outputs)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are the same ("cuda" matches "cuda:0")."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _labels(
    spec: ModelSpec,
    labels: torch.Tensor | Sequence[int] | None,
    cond: torch.Tensor | None,
    num_samples: int | None,
) -> tuple[torch.Tensor | None, int]:
    """Check the conditioning and return (labels or None, N)."""
    if labels is not None:
        if not spec.uses_labels:
            raise ConfigError(
                "this model takes no class labels; drop labels= and pass num_samples= instead"
            )
        y = torch.as_tensor(labels).reshape(-1).long().cpu()
        if y.numel() == 0:
            raise ConfigError("labels is empty; pass at least one class label")
        limit = spec.num_classes if spec.num_classes is not None else None
        allowed = {spec.null_label} if spec.null_label is not None else set()
        bad = [
            v
            for v in y.tolist()
            if v < 0 or (limit is not None and v >= limit and v not in allowed)
        ]
        if bad:
            raise ConfigError(
                f"labels {sorted(set(bad))[:5]} are out of range; this model has classes 0.."
                f"{(limit or 1) - 1}"
            )
        return y, int(y.numel())
    if cond is not None:
        if cond.ndim != 3:
            raise ConfigError(f"cond must be caption embeddings (N, L, D); got {tuple(cond.shape)}")
        return None, int(cond.shape[0])
    if spec.adapter.needs_cond:
        raise ConfigError("this model is text-conditional: pass cond= (N, L, D) caption embeddings")
    if spec.uses_labels:
        raise ConfigError(
            f"this model is class-conditional ({spec.num_classes} classes): pass labels=, e.g. "
            f"labels=torch.arange({min(spec.num_classes or 1, 10)})"
        )
    if num_samples is None or num_samples < 1:
        raise ConfigError("an unconditional model needs num_samples= (how many samples to draw)")
    return None, int(num_samples)


def _batch(
    y: torch.Tensor | None,
    cond: torch.Tensor | None,
    cond_mask: torch.Tensor | None,
    rows: slice,
    guided: bool,
    spec: ModelSpec,
    null_cond: torch.Tensor | None,
    null_cond_mask: torch.Tensor | None,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """The conditioning of one chunk; with guidance, conditional rows then unconditional ones."""
    batch: dict[str, torch.Tensor] = {}
    if y is not None:
        part = y[rows]
        if guided:
            part = torch.cat([part, torch.full_like(part, int(spec.null_label))])
        batch["y"] = part.to(device)
    if cond is not None:
        part = cond[rows]
        mask = (
            cond_mask[rows]
            if cond_mask is not None
            else torch.ones(part.shape[:2], dtype=torch.long)
        )
        if guided:
            neg = null_cond if null_cond.ndim == 3 else null_cond[None]
            neg = neg.expand(part.shape[0], -1, -1) if neg.shape[0] == 1 else neg[rows]
            if null_cond_mask is None:
                neg_mask = torch.ones(neg.shape[:2], dtype=mask.dtype)
            else:
                neg_mask = null_cond_mask if null_cond_mask.ndim == 2 else null_cond_mask[None]
                neg_mask = (
                    neg_mask.expand(part.shape[0], -1) if neg_mask.shape[0] == 1 else neg_mask[rows]
                )
            if neg.shape[1:] != part.shape[1:]:
                raise ConfigError(
                    f"null_cond {tuple(neg.shape[1:])} must match cond {tuple(part.shape[1:])} (L, D)"
                )
            part = torch.cat([part, neg.to(part.dtype)])
            mask = torch.cat([mask.to(device), neg_mask.to(device, mask.dtype)])
        batch["cond"] = part.to(device)
        batch["cond_mask"] = mask.to(device)
    return batch


def _scheduler(scheduler: str | Any, spec: ModelSpec, clip_sample: bool) -> Any:
    """A fresh scheduler for one chunk (multistep schedulers keep state)."""
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
    return type(scheduler).from_config(scheduler.config)


def _denoise(
    model: nn.Module,
    spec: ModelSpec,
    sched: Any,
    x: torch.Tensor,
    batch: dict[str, torch.Tensor],
    guided: bool,
    cfg_scale: float,
    gen: torch.Generator,
    dtype: torch.dtype,
    progress: Callable[[int], None],
) -> torch.Tensor:
    """The denoising loop of one chunk; returns float32 samples."""
    c = x.shape[1]
    learned_range = getattr(sched.config, "variance_type", None) in ("learned", "learned_range")
    for i, t in enumerate(sched.timesteps):
        x_in = sched.scale_model_input(x, t)
        x_in = torch.cat([x_in, x_in]) if guided else x_in
        t_in = (t + spec.timestep_offset).reshape(1).expand(x_in.shape[0]).to(x.device)
        out = spec.adapter(model, x_in.to(dtype), t_in, batch).float()  # (B, C or 2C, H, W)
        if out.shape[1] not in (c, 2 * c):
            raise ConfigError(
                f"the model returned {out.shape[1]} channels for {c}-channel samples; expected "
                f"{c} (eps) or {2 * c} (eps and learned sigma); check channels="
            )
        eps, var = out[:, :c], (out[:, c:] if out.shape[1] == 2 * c else None)
        if guided:
            cond_eps, uncond_eps = eps.chunk(2)
            eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)  # (N, C, H, W)
            var = var.chunk(2)[0] if var is not None else None
        model_output = torch.cat([eps, var], dim=1) if learned_range and var is not None else eps
        x = sched.step(model_output, t, x, generator=gen).prev_sample
        progress(i + 1)
    return x


#################################################################################
#                                  Image grids                                  #
#################################################################################


def grid_array(
    images: torch.Tensor,
    nrow: int | None = None,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
    upscale: int = 1,
    padding: int = 1,
) -> np.ndarray:
    """Tile images (N, C, H, W) with C in (1, 3) into one uint8 array (H', W', C).

    ``nrow`` is the number of images per row (default ``ceil(sqrt(N))``); cells are separated by
    ``padding`` grey pixels (after upscaling each image ``upscale`` times, nearest neighbour).

    Example:
        >>> grid_array(torch.zeros(4, 1, 8, 8)).shape
        (19, 19, 1)
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ConfigError(f"images must be a non-empty (N, C, H, W) tensor; got {shape}")
    n, c, h, w = images.shape
    if c not in (1, 3):
        raise ConfigError(
            f"images must have 1 or 3 channels to be saved; got {c} (decode latents with the "
            "model's VAE first, or pass images[:, :1] to view one channel)"
        )
    if isinstance(upscale, bool) or not isinstance(upscale, int) or upscale < 1:
        raise ConfigError(f"upscale must be an integer >= 1; got {upscale!r}")
    low, high = float(value_range[0]), float(value_range[1])
    if not high > low:
        raise ConfigError(f"value_range must be (low, high) with high > low; got {value_range!r}")
    x = images.detach().float().cpu()
    x = ((x - low) / (high - low)).clamp(0.0, 1.0)
    x = (x * 255.0).round().to(torch.uint8)  # (N, C, H, W)
    if upscale > 1:
        x = x.repeat_interleave(upscale, dim=2).repeat_interleave(upscale, dim=3)
        h, w = h * upscale, w * upscale
    cols = nrow if nrow else math.ceil(math.sqrt(n))
    cols = max(1, min(int(cols), n))
    rows = math.ceil(n / cols)
    grid = torch.full(
        (c, rows * (h + padding) + padding, cols * (w + padding) + padding), 128, dtype=torch.uint8
    )
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, top : top + h, left : left + w] = x[i]
    return grid.permute(1, 2, 0).numpy()


def _write_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a uint8 (H, W, 1 or 3) array as a PNG, atomically (temp file, then rename)."""
    from PIL import Image

    from dynconvert.save import atomic_write_bytes

    path = Path(path)
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    os.chmod(path, 0o644)
    return path


def save_grid(
    images: torch.Tensor,
    path: str | os.PathLike,
    nrow: int | None = None,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
    upscale: int = 1,
) -> Path:
    """Save images (N, C, H, W), C in (1, 3), as one PNG grid, written atomically.

    Args:
        images: Samples, e.g. from ``sample`` (pixel space; decode latents first).
        path: The PNG file; parent folders are created.
        nrow: Images per row (default ``ceil(sqrt(N))``).
        value_range: The values mapped to black and white.
        upscale: Integer nearest-neighbour magnification of each image.

    Returns:
        The path written.

    Example:
        >>> import tempfile, torch
        >>> p = save_grid(torch.rand(10, 1, 16, 16) * 2 - 1, tempfile.mkdtemp() + "/grid.png", nrow=5)
        >>> p.suffix
        '.png'
    """
    return _write_png(grid_array(images, nrow, value_range=value_range, upscale=upscale), path)


def compare_grid(
    original: torch.Tensor,
    dynamic: torch.Tensor,
    path: str | os.PathLike,
    nrow: int | None = None,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
    upscale: int = 1,
    separator: int = 3,
) -> Path:
    """Save two grids side by side (original left, dynamic right) with a thin white separator.

    Args:
        original: Samples of the original model (N, C, H, W).
        dynamic: Samples of the converted model, same shape (same seeds: same noise per cell).
        path: The PNG file.
        nrow: Images per row of each grid.
        value_range: The values mapped to black and white.
        upscale: Integer magnification of each image.
        separator: Width in pixels of the white bar between the grids.

    Returns:
        The path written.

    Example:
        >>> import tempfile, torch
        >>> x = torch.rand(4, 1, 8, 8)
        >>> compare_grid(x, x, tempfile.mkdtemp() + "/cmp.png", value_range=(0, 1)).name
        'cmp.png'
    """
    if tuple(original.shape) != tuple(dynamic.shape):
        raise ConfigError(
            f"original {tuple(original.shape)} and dynamic {tuple(dynamic.shape)} samples must "
            "have the same shape (sample both with the same labels and seed)"
        )
    left = grid_array(original, nrow, value_range=value_range, upscale=upscale)
    right = grid_array(dynamic, nrow, value_range=value_range, upscale=upscale)
    bar = np.full((left.shape[0], max(0, int(separator)), left.shape[2]), 255, dtype=np.uint8)
    return _write_png(np.concatenate([left, bar, right], axis=1), path)


__all__ = [
    "SCHEDULERS",
    "ModelSpec",
    "compare_grid",
    "grid_array",
    "make_scheduler",
    "model_spec",
    "sample",
    "save_grid",
]
