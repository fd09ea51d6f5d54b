"""What ``dynconvert inspect`` builds: a model's architecture on the meta device (a preset, a
tiny test model, a diffusers class, or a published configuration at its real size) and the
memory columns of its summary."""

from __future__ import annotations

import json as json_lib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynconvert.errors import ConfigError, ModelNotFoundError

if TYPE_CHECKING:
    import torch


def build_for_inspect(name: str) -> Any:
    """The model's architecture without weights (meta device) where possible."""
    import torch

    from dynconvert.runs import DIFFUSERS_MODELS, TEST_MODELS, resolve_source

    key = name.strip().lower()
    if key in TEST_MODELS:
        return resolve_source(name, random_init=True).build()
    if key in DIFFUSERS_MODELS:
        import diffusers

        cls, _, config = DIFFUSERS_MODELS[key]
        with torch.device("meta"):
            return getattr(diffusers, cls).from_config(config)
    from dynconvert.models import build_model, resolve_name

    canonical = resolve_name(name)
    kwargs = {"pretrained": False} if canonical == "digits" else {}
    with torch.device("meta"):
        return build_model(canonical, **kwargs)


def real_size_model(
    name: str | None, cls: str | None, config: Path | None, pixels: tuple
) -> tuple[Any, dict, dict] | None:
    """A published configuration on meta and its inputs at its size and at its probe's: for
    ``--model`` naming a shipped one (flux-dev, wan2.1-t2v-14b...) or for ``--diffusers CLASS
    --config FILE``; None when ``--model`` names something else (a preset)."""
    from dynconvert.testing.configs import build, for_class, is_real_config, real_config

    if cls is None:
        from dynconvert.models import resolve_name
        from dynconvert.runs import DIFFUSERS_MODELS, TEST_MODELS

        key = name.strip().lower()
        if key in TEST_MODELS or key in DIFFUSERS_MODELS or not is_real_config(name):
            return None
        try:
            resolve_name(name)
            return None  # a built-in preset keeps its name
        except ModelNotFoundError:
            pass
        entry = real_config(name)
        settings = entry.config()
    else:
        if config is None:
            raise ConfigError(
                "--diffusers CLASS needs --config FILE (the model's config.json, no weights)"
            )
        entry = for_class(cls)
        try:
            settings = json_lib.loads(Path(config).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"--config {config}: not a readable JSON file ({e})") from e
    net = build(entry.class_name, settings)
    size = entry.size_at(*pixels)
    return net, entry.inputs(net, size), entry.inputs(net, entry.probe)


def inspect_target(
    name: str | None, cls: str | None, config: Path | None, pixels: tuple
) -> tuple[Any, Any, Any]:
    """What ``inspect`` analyses: ``(model on meta, inputs, probe inputs)`` for a published
    configuration at its size, ``(model, None, None)`` for a preset or a tiny model (its own
    example inputs)."""
    real = real_size_model(name, cls, config, pixels)
    if real is not None:
        return real
    if any(p is not None for p in pixels):
        raise ConfigError(
            "--height, --width and --frames apply to a published configuration "
            "(inspect --model flux-dev, or --diffusers CLASS --config FILE)"
        )
    return build_for_inspect(name), None, None


def to_device(value: Any, device: torch.device) -> Any:
    """Example inputs on the model's device (meta for weightless models)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def memory_columns(net: Any, plan: Any) -> dict[str, Any]:
    """Parameters, and what calibration holds besides activations (bf16 weights)."""
    import torch

    from dynconvert.calibration.memory import memory_plan
    from dynconvert.config import ConvertConfig
    from dynconvert.runtime.bank import RouterBank

    params = sum(p.numel() for p in net.parameters())
    with torch.device("meta"):  # the routers' shapes only
        routers = sum(p.numel() for p in RouterBank(plan, ConvertConfig(), 1.0).parameters())
    gb = {k: v / 2**30 for k, v in memory_plan(params + routers, routers).items()}
    return {"params": params, "router_params": routers, "calibration_gib": gb}
