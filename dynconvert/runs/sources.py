"""Where a run's base model comes from: names, checkpoints, folders, the hub.

:func:`resolve_source` checks a model name and where its weights come from without building
anything; the :class:`ModelSource` it returns is recorded in ``run.json`` and rebuilds the model
(or its bare architecture, for ``dynconvert.load``). :func:`weights_problem` tells, before any
download, that weights from the hub cannot come (no network). The calibration data is in
:mod:`dynconvert.runs.data`.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynconvert.errors import CheckpointError, ConfigError, ModelNotFoundError
from dynconvert.models.tiny import TINY_DIFFUSERS
from dynconvert.runs.hub import hub_problem, hub_reachable

HUB_WEIGHTS = {"DiT-XL/2": "facebook/DiT-XL-2-256", "DiT-XL/2-512": "facebook/DiT-XL-2-512"}
"""Presets with published diffusers weights on the Hugging Face hub (loaded as diffusers models)."""

PIXART_ALPHA_512 = dict(
    activation_fn="gelu-approximate", attention_bias=True, attention_head_dim=72,
    caption_channels=4096, cross_attention_dim=1152, in_channels=4, norm_elementwise_affine=False,
    norm_eps=1e-6, norm_num_groups=32, norm_type="ada_norm_single", num_attention_heads=16,
    num_embeds_ada_norm=1000, num_layers=28, out_channels=8, patch_size=2, sample_size=64,
    use_additional_conditions=False,
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

HUB_CONFIG = "transformer/config.json"
"""The file of a hub repository that tells whether its weights are cached or can be fetched."""


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
        problem = weights_problem(self)  # before diffusers is even imported
        if problem is not None:
            raise CheckpointError(problem)
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
                return cls.from_pretrained(  # from the cache when the hub cannot be reached
                    self.repo, subfolder="transformer", local_files_only=not hub_reachable()
                )
        except Exception as e:  # hub access fails in many ways (HTTP, cache, disk)
            raise CheckpointError(
                f"no weights for {self.name}: pass `checkpoint` ({_official(self.name)}a "
                f"diffusers folder), or `random_init=True` to try the pipeline; loading "
                f"{self.repo} from the Hugging Face hub failed ({first_line(e)})"
            ) from e


def weights_problem(source: ModelSource) -> str | None:
    """Why the weights of ``source`` cannot be loaded now (None when they can), found without
    a download: only weights from the hub can be missing, when it cannot be reached and they
    are not in the local cache.

    Example:
        >>> weights_problem(resolve_source("dit-xl", random_init=True)) is None
        True
    """
    if source.weights != "hub" or source.repo is None:
        return None
    problem = hub_problem(source.repo, HUB_CONFIG)
    if problem is None:
        return None
    return (
        f"no network: pass `checkpoint` ({_official(source.name)}a diffusers folder) or "
        f"`random_init=True`; the weights of {source.name} come from {source.repo} on the "
        f"Hugging Face hub, and {problem}"
    )


def _official(name: str) -> str:
    """``"the official file X, or "`` for a model whose original checkpoint has a name."""
    hint = ORIGINAL_CHECKPOINTS.get(_canonical(name))
    return f"the official file {hint}, or " if hint else ""


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
    kind, target, repo = _model_kind(name)
    if random_init:
        return ModelSource(name, kind, target, "random", model_kwargs=kwargs, seed=seed, repo=repo)
    if checkpoint:
        base = ModelSource(name, kind, target, "checkpoint", None, kwargs, seed, repo)
        return _checkpoint_source(base, checkpoint)
    if kind == "preset" and _takes_pretrained(target):
        return ModelSource(name, kind, target, "shipped", model_kwargs=kwargs, seed=seed)
    if repo is not None:
        cls = target if kind == "diffusers" else "DiTTransformer2DModel"
        return ModelSource(name, "diffusers", cls, "hub", seed=seed, repo=repo)
    hint = ORIGINAL_CHECKPOINTS.get(target)
    raise CheckpointError(
        f"{name} has no weights to start from: pass `checkpoint` (a .pt, .pth or .safetensors "
        f"file{', e.g. ' + hint if hint else ''}), or `random_init=True` to try the pipeline "
        "with random weights"
    )


def _model_kind(name: str) -> tuple[str, str, str | None]:
    """(kind, target, hub repository) of a preset or diffusers model name."""
    from dynconvert.models import resolve_name

    key = name.strip().lower()
    if key in DIFFUSERS_MODELS:
        cls, repo, _ = DIFFUSERS_MODELS[key]
        return "diffusers", cls, repo
    try:
        target = resolve_name(name)
    except ModelNotFoundError as e:
        raise ModelNotFoundError(f"{e} Diffusers models: {', '.join(DIFFUSERS_MODELS)}.") from e
    return "preset", target, HUB_WEIGHTS.get(target)


def _checkpoint_source(base: ModelSource, checkpoint: str) -> ModelSource:
    """The source of ``base`` with weights from a checkpoint file or a diffusers folder."""
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise CheckpointError(f"`checkpoint` {checkpoint}: no such file or folder; check the path")
    kind, target = base.kind, base.target
    if not path.is_dir():
        if kind == "diffusers":
            raise CheckpointError(
                f"{base.name} loads from a diffusers folder; pass the folder, not {path.name}"
            )
        return ModelSource(**{**base.to_dict(), "checkpoint": str(path.resolve()), "repo": None})
    if kind == "preset" and not target.startswith("DiT-"):
        raise CheckpointError(
            f"{checkpoint} is a folder; {target} loads from a checkpoint file (.pt, .pth, "
            ".safetensors): pass the file"
        )
    if not any((path / sub / "config.json").is_file() for sub in (".", "transformer")):
        raise CheckpointError(
            f"{checkpoint} is a folder without a diffusers config.json (or transformer/"
            "config.json); pass a diffusers model folder or a checkpoint file"
        )
    cls = "DiTTransformer2DModel" if kind == "preset" else target
    return ModelSource(
        base.name, "diffusers", cls, "folder", str(path.resolve()), seed=base.seed, repo=base.repo
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
        source = resolve_source(source.name, checkpoint=checkpoint,
                                model_kwargs=source.model_kwargs, seed=source.seed)  # fmt: skip
    elif source.checkpoint and not Path(source.checkpoint).exists():
        raise CheckpointError(
            f"the run's original weights {source.checkpoint} are gone; pass `checkpoint` to compare"
        )
    return source.build().eval()
