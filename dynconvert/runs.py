"""Run folders: what ``dynconvert convert`` does end to end, usable from Python too.

A run builds the base model, converts it, calibrates it toward the FLOPs target, measures the
result and writes everything into one folder::

    runs/digits-0.5/
      run.json            what was asked (model, target, recipe) and the run's status
      checkpoints/        resumable calibration checkpoints (step-0000100.pt, ...)
      model.safetensors   the converted, calibrated model (EMA weights) ...
      dynconvert.json     ... and its record: dynconvert.load("runs/digits-0.5")
      samples.png         original (left) vs dynamic (right), same seeds (when the recipe asks)
      report.json         the figures: FLOPs ratio, executed ratio, speed-up, quality metrics

Every check that can fail on bad input (recipe, model name, budget, checkpoint, data, output
folder) runs in :func:`prepare_run`, before the folder is created; :func:`execute_run` then
writes. A run that fails before its first checkpoint removes the folder it created; after that
the checkpoints stay and ``resume=True`` continues.

Example:
    >>> from dynconvert.runs import RunRequest, convert_run
    >>> report = convert_run(RunRequest(model="digits", target_flops=0.5))  # doctest: +SKIP
    >>> report["flops_ratio"], report["run_dir"]                            # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import inspect
import json
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynconvert.errors import (
    BudgetError,
    CheckpointError,
    ConfigError,
    DataError,
    ExampleInputsError,
    ModelNotFoundError,
    OutputExistsError,
    RecordError,
)
from dynconvert.recipes import (
    Recipe,
    apply_overrides,
    read_recipe_data,
    recipe_for_model,
    recipe_from_dict,
)

RUN_FILE = "run.json"
REPORT_FILE = "report.json"
SAMPLES_FILE = "samples.png"
RUN_FORMAT = "dynconvert-run"
RUN_VERSION = 1
UNIT = "MACs"

EventFn = Callable[[str, str], None]
"""``on_event(stage, message)``: progress of the stages around calibration, for a CLI to show."""

HUB_WEIGHTS = {"DiT-XL/2": "facebook/DiT-XL-2-256", "DiT-XL/2-512": "facebook/DiT-XL-2-512"}
"""Presets with published diffusers weights on the Hugging Face hub (loaded as diffusers models)."""

PIXART_ALPHA_512 = dict(
    activation_fn="gelu-approximate", attention_bias=True, attention_head_dim=72, caption_channels=4096,
    cross_attention_dim=1152, in_channels=4, norm_elementwise_affine=False, norm_eps=1e-6,
    norm_num_groups=32, norm_type="ada_norm_single", num_attention_heads=16, num_embeds_ada_norm=1000,
    num_layers=28, out_channels=8, patch_size=2, sample_size=64, use_additional_conditions=False,
)  # fmt: skip
"""The published config of PixArt-XL-2-512x512's transformer (for inspect and --random-init)."""

DIFFUSERS_MODELS = {
    "pixart-alpha": (
        "PixArtTransformer2DModel",
        "PixArt-alpha/PixArt-XL-2-512x512",
        PIXART_ALPHA_512,
    ),
}
"""Model names that are diffusers transformers: name -> (class, hub repository, config)."""

TEST_MODELS = {"diffusers-dit-tiny": "diffusers-dit", "pixart-tiny": "pixart"}
"""Hidden tiny models from ``dynconvert.testing`` (random weights), for tests and trials."""

ORIGINAL_CHECKPOINTS = {
    "DiT-XL/2": "DiT-XL-2-256x256.pt",
    "DiT-XL/2-512": "DiT-XL-2-512x512.pt",
    "U-ViT-H/2": "imagenet256_uvit_huge.pth",
    "U-ViT-L/2": "imagenet256_uvit_large.pth",
}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------------- model source


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
        d = {k: getattr(self, k) for k in ("name", "kind", "target", "weights", "checkpoint",
                                            "model_kwargs", "seed", "repo")}  # fmt: skip
        if with_config and self.config is not None:
            d["config"] = self.config
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSource:
        return cls(**data)

    def describe(self) -> str:
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
                from dynconvert.testing import TINY_BUILDERS

                return TINY_BUILDERS[self.target](seed=self.seed)
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
                    f"cannot load {self.target} from {folder}: {_first_line(e)}"
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
                f"no weights for {self.name}: pass --checkpoint (the official file{' ' + hint if hint else ''}, "
                f"or a diffusers folder), or --random-init to try the pipeline; loading {self.repo} "
                f"from the Hugging Face hub failed ({_first_line(e)})"
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


def _first_line(e: BaseException, limit: int = 160) -> str:
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
        raise ConfigError("--checkpoint and --random-init exclude each other; pass one of them")
    key = name.strip().lower()
    if key in TEST_MODELS:
        if not random_init:
            raise CheckpointError(
                f"{name} is a test model with random weights only; add --random-init"
            )
        return ModelSource(name, "testing", TEST_MODELS[key], "random", seed=seed)
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
                f"--checkpoint {checkpoint}: no such file or folder; check the path"
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
        f"{name} has no weights to start from: pass --checkpoint PATH (a .pt, .pth or .safetensors "
        f"file{', e.g. ' + hint if hint else ''}), or --random-init to try the pipeline with random weights"
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
    from dynconvert.calibrate.adapters import X_NAMES

    x = _pick(_named_inputs(model, 1), X_NAMES)
    return tuple(x.shape[1:]) if x is not None else None


def synthetic_data(model: nn.Module, rows: int = 64, seed: int = 0) -> Any:
    """Random latents (and labels / caption embeddings) shaped for ``model``: to try the pipeline.

    Example:
        >>> from dynconvert.testing import tiny_dit
        >>> len(synthetic_data(tiny_dit(), rows=8))
        8
    """
    from dynconvert.calibrate import TensorSource
    from dynconvert.calibrate.adapters import X_NAMES, Y_NAMES

    named = _named_inputs(model, rows)
    x = _pick(named, X_NAMES)
    if x is None:
        raise DataError(
            f"cannot tell the input shape of {type(model).__name__}; pass --data a latents folder"
        )
    g = torch.Generator().manual_seed(seed)
    y = _pick(named, Y_NAMES)
    cond = named.get("encoder_hidden_states")
    cond = torch.randn(cond.shape, generator=g) if isinstance(cond, torch.Tensor) else None
    mask = torch.ones(cond.shape[:2], dtype=torch.long) if cond is not None else None
    y = y.long().cpu() if y is not None and not y.is_floating_point() else None
    return TensorSource(torch.randn(x.shape, generator=g), y, cond, mask)


# -------------------------------------------------------------------------------------- prepare


def parse_target(value: Any) -> float:
    """A FLOPs target from the command line or Python: a number in (0, 1].

    Example:
        >>> parse_target("0.5")
        0.5
    """
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise BudgetError(
                f"--target-flops must be a number in (0, 1] (a fraction of the original FLOPs, "
                f"e.g. 0.5); got {value!r}"
            ) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BudgetError(f"--target-flops must be a number in (0, 1], e.g. 0.5; got {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise BudgetError(
            f"--target-flops must be in (0, 1] (a fraction of the original FLOPs, e.g. 0.5 for "
            f"half); got {value:g}"
        )
    return float(value)


@dataclass
class RunRequest:
    """What the user asked for (the options of ``dynconvert convert``).

    Attributes:
        model: Preset name or alias, or a diffusers model name (``pixart-alpha``); default: the
            recipe's model.
        target_flops: FLOPs budget in (0, 1]; default: the recipe's.
        recipe: Shipped recipe name or YAML file; default: the recipe for ``model``.
        checkpoint: Weights file or diffusers folder.
        data: Latents folder, ``digits`` or ``synthetic``; default: the recipe's.
        steps: Calibration steps (overrides ``calibration.steps``).
        out: Run folder; default ``runs/<model>-<target>``.
        device: "auto", "cpu" or "cuda".
        resume: Continue the run in ``out``.
        random_init: Start from random weights (to try the pipeline).
        overrides: ``key=value`` recipe overrides (``calibration.lr=2e-5``).
    """

    model: str | None = None
    target_flops: float | str | None = None
    recipe: str | None = None
    checkpoint: str | None = None
    data: str | None = None
    steps: int | None = None
    out: str | None = None
    device: str = "auto"
    resume: bool = False
    random_init: bool = False
    overrides: list[str] = field(default_factory=list)


@dataclass
class PreparedRun:
    """A checked run with its converted model, ready to execute: nothing written yet."""

    request: RunRequest
    recipe: Recipe
    source: ModelSource
    target: float
    out: Path
    device: str
    calibration: Any
    model: nn.Module
    data: Any
    identity: dict[str, Any]
    previous: dict[str, Any] | None = None
    main_process: bool = True


def default_out(model: str, target: float) -> Path:
    """``runs/<model>-<target>``, e.g. ``runs/digits-0.5``.

    Example:
        >>> default_out("DiT-XL/2", 0.5).as_posix()
        'runs/dit-xl-2-0.5'
    """
    slug = model.strip().lower().replace("/", "-").replace(" ", "-")
    return Path("runs") / f"{slug}-{target:g}"


def resolve_recipe(name: str | None, overrides: list[str], explicit: dict[str, Any]) -> Recipe:
    """A recipe with ``--set`` overrides applied, then the explicit options (typed) on top."""
    if name is None:
        data, source = {"name": "default"}, None
    else:
        data, path = read_recipe_data(name)
        source = str(path)
    where = f"recipe {data.get('name')}"
    try:
        data = apply_overrides(data, overrides)
        data = apply_overrides(data, {k: v for k, v in explicit.items() if v is not None})
        return recipe_from_dict(data, source)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from e


def _resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda; got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine; use --device cpu")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _normal_path(value: str | None) -> str | None:
    """An absolute path for a path that exists (``latents/`` and ``./latents`` are the same)."""
    if value is None or value in ("digits", "synthetic") or not Path(value).expanduser().exists():
        return value
    return str(Path(value).expanduser().resolve())


def _identity(recipe: Recipe, source: ModelSource, target: float) -> dict[str, Any]:
    """What makes two runs the same run (everything but the length and the reporting)."""
    from dynconvert.calibrate.config import RESUME_FREE_FIELDS

    return {
        "model": source.to_dict(with_config=False),
        "target_flops": target,
        "recipe": recipe.name,
        "data": _normal_path(recipe.data),
        "convert": recipe.convert_config().to_dict(),
        "calibration": {k: v for k, v in recipe.calibration.items() if k not in RESUME_FREE_FIELDS},
    }


def _differences(now: dict[str, Any], was: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(now) | set(was)):
        a, b = now.get(k), was.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} ({b!r} there, {a!r} now)")
    return out


def read_run(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``run.json`` of a run folder, or None when there is none."""
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise OutputExistsError(f"{path} is unreadable ({e}); choose another --out") from e
    if not isinstance(data, dict) or data.get("format") != RUN_FORMAT:
        raise OutputExistsError(f"{path} is not a dynconvert run file; choose another --out")
    return data


def check_out(
    out: Path, identity: dict[str, Any], resume: bool, steps: int
) -> dict[str, Any] | None:
    """Refuse an output folder that holds another run; returns the run there when resuming.

    Raises:
        OutputExistsError: The folder holds another run, a finished one, or other files, or
            ``resume`` was asked where there is nothing to resume. The message names the fix.
    """
    from dynconvert.calibrate.checkpoint import list_checkpoints

    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} is a file; choose a folder")
    if not out.exists() or not any(out.iterdir()):
        if resume:
            raise OutputExistsError(
                f"nothing to resume in {out}: no run there; drop --resume to start one"
            )
        return None
    previous = read_run(out)
    if previous is None:
        raise OutputExistsError(
            f"{out} is not empty and holds no dynconvert run; choose another --out"
        )
    was = previous.get("identity", {})
    desc = f"{was.get('model', {}).get('name')} at target {was.get('target_flops')}, recipe {was.get('recipe')}"
    diff = _differences(identity, was)
    if diff:
        more = f" and {len(diff) - 2} more" if len(diff) > 2 else ""
        raise OutputExistsError(
            f"{out} holds another run ({desc}) that differs in {'; '.join(diff[:2])}{more}; choose "
            "another --out, or repeat that run's options with --resume to continue it"
        )
    found = list_checkpoints(out)
    last = found[-1][0] if found else 0
    if previous.get("status") == "finished":
        if not resume:
            raise OutputExistsError(
                f"{out} holds a finished run ({desc}, {last} steps); choose another --out, or "
                f"add --resume with --steps above {last} to calibrate it further"
            )
        if steps <= last:
            raise OutputExistsError(
                f"the run in {out} already finished {last} steps; --resume needs --steps above {last}, "
                "or choose another --out"
            )
    elif not resume:
        raise OutputExistsError(
            f"{out} holds an unfinished run of these settings ({last} steps checkpointed); add "
            "--resume to continue it, or choose another --out"
        )
    return previous


def prepare_run(request: RunRequest, on_event: EventFn | None = None) -> PreparedRun:
    """Check everything and build the converted model; writes nothing.

    Raises:
        DynconvertError: A bad recipe, model name, budget, checkpoint, data set, device or
            output folder (each message names the fix).
    """
    import dynconvert

    event = on_event or (lambda stage, msg: None)
    target = parse_target(request.target_flops) if request.target_flops is not None else None
    steps = request.steps
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"--steps must be an integer >= 1; got {steps!r}")
    recipe_name = request.recipe
    if recipe_name is None and request.model is not None:
        recipe_name = recipe_for_model(request.model)
    explicit = {"model": request.model, "target_flops": target, "checkpoint": request.checkpoint,
                "data": request.data, "calibration.steps": steps}  # fmt: skip
    recipe = resolve_recipe(recipe_name, list(request.overrides), explicit)
    if recipe.model is None:
        raise ConfigError(
            "no model: pass --model NAME (e.g. --model digits) or a --recipe that names one"
        )
    target = recipe.target_flops
    device = _resolve_device(request.device)
    source = resolve_source(
        recipe.model, checkpoint=recipe.checkpoint, random_init=request.random_init,
        model_kwargs=recipe.model_kwargs, seed=int(recipe.calibration.get("seed", 0)),
    )  # fmt: skip
    if recipe.data is None:
        raise DataError(
            f"recipe {recipe.name} needs calibration data: pass --data a latents folder (see "
            "dynconvert.write_latents), or --data synthetic to try the pipeline on random latents"
        )
    out = Path(request.out) if request.out else default_out(recipe.model, target)
    calibration = recipe.calibration_config(
        target, output_dir=str(out), resume=bool(request.resume), cpu=device == "cpu"
    )
    identity = _identity(recipe, source, target)
    main = int(os.environ.get("RANK", "0")) == 0
    previous = check_out(out, identity, request.resume, calibration.steps) if main else None
    data = _data_source(recipe.data)

    t0 = time.perf_counter()
    model = source.build()
    event("build", f"built {source.describe()} in {time.perf_counter() - t0:.1f} s")
    if data is None:
        data = synthetic_data(model, rows=max(64, calibration.batch_size), seed=calibration.seed)
    _check_data_shape(model, data)

    t0 = time.perf_counter()
    model = dynconvert.convert(model, target, config=recipe.convert_config())
    plan = dynconvert.get_state(model).plan
    event("convert", f"converted {len(plan.sites)} sites in {len(plan.blocks)} blocks "
          f"({plan.coverage}) in {time.perf_counter() - t0:.1f} s")  # fmt: skip
    return PreparedRun(
        request=request, recipe=recipe, source=source, target=target, out=out, device=device,
        calibration=calibration, model=model, data=data, identity=identity, previous=previous,
        main_process=main,
    )  # fmt: skip


def _data_source(data: str) -> Any:
    """The calibration data a recipe names (None for ``synthetic``: made once the model exists)."""
    from dynconvert.calibrate import as_source, digits

    if data == "synthetic":
        return None
    if data == "digits":
        return digits(16)
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(
            f"--data {data}: no such folder; pass a latents folder, 'digits' or 'synthetic'"
        )
    return as_source(path)


def _check_data_shape(model: nn.Module, data: Any) -> None:
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


# -------------------------------------------------------------------------------------- execute


def execute_run(
    prepared: PreparedRun,
    on_step: Callable[[Any], None] | None = None,
    on_event: EventFn | None = None,
) -> dict[str, Any] | None:
    """Create the run folder, calibrate, measure, save, and write ``report.json``.

    Returns:
        The report (None on the other processes of a multi-process launch).
    """
    event = on_event or (lambda stage, msg: None)
    out, main = prepared.out, prepared.main_process
    t_start = time.perf_counter()
    existed = out.exists()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _write_run(prepared, "running")
    threads = torch.get_num_threads()
    if prepared.recipe.cpu_threads and prepared.device == "cpu":
        torch.set_num_threads(prepared.recipe.cpu_threads)
    try:
        return _calibrate_and_report(prepared, on_step, event, existed, t_start)
    finally:
        torch.set_num_threads(threads)


def _calibrate_and_report(
    prepared: PreparedRun,
    on_step: Callable[[Any], None] | None,
    event: EventFn,
    existed: bool,
    t_start: float,
) -> dict[str, Any] | None:
    import dynconvert
    from dynconvert.calibrate.checkpoint import list_checkpoints

    out, main = prepared.out, prepared.main_process
    try:
        event(
            "calibrate",
            f"calibrating toward {prepared.target:g} for {prepared.calibration.steps} steps",
        )
        t0 = time.perf_counter()
        result = dynconvert.calibrate(
            prepared.model, prepared.data, prepared.calibration, on_step=on_step
        )
        calibrate_s = time.perf_counter() - t0
    except BaseException:
        if main and prepared.previous is None and not list_checkpoints(out):
            _remove_run(out, existed)  # nothing worth keeping: leave nothing behind
        raise
    if not main:
        return None
    report = build_report(prepared, result, event)
    report["timings"]["calibrate_s"] = round(calibrate_s, 2)
    report["timings"]["total_s"] = round(time.perf_counter() - t_start, 2)
    _atomic_json(out / REPORT_FILE, report)
    _write_run(prepared, "finished", steps=result.steps)
    return report


def _remove_run(out: Path, existed: bool) -> None:
    """Remove what a failed fresh run wrote (the folder itself when the run created it)."""
    if not existed:
        shutil.rmtree(out, ignore_errors=True)
        return
    (out / RUN_FILE).unlink(missing_ok=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)


def convert_run(
    request: RunRequest,
    on_step: Callable[[Any], None] | None = None,
    on_event: EventFn | None = None,
) -> dict[str, Any] | None:
    """:func:`prepare_run` then :func:`execute_run`: one whole ``dynconvert convert``.

    Example:
        >>> report = convert_run(RunRequest(model="digits", target_flops=0.5, out="runs/x"))  # doctest: +SKIP
    """
    return execute_run(prepare_run(request, on_event), on_step=on_step, on_event=on_event)


_NUMBERS = re.compile(r"\[\s*((?:-?[\d.eE+-]+|null)(?:,\s*(?:-?[\d.eE+-]+|null))*)\s*\]")


def dumps(data: Any, indent: int = 2) -> str:
    """JSON with indentation, but lists of numbers on one line (the 1000-value FLOPs profile).

    Example:
        >>> print(dumps({"a": [1, 2.5], "b": float("inf")}))
        {
          "a": [1, 2.5],
          "b": null
        }
    """
    text = json.dumps(_finite(data), indent=indent, default=_plain_default, allow_nan=False)
    return _NUMBERS.sub(
        lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text
    )


def _finite(obj: Any) -> Any:
    """JSON has no inf or nan: they become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _plain_default(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return _finite(obj.to_dict())
    if hasattr(obj, "tolist"):
        return _finite(obj.tolist())
    return str(obj)


def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    from dynconvert.save import atomic_write_bytes

    atomic_write_bytes(path, (dumps(data) + "\n").encode())


def _version() -> str:
    from dynconvert import __version__

    return __version__


def _write_run(prepared: PreparedRun, status: str, steps: int | None = None) -> None:
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    _atomic_json(prepared.out / RUN_FILE, {
        "format": RUN_FORMAT,
        "version": RUN_VERSION,
        "status": status,
        "created": (prepared.previous or {}).get("created", now),
        "updated": now,
        "steps": steps if steps is not None else prepared.calibration.steps,
        "identity": prepared.identity,
        "source": prepared.source.to_dict(),
        "recipe": prepared.recipe.to_dict(),
        "recipe_file": prepared.recipe.source,
        "dynconvert_version": _version(),
    })  # fmt: skip


# --------------------------------------------------------------------------------------- report


def _real_batch(data: Any, rows: int, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A fixed batch of real calibration rows (for the FLOPs profile)."""
    if hasattr(data, "get_batch") and len(data):
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(data), generator=g)[: min(rows, len(data))].tolist()
        batch = data.prepare(data.get_batch(idx), device)
    else:
        batch = data.prepare(next(iter(data.iterable)), device)
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _noised(
    objective: Any, x0: torch.Tensor, t: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t at DDPM timestep t (or flow time t/1000) and the timestep the model is given."""
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0)
    index = torch.full((x0.shape[0],), int(t), dtype=torch.long, device=x0.device)
    if hasattr(objective, "diffusion"):
        return objective.diffusion.q_sample(x0, index, noise), index + objective.timestep_offset
    s = (index.float() + 0.5) / 1000.0
    return objective.flow.interpolate(x0, noise, s), s * objective.timestep_scale


def _counted(fn: Callable[[], Any]) -> float:
    """MACs executed by ``fn`` (torch.utils.flop_counter with math attention; 2 FLOPs a MAC)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        fn()
    return counter.get_total_flops() / 2


@torch.no_grad()
def flops_profile(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    config: Any,
    points: int = 20,
    executed_points: int = 20,
) -> dict[str, Any]:
    """The FLOPs ratio at each of the 1000 timesteps, measured on real data.

    Width masks are a function of t (read for every t from the routers); token keep rates come
    from eval forwards on ``batch`` at ``points`` timesteps spread over 0..999 (linearly
    interpolated in between). At ``executed_points`` of them (evenly spread) the MACs the fast
    path executes are also counted (torch.utils.flop_counter, math attention) against the full
    model's; ``executed_flops_ratio`` is their mean.

    Returns:
        ``per_t`` (1000 whole-model ratios), ``blocks_per_t``, ``flops_ratio`` (their mean),
        ``flops_ratio_blocks``, ``executed_flops_ratio``, ``timesteps`` and ``token_keep``
        (mean over token-routed sites at each measured t), ``measured`` (the batch-mean ratio of
        the eval forward at each measured t).
    """
    import numpy as np

    import dynconvert
    from dynconvert.calibrate.adapters import resolve_labels, select_adapter
    from dynconvert.calibrate.objectives import build_objective
    from dynconvert.plan import AttentionSite

    bank = dynconvert.get_state(model)
    adapter = select_adapter(model, config.adapter, config.adapter_args)
    objective = build_objective(config, adapter)
    if not resolve_labels(model, adapter, config).uses_labels:
        batch = {k: v for k, v in batch.items() if k != "y"}
    x0 = batch["x"].float()
    ts = np.unique(np.linspace(0, 999, max(2, points)).round().astype(int))
    counted = set(
        np.linspace(0, len(ts) - 1, min(executed_points, len(ts))).round().astype(int).tolist()
    )
    token_sites = [s for s in bank.plan.sites if not isinstance(s, AttentionSite) and s.token]
    keep = {s.index: [] for s in token_sites}
    measured, executed = [], []
    full = None
    was = model.training
    model.eval()
    try:
        for k, t in enumerate(ts.tolist()):
            x_t, t_in = _noised(objective, x0, t, seed=k)
            if k in counted and full is None:  # the full model's cost does not depend on t
                with dynconvert.routing(model, "full"):
                    full = _counted(lambda: adapter(model, x_t, t_in, batch))  # noqa: B023
            with dynconvert.routing(model, "eval"):
                if k in counted:
                    executed.append(_counted(lambda: adapter(model, x_t, t_in, batch)) / full)  # noqa: B023
                else:
                    adapter(model, x_t, t_in, batch)
                measured.append(float(bank.last_flops_ratio().mean()))
                for s in token_sites:
                    tk = bank.records.get(s.index, {}).get("tokens")
                    keep[s.index].append(float(tk.float().mean()) if tk is not None else 1.0)
    finally:
        model.train(was)
    tables = {i: m.double().mean(1).cpu().numpy() for i, m in bank.width_table().items()}
    grid = np.arange(1000)
    plan = bank.plan
    other = plan.other_macs / max(plan.batch, 1)
    dyn_t, blocks_dyn, static, blocks = np.full(1000, other), np.zeros(1000), other, 0.0
    for s in plan.sites:
        cost = float(s.macs())
        frac = tables.get(s.index, np.ones(1000))
        if s.index in keep:
            frac = frac * np.interp(grid, ts, np.asarray(keep[s.index]))
            frac = frac + s.router_macs(None, bank.config.token_reduction) / cost
        dyn_t += cost * frac
        blocks_dyn += cost * frac
        static += cost
        blocks += cost
    per_t = dyn_t / static
    blocks_per_t = blocks_dyn / blocks
    keep_mean = [
        float(np.mean([keep[i][k] for i in keep])) if keep else 1.0 for k in range(len(ts))
    ]
    return {
        "per_t": [round(float(v), 6) for v in per_t],
        "blocks_per_t": [round(float(v), 6) for v in blocks_per_t],
        "flops_ratio": float(per_t.mean()),
        "flops_ratio_blocks": float(blocks_per_t.mean()),
        "executed_flops_ratio": float(np.mean(executed)) if executed else None,
        "executed_timesteps": [int(ts[k]) for k in sorted(counted)],
        "timesteps": [int(t) for t in ts],
        "token_keep": [round(v, 4) for v in keep_mean],
        "measured": [round(v, 4) for v in measured],
        "static_macs": static,
        "dynamic_macs": float(dyn_t.mean()),
        "blocks_macs": blocks,
    }


def build_report(
    prepared: PreparedRun, result: Any, on_event: EventFn | None = None
) -> dict[str, Any]:
    """Measure the calibrated model, save it with its FLOPs profile, and assemble the report."""
    import dynconvert

    event = on_event or (lambda stage, msg: None)
    recipe, out, model = prepared.recipe, prepared.out, result.model
    settings = recipe.report
    device = next(model.parameters()).device
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    event("profile", "measuring the FLOPs profile on real data")
    batch = _real_batch(prepared.data, settings.profile_batch, prepared.calibration.seed, device)
    prof = flops_profile(model, batch, prepared.calibration, settings.profile_timesteps,
                         settings.executed_timesteps)  # fmt: skip
    timings["profile_s"] = round(time.perf_counter() - t0, 2)
    event("profile", f"FLOPs ratio {prof['flops_ratio']:.3f} (mean over t), executed "
          f"{_fmt(prof['executed_flops_ratio'])}")  # fmt: skip

    summary = {
        "steps": result.steps, "final_loss": result.losses[-1] if result.losses else None,
        "last_flops_ratio_train": result.flops_ratios[-1] if result.flops_ratios else None,
        "skipped_nonfinite": result.skipped_nonfinite, "skipped_grad_norm": result.skipped_grad_norm,
        "resumed_from": str(result.resumed_from) if result.resumed_from else None,
    }  # fmt: skip
    t0 = time.perf_counter()
    dynconvert.save(model, out, flops_ratio_per_t=prof["per_t"],
                    extra={"run": {"recipe": recipe.name, "source": prepared.source.to_dict(with_config=False),
                                   "target_flops": prepared.target}, "calibration": summary})  # fmt: skip
    timings["save_s"] = round(time.perf_counter() - t0, 2)
    event("save", f"saved the model to {out}")

    bench = None
    if settings.bench:
        t0 = time.perf_counter()
        event(
            "bench",
            f"timing original vs dynamic (batch {settings.bench_batch}, t={settings.bench_timestep})",
        )
        from dynconvert.bench import benchmark

        bench = benchmark(model, batch=settings.bench_batch, timestep=float(settings.bench_timestep),
                          device=str(device), repeats=settings.bench_repeats, memory=False).to_dict()  # fmt: skip
        model.eval()
        timings["bench_s"] = round(time.perf_counter() - t0, 2)
        event("bench", f"speed-up {bench['speedup']:.2f}x at t={settings.bench_timestep}")

    report: dict[str, Any] = {
        "run_dir": str(out),
        "model": recipe.model,
        "model_class": dynconvert.get_state(model).plan.model_class,
        "recipe": recipe.name,
        "target_flops": prepared.target,
        "steps": result.steps,
        "flops_ratio": prof["flops_ratio"],
        "flops_ratio_blocks": prof["flops_ratio_blocks"],
        "executed_flops_ratio": prof["executed_flops_ratio"],
        "speedup": bench["speedup"] if bench else None,
        "unit": UNIT,
        "static_macs": prof["static_macs"],
        "dynamic_macs": prof["dynamic_macs"],
        "blocks_macs": prof["blocks_macs"],
        "flops_ratio_note": (
            "whole-model MACs ratio (dynamic / original), mean over the 1000 DDPM timesteps; "
            "width masks exact per t, token keep rates measured on real data at "
            f"{len(prof['timesteps'])} timesteps and interpolated"
        ),
        "profile": {
            k: prof[k] for k in ("timesteps", "token_keep", "measured", "executed_timesteps")
        },
        "flops_ratio_per_t": prof["per_t"],
        "calibration": summary,
        "bench": bench,
    }
    if recipe.evaluate.kind == "digits":
        t0 = time.perf_counter()
        event("evaluate", "sampling both models for classifier accuracy and Frechet distance")
        report.update(_evaluate_digits(prepared, model))
        timings["evaluate_s"] = round(time.perf_counter() - t0, 2)
        event(
            "evaluate",
            "accuracy {original:.3f} -> {dynamic:.3f}".format(**report["classifier_accuracy"]),
        )
    if recipe.samples.grid and "samples" not in report:
        t0 = time.perf_counter()
        event("samples", f"writing {SAMPLES_FILE} (original left, dynamic right)")
        write_samples(model, original_model({"source": prepared.source.to_dict()}).to(device),
                      out / SAMPLES_FILE, recipe.samples)  # fmt: skip
        report["samples"] = SAMPLES_FILE
        timings["samples_s"] = round(time.perf_counter() - t0, 2)
    files = {p.name for p in out.iterdir() if not p.name.startswith(".")} | {REPORT_FILE}
    report["files"] = sorted(files)
    report["device"] = str(device)
    report["cpu_threads"] = torch.get_num_threads() if device.type == "cpu" else None
    report["timings"] = timings
    report["dynconvert_version"] = _version()
    return report


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _evaluate_digits(prepared: PreparedRun, model: nn.Module) -> dict[str, Any]:
    """Classifier accuracy and Frechet distance of the original and the dynamic digits model."""
    from dynconvert.demo import evaluate_digits, write_demo_grid

    ev, samples = prepared.recipe.evaluate, prepared.recipe.samples
    device = next(model.parameters()).device
    original = original_model({"source": prepared.source.to_dict()}).to(device)
    res = evaluate_digits(original, model, per_class=ev.per_class, steps=ev.steps, seed=ev.seed,
                          cfg_scale=samples.cfg_scale, scheduler=samples.scheduler)  # fmt: skip
    keep = ("classifier_accuracy", "frechet_distance")
    out: dict[str, Any] = {k: {m: float(res[k][m]) for m in ("original", "dynamic")} for k in keep}
    extra = {k: v for k, v in res.items() if k not in (*keep, "tensors") and _jsonable(v)}
    for k in keep:  # the other figures (real held-out accuracy, distance between the two models)
        extra.update(
            {f"{k}_{m}": float(v) for m, v in res[k].items() if m not in ("original", "dynamic")}
        )
    out["evaluation"] = extra
    if samples.grid:
        write_demo_grid(res, prepared.out / SAMPLES_FILE, columns=min(10, ev.per_class), upscale=2)
        out["samples"] = SAMPLES_FILE
    return out


def _jsonable(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool, type(None))) or (
        isinstance(v, (list, dict)) and len(json.dumps(v, default=str)) < 2000
    )


def class_labels(model: nn.Module, labels: list[int] | None = None) -> list[int] | None:
    """The labels to sample (given, or the first classes up to 10); None for unconditional models."""
    from dynconvert.sampling import model_spec

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
    import dynconvert
    from dynconvert.sampling import model_spec, sample

    spec = model_spec(model)
    kwargs = dict(labels=labels, steps=settings.steps, cfg_scale=settings.cfg_scale, seed=settings.seed,
                  scheduler=settings.scheduler, clip_sample=spec.channels in (1, 3), on_step=on_step,
                  num_samples=None if labels else 8)  # fmt: skip
    if spec.adapter.needs_cond:
        raise ConfigError(
            "sampling a text-conditional model needs caption embeddings: use "
            "dynconvert.sampling.sample(model, cond=...) from Python"
        )
    if full and dynconvert.is_converted(model):
        with dynconvert.routing(model, "full"):
            return sample(model, **kwargs)
    return sample(model, **kwargs)


def write_samples(dynamic: nn.Module, original: nn.Module | None, path: Path, settings: Any,
                  vae: str | None = None, raw: bool = False) -> Path:  # fmt: skip
    """``path``: a grid of the dynamic model's samples, beside the original's when given."""
    from dynconvert.sampling import compare_grid, save_grid

    labels = class_labels(dynamic, getattr(settings, "labels", None))
    images = to_images(draw(dynamic, settings, labels), vae, raw)
    nrow = min(len(images), 10) if len(images) <= 10 else None
    if original is None:
        return save_grid(images, path, nrow=nrow, upscale=_upscale(images))
    base = to_images(draw(original, settings, labels), vae, raw)
    return compare_grid(base, images, path, nrow=nrow, upscale=_upscale(images))


def _upscale(images: torch.Tensor) -> int:
    return max(1, 64 // int(images.shape[-1]))


def to_images(x: torch.Tensor, vae: str | None = None, raw: bool = False) -> torch.Tensor:
    """Samples as images in [-1, 1]: decoded through a local VAE folder when given."""
    if vae is not None:
        from diffusers import AutoencoderKL

        path = Path(vae).expanduser()
        if not path.is_dir():
            raise CheckpointError(
                f"--vae {vae}: no such folder; pass a local diffusers AutoencoderKL folder"
            )
        try:
            model = AutoencoderKL.from_pretrained(
                str(path), subfolder="vae" if (path / "vae").is_dir() else None
            )
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load a VAE from {path}: {_first_line(e)}") from e
        model = model.to(x.device).eval()
        with torch.no_grad():
            return model.decode(x / float(model.config.scaling_factor)).sample.clamp(-1, 1)
    if x.shape[1] in (1, 3):
        return x.clamp(-1, 1)
    if raw:
        return (x[:, :3] / 3.0).clamp(-1, 1)
    raise ConfigError(
        f"the samples are {x.shape[1]}-channel latents: pass --vae PATH (a local diffusers "
        "AutoencoderKL folder) to decode them, or --raw to write their first 3 channels as colours"
    )


# ------------------------------------------------------------------------------------- load


def load_run(
    folder: str | os.PathLike, device: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The calibrated model of a run folder (or any ``dynconvert.save`` folder) and ``run.json``.

    Returns:
        ``(model, info)``: the converted model in eval mode, and the run's ``run.json`` (empty
        for a folder written by ``dynconvert.save`` alone).

    Raises:
        RecordError: The folder holds no saved model.

    Example:
        >>> model, info = load_run("runs/digits-0.5")        # doctest: +SKIP
    """
    import dynconvert
    from dynconvert.save import RECORD, read_record

    path = Path(folder)
    if not path.is_dir():
        raise RecordError(
            f"--run {path}: no such folder; pass a folder written by dynconvert convert"
        )
    try:
        run = read_run(path) or {}
    except OutputExistsError as e:
        raise RecordError(str(e).replace("; choose another --out", "")) from e
    if not (path / RECORD).is_file():
        unfinished = run.get("status") == "running"
        hint = (
            " yet (the run has not finished: continue it with convert --resume)"
            if unfinished
            else ""
        )
        raise RecordError(f"{path} holds no saved model{hint}; pass a finished run folder")
    record = read_record(path)
    base = None
    if not record.get("preset") and run.get("source"):
        base = ModelSource.from_dict(run["source"]).skeleton()
    return dynconvert.load(path, base, device=device), run


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
            f"the run's original weights {source.checkpoint} are gone; pass --checkpoint PATH to compare"
        )
    return source.build().eval()


__all__ = [
    "ModelSource",
    "PreparedRun",
    "RunRequest",
    "build_report",
    "check_out",
    "convert_run",
    "default_out",
    "execute_run",
    "flops_profile",
    "load_run",
    "original_model",
    "parse_target",
    "prepare_run",
    "read_run",
    "resolve_source",
    "synthetic_data",
    "write_samples",
]
