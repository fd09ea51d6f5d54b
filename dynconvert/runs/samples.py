"""Sample grids of a run: the classes to draw, the samples of the dynamic model (and of the
original, same seeds), decoded to images and written as one PNG."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynconvert.errors import CheckpointError, ConfigError
from dynconvert.flops import last_flops_ratio
from dynconvert.runs.sources import first_line
from dynconvert.runtime.routing import routing
from dynconvert.runtime.state import get_state, is_converted
from dynconvert.sampling import compare_grid, comparison_titles, model_spec, sample, save_grid


def class_labels(model: nn.Module, labels: list[int] | None = None) -> list[int] | None:
    """The labels to sample (given, or the first classes up to 10); None for unconditional
    models."""

    spec = model_spec(model)
    if not spec.uses_labels or spec.num_classes is None:
        return None
    if labels is not None:
        bad = [v for v in labels if not 0 <= v < spec.num_classes]
        if bad:
            raise ConfigError(f"labels {bad} are outside 0..{spec.num_classes - 1} of this model")
        return list(labels)
    if spec.num_classes >= 1000:
        return [207, 360, 387, 974, 88, 979, 417, 279]  # DiT's sample.py classes
    return list(range(min(spec.num_classes, 10)))


def draw(model: nn.Module, settings: Any, labels: list[int] | None, full: bool = False,
         on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:  # fmt: skip
    """Samples of ``model`` (routing "full" when ``full``) with the settings' sampler and seed."""

    spec = model_spec(model)
    kwargs = dict(labels=labels, steps=settings.steps, cfg_scale=settings.cfg_scale,
                  seed=settings.seed, scheduler=settings.scheduler,
                  clip_sample=spec.channels in (1, 3), on_step=on_step,
                  num_samples=None if labels else 8)  # fmt: skip
    if spec.adapter.needs_cond:
        raise ConfigError(
            "sampling a text-conditional model needs caption embeddings: use "
            "dynconvert.sampling.sample(model, cond=...) from Python"
        )
    if full and is_converted(model):
        with routing(model, "full"):
            return sample(model, **kwargs)
    return sample(model, **kwargs)


def write_samples(dynamic: nn.Module, original: nn.Module | None, path: Path, settings: Any,
                  vae: str | None = None, raw: bool = False) -> Path:  # fmt: skip
    """``path``: a grid of the dynamic model's samples, beside the original's when given
    (titled "original" and "dynamic" with the FLOPs ratio of the calls that drew them).

    Example:
        >>> write_samples(model, original, Path("grid.png"), recipe.samples)  # doctest: +SKIP
    """
    labels = class_labels(dynamic, getattr(settings, "labels", None))
    ratios: list[float] = []
    images = to_images(draw(dynamic, settings, labels, on_step=_flops_probe(dynamic, ratios)),
                       vae, raw)  # fmt: skip
    nrow = min(len(images), 10) if len(images) <= 10 else None
    if original is None:
        return save_grid(images, path, nrow=nrow, upscale=_upscale(images))
    base = to_images(draw(original, settings, labels), vae, raw)
    ratio = sum(ratios) / len(ratios) if ratios else None
    return compare_grid(base, images, path, nrow=nrow, upscale=_upscale(images),
                        titles=comparison_titles(ratio))  # fmt: skip


def _flops_probe(model: nn.Module, ratios: list[float]) -> Callable[[int, int], None] | None:
    """An ``on_step`` callback appending the whole-model FLOPs ratio of each denoising call of
    a converted model to ``ratios`` (None for a plain model)."""
    if not is_converted(model):
        return None
    bank = get_state(model)

    def probe(done: int, total: int) -> None:
        ratios.append(float(last_flops_ratio(bank).mean()))

    return probe


def _upscale(images: torch.Tensor) -> int:
    return max(1, 64 // int(images.shape[-1]))


def to_images(x: torch.Tensor, vae: str | None = None, raw: bool = False) -> torch.Tensor:
    """Samples as images in [-1, 1]: decoded through a local VAE folder when given."""
    if vae is not None:
        from diffusers import AutoencoderKL

        path = Path(vae).expanduser()
        if not path.is_dir():
            raise CheckpointError(
                f"`vae` {vae}: no such folder; pass a local diffusers AutoencoderKL folder"
            )
        try:
            model = AutoencoderKL.from_pretrained(
                str(path), subfolder="vae" if (path / "vae").is_dir() else None
            )
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load a VAE from {path}: {first_line(e)}") from e
        model = model.to(x.device).eval()
        with torch.no_grad():
            return model.decode(x / float(model.config.scaling_factor)).sample.clamp(-1, 1)
    if x.shape[1] in (1, 3):
        return x.clamp(-1, 1)
    if raw:
        return (x[:, :3] / 3.0).clamp(-1, 1)
    raise ConfigError(
        f"the samples are {x.shape[1]}-channel latents: pass `vae` (a local diffusers "
        "AutoencoderKL folder) to decode them, or `raw=True` to write their first 3 channels "
        "as colours"
    )


def match_run_budget(model: nn.Module, settings: Any, report: Any, target: float) -> dict:
    """The run's sampling-budget step (``report.sampling_budget`` held-out samples): shift the
    router thresholds so that the recipe's sampler (``samples``: steps, guidance, scheduler) spends
    ``target`` on held-out noise (seed ``samples.seed + 1``); what it did, for the record. A
    budget-conditioned model is fitted at every budget of its grid (``match_budget_grid``).

    Example:
        >>> match_run_budget(model, recipe.samples, recipe.report, 0.5)["after"]  # doctest: +SKIP
        0.5
    """
    from dynconvert.sampling.budget import match_budget_grid, match_sampling_budget

    spec = model_spec(model)
    labels = class_labels(model, getattr(settings, "labels", None))
    if spec.adapter.needs_cond or labels is None:
        return {"skipped": "the sampler needs class labels (not captions) to draw held-out samples"}
    n = int(report.sampling_budget)
    held_out = dict(
        labels=torch.tensor(labels).repeat(n // len(labels) + 1)[:n], steps=settings.steps,
        cfg_scale=settings.cfg_scale, scheduler=settings.scheduler, seed=settings.seed + 1,
        clip_sample=spec.channels in (1, 3),
    )  # fmt: skip
    if get_state(model).budget_range is not None:  # every budget of its grid (a range)
        return match_budget_grid(model, **held_out).to_dict()
    return match_sampling_budget(model, target, **held_out).to_dict()
