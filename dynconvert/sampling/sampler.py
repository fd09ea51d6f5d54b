"""``sample``: classifier-free-guided denoising of a (converted) model with a diffusers scheduler.

The samples are drawn in chunks of ``batch_size``; each chunk gets a fresh scheduler and, with
guidance, runs conditional and unconditional rows in one batch at the same timestep.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from dynconvert.errors import ConfigError
from dynconvert.sampling.schedulers import fresh_scheduler
from dynconvert.sampling.spec import ModelSpec, model_spec


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
    _check_steps_and_scale(steps, cfg_scale)
    run_device, dtype = _placement(model, device)
    y, n = _labels(spec, labels, cond, num_samples)
    guided = float(cfg_scale) != 1.0 and (y is not None or cond is not None)
    _check_guidance(spec, guided, y, cond, null_cond)
    c, size = _sample_shape(model, spec, channels, image_size)
    gen = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    # All the noise up front, on the CPU in float32: a seed gives the same (N, C, H, W) noise
    # on every device and dtype, and for any chunking.
    noise = torch.randn((n, c, size, size), generator=gen, dtype=torch.float32)
    conditioning = _Conditioning(y, cond, cond_mask, null_cond, null_cond_mask, guided)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            chunk = n if batch_size is None else max(1, int(batch_size))
            return torch.cat(list(_chunks(
                model, spec, noise, conditioning, chunk, steps, scheduler, clip_sample,
                float(cfg_scale), gen, dtype, run_device, on_step,
            )))  # fmt: skip
    finally:
        model.train(was_training)


@dataclass
class _Conditioning:
    """The labels or captions of all N samples, and the unconditional rows of guidance."""

    y: torch.Tensor | None
    cond: torch.Tensor | None
    cond_mask: torch.Tensor | None
    null_cond: torch.Tensor | None
    null_cond_mask: torch.Tensor | None
    guided: bool

    def rows(self, rows: slice, spec: ModelSpec, device: torch.device) -> dict[str, torch.Tensor]:
        """The conditioning of one chunk of rows (see :func:`_batch`)."""
        return _batch(self.y, self.cond, self.cond_mask, rows, self.guided, spec, self.null_cond,
                      self.null_cond_mask, device)  # fmt: skip


def _chunks(
    model: nn.Module,
    spec: ModelSpec,
    noise: torch.Tensor,
    conditioning: _Conditioning,
    chunk: int,
    steps: int,
    scheduler: str | Any,
    clip_sample: bool,
    cfg_scale: float,
    gen: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
    on_step: Callable[[int, int], None] | None,
) -> Iterator[torch.Tensor]:
    """The samples of each chunk of ``chunk`` rows, each denoised with a fresh scheduler."""
    starts = list(range(0, noise.shape[0], chunk))
    total = steps * len(starts)
    for k, start in enumerate(starts):
        rows = slice(start, start + chunk)
        batch = conditioning.rows(rows, spec, device)
        sched = fresh_scheduler(scheduler, spec, clip_sample)
        sched.set_timesteps(steps, device=device)

        def progress(i: int, k: int = k) -> None:
            if on_step is not None:
                on_step(k * steps + i, total)

        x = noise[rows].to(device) * float(sched.init_noise_sigma)  # (n_k, C, H, W)
        yield _denoise(
            model, spec, sched, x, batch, conditioning.guided, cfg_scale, gen, dtype, progress
        )


def _sample_shape(
    model: nn.Module, spec: ModelSpec, channels: int | None, image_size: int | None
) -> tuple[int, int]:
    """(channels, side) of one sample: as given, else from the model."""
    c = channels or spec.channels
    size = image_size or spec.image_size
    if not c or not size:
        raise ConfigError(
            f"cannot tell the sample shape of {type(model).__name__}; pass image_size= and "
            "channels="
        )
    return c, size


def _check_steps_and_scale(steps: Any, cfg_scale: Any) -> None:
    """Refuse a step count outside 1..1000 and a guidance scale that is not a finite number."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise ConfigError(
            f"steps must be an integer in 1..1000 (the training steps); got {steps!r}"
        )
    if not isinstance(cfg_scale, (int, float)) or not math.isfinite(cfg_scale):
        raise ConfigError(
            f"cfg_scale must be a finite number (1.0: no guidance); got {cfg_scale!r}"
        )


def _placement(
    model: nn.Module, device: torch.device | str | None
) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) to sample on: ``device`` (default the model's), which must be the
    model's, and the model's floating dtype (float32 for a model without parameters)."""
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
    return run_device, dtype


def _check_guidance(
    spec: ModelSpec,
    guided: bool,
    y: torch.Tensor | None,
    cond: torch.Tensor | None,
    null_cond: torch.Tensor | None,
) -> None:
    """Refuse guidance without its unconditional input (a null label or the empty prompt)."""
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
        y = torch.as_tensor(labels).reshape(-1).long().cpu()  # (N,)
        if y.numel() == 0:
            raise ConfigError("labels is empty; pass at least one class label")
        limit = spec.num_classes if spec.num_classes is not None else None
        # The null label may sit just past the classes (DiT: num_classes): asking for it samples
        # unconditionally, which is allowed.
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
            part = torch.cat([part, torch.full_like(part, int(spec.null_label))])  # (2n,)
        batch["y"] = part.to(device)
    if cond is not None:
        part = cond[rows]  # (n, L, D)
        mask = (  # (n, L)
            cond_mask[rows]
            if cond_mask is not None
            else torch.ones(part.shape[:2], dtype=torch.long)
        )
        if guided:
            # The empty prompt: (L, D) or (1, L, D) is shared by every row, (N, L, D) is per row.
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
                    f"null_cond {tuple(neg.shape[1:])} must match cond "
                    f"{tuple(part.shape[1:])} (L, D)"
                )
            part = torch.cat([part, neg.to(part.dtype)])  # (2n, L, D)
            mask = torch.cat([mask.to(device), neg_mask.to(device, mask.dtype)])
        batch["cond"] = part.to(device)
        batch["cond_mask"] = mask.to(device)
    return batch


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
    # Only DDPM with a learned variance reads the variance channels; the others take eps alone.
    learned_range = getattr(sched.config, "variance_type", None) in ("learned", "learned_range")
    for i, t in enumerate(sched.timesteps):
        x_in = sched.scale_model_input(x, t)
        x_in = torch.cat([x_in, x_in]) if guided else x_in  # (B, C, H, W), B = 2n with guidance
        # One training timestep for the whole batch (both halves share one set of width masks).
        t_in = (t + spec.timestep_offset).reshape(1).expand(x_in.shape[0]).to(x.device)  # (B,)
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
            var = var.chunk(2)[0] if var is not None else None  # the conditional half's, as DiT
        model_output = torch.cat([eps, var], dim=1) if learned_range and var is not None else eps
        x = sched.step(model_output, t, x, generator=gen).prev_sample  # (n, C, H, W)
        progress(i + 1)
    return x
