"""The demo models: small class-conditional DiTs trained on data sets that ship with dynconvert.

A :class:`DemoModel` holds everything one demo is made of: the DiT's constructor arguments,
the shipped weights and metrics classifier, the sampler settings, its data and the defaults of
the training run that made the weights. ``DEMOS`` lists them by name (``digits``, ``translated``);
every function here takes that name, so the two demos share one builder, one weights writer, one
training loop (``dynconvert.demo.training``), one classifier (``dynconvert.demo.classifier``) and
one evaluation (``dynconvert.demo.evaluate``).

Example:
    >>> import dynconvert.demo
    >>> from dynconvert.demo.models import demo_spec
    >>> spec = demo_spec("translated")
    >>> spec.config["input_size"], spec.tokens
    (32, 64)
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dynconvert.errors import CheckpointError, ConfigError
from dynconvert.io.save import atomic_save_tensors
from dynconvert.models import PRESETS, register_preset
from dynconvert.models.dit import DiT, dit_factory
from dynconvert.models.loading import load_checkpoint

ASSETS = Path(__file__).resolve().parents[1] / "assets"
"""Where the demos' weights ship."""


@dataclass(frozen=True)
class DemoModel:
    """One demo: a DiT preset with shipped weights, its data, sampler and metrics classifier.

    Attributes:
        name: Preset, data set and evaluation name (``digits``).
        config: ``DiT`` constructor arguments.
        sampling: ``dynconvert.sampling.sample`` settings the demo samples with.
        data: ``data() -> TensorSource``: the reference images (Frechet distance, calibration).
        train_data: ``train_data() -> TensorSource``: what the DiT and classifier train on.
        training: Defaults of ``train_digits`` for this demo (steps, batch_size, lr, ...).
        aliases: Other preset names.
        script: The example script that retrains the weights.
    """

    name: str
    config: dict
    sampling: dict
    data: Callable[[], Any]
    train_data: Callable[[], Any]
    training: dict = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    script: str = "examples/train_digits.py"

    @property
    def weights(self) -> Path:
        """The shipped DiT weights (fp16 safetensors)."""
        return ASSETS / f"{self.name}_dit.safetensors"

    @property
    def classifier(self) -> Path:
        """The shipped metrics classifier weights (fp16 safetensors)."""
        return ASSETS / f"{self.name}_classifier.safetensors"

    @property
    def image_size(self) -> int:
        """Side of the model's (and the classifier's) square one-channel images."""
        return int(self.config["input_size"])

    @property
    def tokens(self) -> int:
        """Tokens per image (patches)."""
        return (self.image_size // int(self.config["patch_size"])) ** 2


DEMOS: dict[str, DemoModel] = {}
"""Demo name -> :class:`DemoModel` (filled by ``dynconvert.demo.digits`` and ``.translated``)."""


def demo_spec(name: str) -> DemoModel:
    """The demo called ``name`` (a preset name or alias).

    Raises:
        ConfigError: No such demo; the message lists them.

    Example:
        >>> demo_spec("dit-digits").name
        'digits'
    """
    for spec in DEMOS.values():
        if name == spec.name or name in spec.aliases:
            return spec
    raise ConfigError(f"no demo called {name!r}; the demos are {', '.join(sorted(DEMOS))}")


def build_demo(name: str, pretrained: bool = True, **overrides: Any) -> nn.Module:
    """Build a demo's DiT, with its shipped trained weights unless ``pretrained=False``.

    Args:
        name: The demo (``digits``, ``translated``).
        pretrained: Load the shipped weights (only possible when the overrides keep every weight
            shape). ``False`` gives DiT's random initialisation.
        **overrides: ``DiT`` constructor arguments that replace the demo's config.

    Returns:
        The model (in training mode, like every preset; call ``.eval()`` to sample).

    Raises:
        ConfigError: An override ``DiT`` does not take.
        CheckpointError: The weights file is missing, or the overrides change a weight shape
            (pass ``pretrained=False``).

    Example:
        >>> build_demo("translated", pretrained=False, depth=2).preset_kwargs
        {'pretrained': False, 'depth': 2}
    """
    spec = demo_spec(name)
    valid = [p for p in inspect.signature(DiT.__init__).parameters if p != "self"]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ConfigError(
            f"Unknown option(s) {', '.join(unknown)} for preset {spec.name!r} (DiT); valid "
            f"options: pretrained, {', '.join(valid)}."
        )
    model = dit_factory(spec.name, **spec.config)(**overrides)
    if not pretrained:
        model.preset_kwargs = {"pretrained": False, **overrides}
        return model
    if not spec.weights.is_file():
        raise CheckpointError(
            f"the {spec.name} weights {spec.weights} are missing from this installation; "
            f"reinstall dynconvert, run {spec.script}, or pass pretrained=False"
        )
    try:
        load_checkpoint(model, spec.weights)
    except CheckpointError as err:
        raise CheckpointError(
            f"{err} The shipped {spec.name} weights fit its config only; pass pretrained=False "
            "to build a changed architecture with random weights."
        ) from err
    return model


def save_demo_weights(model: nn.Module, name: str, path: str | os.PathLike | None = None) -> Path:
    """Write a demo model's state dict as fp16 safetensors, atomically (temp file, rename).

    ``pos_embed`` (a fixed sin-cos table) is kept, as in DiT checkpoints.

    Args:
        model: The trained DiT.
        name: Its demo (whose config goes into the file's metadata).
        path: Where to write (default: the shipped weights file of the demo).

    Example:
        >>> import tempfile
        >>> model = build_demo("digits", pretrained=False)
        >>> p = save_demo_weights(model, "digits", tempfile.mkdtemp() + "/w.safetensors")
        >>> p.stat().st_size < 5_000_000
        True
    """
    spec = demo_spec(name)
    state = {k: v.detach().cpu().half().contiguous() for k, v in model.state_dict().items()}
    return atomic_save_tensors(
        state, spec.weights if path is None else path,
        metadata={"format": "pt", "config": repr(spec.config)},
    )  # fmt: skip


def demo_model_info(name: str) -> dict:
    """Facts about a demo model for reports: config, parameter count, weights file size.

    Example:
        >>> demo_model_info("translated")["config"]["patch_size"]
        4
    """
    spec = demo_spec(name)
    with torch.device("meta"):
        params = sum(p.numel() for p in DiT(**spec.config).parameters())
    return {
        "config": dict(spec.config),
        "tokens": spec.tokens,
        "parameters": int(params),
        "weights": str(spec.weights),
        "weights_bytes": spec.weights.stat().st_size if spec.weights.is_file() else None,
    }


def register_demo(spec: DemoModel) -> None:
    """Add a demo to ``DEMOS`` and its preset to ``dynconvert.models`` (no-op when there).

    Example:
        >>> register_demo(demo_spec("digits"))
        >>> from dynconvert.models import resolve_name
        >>> resolve_name("dit-digits")
        'digits'
    """
    DEMOS.setdefault(spec.name, spec)
    if spec.name not in PRESETS:

        def factory(pretrained: bool = True, **overrides: Any) -> nn.Module:
            return build_demo(spec.name, pretrained, **overrides)

        factory.__doc__ = f"The {spec.name} demo DiT (see dynconvert.demo.models.build_demo)."
        register_preset(spec.name, factory, aliases=spec.aliases)
