"""Where a run's base model and calibration data come from: names, checkpoints, folders, the hub.

:func:`resolve_source` checks a model name and where its weights come from without building
anything; the :class:`ModelSource` it returns is recorded in ``run.json`` and rebuilds the model
(or its bare architecture, for ``dynconvert.load``). The data helpers turn a recipe's ``data``
into a source and refuse samples that do not fit the model.
"""

from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynconvert.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ExampleInputsError,
    ModelNotFoundError,
)
from dynconvert.models.tiny import TINY_DIFFUSERS

HUB_WEIGHTS = {"DiT-XL/2": "facebook/DiT-XL-2-256", "DiT-XL/2-512": "facebook/DiT-XL-2-512"}
"""Presets with published diffusers weights on the Hugging Face hub (loaded as diffusers models)."""

PIXART_ALPHA_512 = dict(
    activation_fn="gelu-approximate", attention_bias=True, attention_head_dim=72, caption_channels=4096,
    cross_attention_dim=1152, in_channels=4, norm_elementwise_affine=False, norm_eps=1e-6,
    norm_num_groups=32, norm_type="ada_norm_single", num_attention_heads=16, num_embeds_ada_norm=1000,
    num_layers=28, out_channels=8, patch_size=2, sample_size=64, use_additional_conditions=False,
)  # fmt: skip
"""The published config of PixArt-XL-2-512x512's transformer (for inspect and random weights)."""

DIFFUSERS_MODELS = {
    "pixart-alpha": (
        "PixArtTransformer2DModel",
        "PixArt-alpha/PixArt-XL-2-512x512",
        PIXART_ALPHA_512,
    ),
}
"""Model names that are diffusers transformers: name -> (class, hub repository, config)."""

TEST_MODELS = TINY_DIFFUSERS
"""Hidden tiny diffusers models (random weights), for tests and trials."""

ORIGINAL_CHECKPOINTS = {
    "DiT-XL/2": "DiT-XL-2-256x256.pt",
    "DiT-XL/2-512": "DiT-XL-2-512x512.pt",
    "U-ViT-H/2": "imagenet256_uvit_huge.pth",
    "U-ViT-L/2": "imagenet256_uvit_large.pth",
}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class ModelSource:
    """Where the base model of a run comes from, recorded in ``run.json`` so it can be rebuilt.

    Attributes:
        name: The model as asked (``digits``, ``dit-xl``, ``pixart-alpha``).
        kind: "preset" (built-in), "diffusers" or "testing" (hidden tiny models).
        target: The canonical preset name, diffusers class, or testing builder.
        weights: "shipped", "checkpoint", "folder" (diffusers), "hub" or "random".
        checkpoint: The weights file or folder.
        model_kwargs: Constructor overrides of a preset.
        seed: Seed of random initialisation.
        repo: Hugging Face repository (weights "hub").
        config: A diffusers model's config (filled in once built), to rebuild its skeleton.
    """

    name: str
    kind: str
    target: str
    weights: str
    checkpoint: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    repo: str | None = None
    config: dict[str, Any] | None = None

    def to_dict(self, with_config: bool = True) -> dict[str, Any]:
        """The fields as a dict, for ``run.json`` (``from_dict`` reads it back).

        Args:
            with_config: Include the diffusers ``config`` when there is one.
        """
        d = {k: getattr(self, k) for k in ("name", "kind", "target", "weights", "checkpoint",
                                            "model_kwargs", "seed", "repo")}  # fmt: skip
        if with_config and self.config is not None:
            d["config"] = self.config
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSource:
        """Rebuild a source from :meth:`to_dict`'s output, checked (``guard.check_source``: a
        preset, a hidden test model or a diffusers class, nothing a file names is imported)."""
        from dynconvert.runs.guard import check_source

        return cls(**check_source(data))

    def describe(self) -> str:
        """The model and where its weights come from, e.g. ``digits (shipped weights)``."""
        where = {
            "shipped": "shipped weights",
            "random": "random weights",
            "hub": f"weights from {self.repo}",
        }
        return f"{self.name} ({where.get(self.weights, f'weights from {self.checkpoint}')})"

    def build(self) -> nn.Module:
        """The base model with its weights (random ones for weights "random")."""
        from dynconvert.models import build_model, load_checkpoint

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if self.kind == "testing":
                return TINY_DIFFUSERS[self.target](seed=self.seed)
            if self.kind == "diffusers":
                model = self._build_diffusers()
                self.config = _plain(dict(model.config))
                return model
            kwargs = dict(self.model_kwargs)
            if self.weights != "shipped" and _takes_pretrained(self.target):
                kwargs["pretrained"] = False  # random, or a checkpoint loaded below
            model = build_model(self.target, **kwargs)
            if self.weights == "checkpoint":
                load_checkpoint(model, self.checkpoint)
            return model

    def skeleton(self) -> nn.Module:
        """The architecture alone (weights to be overwritten by ``dynconvert.load``)."""
        if self.kind == "diffusers":
            import diffusers

            cls = getattr(diffusers, self.target)
            return cls.from_config(
                self.config or DIFFUSERS_MODELS.get(self.name.lower(), (0, 0, {}))[2]
            )
        return ModelSource(**{**self.to_dict(), "weights": "random"}).build()

    def _build_diffusers(self) -> nn.Module:
        import diffusers

        cls = getattr(diffusers, self.target)
        if self.weights == "random":
            return cls.from_config(self.config or DIFFUSERS_MODELS[self.name.lower()][2])
        if self.weights == "folder":
            folder = Path(self.checkpoint)
            sub = "transformer" if (folder / "transformer" / "config.json").is_file() else None
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return cls.from_pretrained(str(folder), subfolder=sub)
            except (OSError, ValueError, RuntimeError) as e:
                raise CheckpointError(
                    f"cannot load {self.target} from {folder}: {first_line(e)}"
                ) from e
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return cls.from_pretrained(
                    self.repo, subfolder="transformer", local_files_only=_offline()
                )
        except Exception as e:  # hub access fails in many ways (offline, DNS, HTTP, cache)
            hint = ORIGINAL_CHECKPOINTS.get(_canonical(self.name), "")
            raise CheckpointError(
                f"no weights for {self.name}: pass `checkpoint` (the official file{' ' + hint if hint else ''}, "
                f"or a diffusers folder), or `random_init=True` to try the pipeline; loading {self.repo} "
                f"from the Hugging Face hub failed ({first_line(e)})"
            ) from e


def _takes_pretrained(preset: str) -> bool:
    """Whether a preset's factory loads shipped weights unless told ``pretrained=False``."""
    from dynconvert.models import PRESETS

    factory = PRESETS.get(preset)
    try:
        return factory is not None and "pretrained" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def _canonical(name: str) -> str:
    from dynconvert.models import resolve_name

    try:
        return resolve_name(name)
    except ModelNotFoundError:
        return name


def first_line(e: BaseException, limit: int = 160) -> str:
    """An exception's message on one line (whitespace collapsed), cut to ``limit`` characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plain(value: Any) -> Any:
    """JSON-ready copy of a diffusers config."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def resolve_source(
    name: str,
    *,
    checkpoint: str | None = None,
    random_init: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
) -> ModelSource:
    """Check a model name and where its weights come from, without building anything.

    Raises:
        ModelNotFoundError: Unknown name (lists close matches).
        CheckpointError: A missing checkpoint, or no weights to start from.
        ConfigError: Both a checkpoint and random weights were asked for.

    Example:
        >>> resolve_source("digits").weights
        'shipped'
    """
    from dynconvert.models import resolve_name

    kwargs = dict(model_kwargs or {})
    if checkpoint and random_init:
        raise ConfigError(
            "`checkpoint` and `random_init=True` exclude each other; pass one of them"
        )
    key = name.strip().lower()
    if key in TEST_MODELS:
        if not random_init:
            raise CheckpointError(
                f"{name} is a test model with random weights only; add `random_init=True`"
            )
        return ModelSource(name, "testing", key, "random", seed=seed)
    if key in DIFFUSERS_MODELS:
        cls, repo, _ = DIFFUSERS_MODELS[key]
        kind, target = "diffusers", cls
    else:
        try:
            target = resolve_name(name)
        except ModelNotFoundError as e:
            raise ModelNotFoundError(f"{e} Diffusers models: {', '.join(DIFFUSERS_MODELS)}.") from e
        kind, repo = "preset", HUB_WEIGHTS.get(target)
    if random_init:
        return ModelSource(name, kind, target, "random", model_kwargs=kwargs, seed=seed, repo=repo)
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.exists():
            raise CheckpointError(
                f"`checkpoint` {checkpoint}: no such file or folder; check the path"
            )
        if path.is_dir():
            if kind == "preset" and not target.startswith("DiT-"):
                raise CheckpointError(
                    f"{checkpoint} is a folder; {target} loads from a checkpoint file (.pt, .pth, "
                    ".safetensors): pass the file"
                )
            if (
                not (path / "config.json").is_file()
                and not (path / "transformer" / "config.json").is_file()
            ):
                raise CheckpointError(
                    f"{checkpoint} is a folder without a diffusers config.json (or transformer/"
                    "config.json); pass a diffusers model folder or a checkpoint file"
                )
            cls = "DiTTransformer2DModel" if kind == "preset" else target
            return ModelSource(
                name, "diffusers", cls, "folder", str(path.resolve()), seed=seed, repo=repo
            )
        if kind == "diffusers":
            raise CheckpointError(
                f"{name} loads from a diffusers folder; pass the folder, not {path.name}"
            )
        return ModelSource(name, kind, target, "checkpoint", str(path.resolve()), kwargs, seed)
    if kind == "preset" and _takes_pretrained(target):
        return ModelSource(name, kind, target, "shipped", model_kwargs=kwargs, seed=seed)
    if repo is not None:
        cls = target if kind == "diffusers" else "DiTTransformer2DModel"
        return ModelSource(name, "diffusers", cls, "hub", seed=seed, repo=repo)
    hint = ORIGINAL_CHECKPOINTS.get(target)
    raise CheckpointError(
        f"{name} has no weights to start from: pass `checkpoint` (a .pt, .pth or .safetensors "
        f"file{', e.g. ' + hint if hint else ''}), or `random_init=True` to try the pipeline with random weights"
    )


def _named_inputs(model: nn.Module, batch_size: int) -> dict[str, Any]:
    """The model's example inputs by forward-argument name."""
    from dynconvert.inputs import default_inputs

    args, kwargs = default_inputs(model, batch_size=batch_size)
    names = [p for p in inspect.signature(model.forward).parameters]
    named = dict(zip(names, args))
    named.update(kwargs)
    return named


def _pick(named: dict[str, Any], names: tuple[str, ...]) -> Any:
    return next((named[n] for n in names if isinstance(named.get(n), torch.Tensor)), None)


def model_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """(C, H, W) of one sample the model takes (None when it cannot tell)."""
    from dynconvert.calibration.adapters import X_NAMES

    x = _pick(_named_inputs(model, 1), X_NAMES)
    return tuple(x.shape[1:]) if x is not None else None


def synthetic_data(model: nn.Module, rows: int = 64, seed: int = 0) -> Any:
    """Random latents (and labels / caption embeddings) shaped for ``model``: to try the pipeline.

    Example:
        >>> from dynconvert.testing import tiny_dit
        >>> len(synthetic_data(tiny_dit(), rows=8))
        8
    """
    from dynconvert.calibration import TensorSource
    from dynconvert.calibration.adapters import X_NAMES, Y_NAMES

    with torch.random.fork_rng(devices=[]):  # labels from the seed, not the global RNG
        torch.manual_seed(seed)
        named = _named_inputs(model, rows)
    x = _pick(named, X_NAMES)
    if x is None:
        raise DataError(
            f"cannot tell the input shape of {type(model).__name__}; set `data` to a latents folder"
        )
    g = torch.Generator().manual_seed(seed)
    y = _pick(named, Y_NAMES)
    cond = named.get("encoder_hidden_states")
    cond = torch.randn(cond.shape, generator=g) if isinstance(cond, torch.Tensor) else None
    mask = torch.ones(cond.shape[:2], dtype=torch.long) if cond is not None else None
    y = y.long().cpu() if y is not None and not y.is_floating_point() else None
    return TensorSource(torch.randn(x.shape, generator=g), y, cond, mask)


def data_source(data: str) -> Any:
    """The calibration data a recipe names (None for ``synthetic``: made once the model exists)."""
    from dynconvert.calibration.data import NAMED_SOURCES, as_source

    if data == "synthetic":
        return None
    if data in NAMED_SOURCES:  # a named data set (the demo registers "digits")
        return as_source(data)
    path = Path(data).expanduser()
    if not path.exists():
        names = "".join(f", {n!r}" for n in sorted(NAMED_SOURCES))
        raise DataError(f"`data` {data}: no such folder; pass a latents folder, 'synthetic'{names}")
    return as_source(path)


def check_data_shape(model: nn.Module, data: Any) -> None:
    """Refuse data whose samples do not fit the model's input (before anything is written)."""
    get = getattr(data, "get_batch", None)
    if get is None or not len(data):
        return
    try:
        want = model_input_shape(model)
    except ExampleInputsError:
        return
    x = get([0]).get("x")
    if isinstance(x, torch.Tensor) and want is not None and tuple(x.shape[1:]) != tuple(want):
        raise DataError(
            f"the data's samples have shape {tuple(x.shape[1:])} but the model takes {tuple(want)}; "
            "pass data made for this model (same channels and size)"
        )


def original_model(info: dict[str, Any], checkpoint: str | None = None) -> nn.Module:
    """The run's base model as it was before conversion (for side-by-side samples).

    Raises:
        CheckpointError: The run's weights are no longer where it found them; pass ``checkpoint``.
    """
    if not info.get("source"):
        raise CheckpointError(
            "this folder has no run.json, so its original model is unknown; compare with a run "
            "folder written by dynconvert convert"
        )
    source = ModelSource.from_dict(info["source"])
    if checkpoint is not None:
        source = resolve_source(source.name, checkpoint=checkpoint, model_kwargs=source.model_kwargs,
                                seed=source.seed)  # fmt: skip
    elif source.checkpoint and not Path(source.checkpoint).exists():
        raise CheckpointError(
            f"the run's original weights {source.checkpoint} are gone; pass `checkpoint` to compare"
        )
    return source.build().eval()
