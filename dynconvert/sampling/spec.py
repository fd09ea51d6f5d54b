"""What sampling needs to know about a model: how to call it, its sample shape, its schedule."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch.nn as nn

from dynconvert.errors import ConfigError


@dataclass
class ModelSpec:
    """What ``sample`` needs to know about a model: how to call it and its training schedule."""

    adapter: Any  # the calibration adapter: calls the model as (x, t, batch) -> (B, C or 2C, H, W)
    channels: int | None
    image_size: int | None
    beta_schedule: str
    timestep_offset: int  # added to the scheduler's t before the call (U-ViT: trained on 1..1000)
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
    # Imported on use: the calibrate package loads the whole training loop, which importing
    # this package (dynconvert.recipes reads SCHEDULERS) should not pay for.
    from dynconvert.calibration.adapters import resolve_labels, select_adapter

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
    # DiT's learn_sigma doubles the output channels (eps, then the variance interpolation).
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
    """The first integer attribute among ``names``, read from the config, then the model."""
    for source in (config, model):  # diffusers: read the config, not the deprecated attribute
        for name in names:
            value = getattr(source, name, None) if source is not None else None
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None
