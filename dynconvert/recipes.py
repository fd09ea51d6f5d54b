"""Recipes: named, checked settings of a whole ``dynconvert convert`` run, shipped as YAML.

A recipe says which model to start from, the FLOPs target, the data, how convert builds the
routers (``convert:``, the fields of :class:`~dynconvert.ConvertConfig`), how calibration trains
them (``calibration:``, the fields of :class:`~dynconvert.CalibrationConfig` except ``target``,
``output_dir`` and ``resume``, which the run sets), and what the run measures afterwards
(``report:``, ``samples:``, ``evaluate:``). Every field is documented in :class:`Recipe` and in
the YAML files as comments. Loading is strict: an unknown key anywhere is an error that lists
the valid keys. ``--set key=value`` overrides use dotted keys (``calibration.lr=2e-5``).

The shipped recipes live in ``dynconvert/recipes/*.yaml``.

Example:
    >>> from dynconvert.recipes import load_recipe
    >>> r = load_recipe("digits", overrides=["calibration.steps=10"])
    >>> r.model, r.calibration["steps"]
    ('digits', 10)
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dynconvert.calibrate.config import CalibrationConfig
from dynconvert.config import ConvertConfig
from dynconvert.errors import ConfigError
from dynconvert.sampling import SCHEDULERS

RECIPE_VERSION = 1
RECIPE_DIR = Path(__file__).parent / "recipes"
RUN_FIELDS = ("target", "output_dir", "resume")
"""Calibration fields a recipe may not set: the run sets them (--target-flops, --out, --resume)."""

EVALUATIONS = ("none", "digits")


class _Loader(yaml.SafeLoader):
    """Safe YAML loader that reads ``1e-4`` as a float (YAML 1.2), not as a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """A ``--set`` value as YAML (``2e-5`` -> float, ``true`` -> bool, ``[1, 2]`` -> list).

    Example:
        >>> parse_value("2e-5"), parse_value("null"), parse_value("ddim")
        (2e-05, None, 'ddim')
    """
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:
        return text


def _check(section: str, value: Any, ok: bool, what: str) -> None:
    if not ok:
        raise ConfigError(f"{section} must be {what}; got {value!r}")


def _is_int(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class ReportSettings:
    """What the run measures after calibration, for ``report.json``.

    Attributes:
        profile_timesteps: Timesteps (evenly spaced over 0..999) at which the calibrated model
            runs on real batches to measure token keep rates; the FLOPs profile over the 1000
            timesteps interpolates them (width masks are exact at every t).
        profile_batch: Real samples per profile timestep.
        executed_timesteps: How many of the profile timesteps (evenly spread) also count the
            executed FLOPs with ``torch.utils.flop_counter``; ``executed_flops_ratio`` is their
            mean (all of them: comparable to the analytic mean over t).
        bench: Time the original and the converted model (the ``speedup``).
        bench_timestep: The timestep of the benchmark (a representative one).
        bench_batch: Samples per benchmarked call.
        bench_repeats: Timed calls of each model.
    """

    profile_timesteps: int = 20
    profile_batch: int = 16
    executed_timesteps: int = 20
    bench: bool = True
    bench_timestep: int = 500
    bench_batch: int = 8
    bench_repeats: int = 5

    def __post_init__(self) -> None:
        for name in ("profile_timesteps", "profile_batch", "bench_batch", "bench_repeats"):
            _check(
                f"report.{name}",
                getattr(self, name),
                _is_int(getattr(self, name), 1),
                "an integer >= 1",
            )
        _check(
            "report.executed_timesteps",
            self.executed_timesteps,
            _is_int(self.executed_timesteps, 0),
            "an integer >= 0",
        )
        _check("report.bench", self.bench, isinstance(self.bench, bool), "true or false")
        _check(
            "report.bench_timestep",
            self.bench_timestep,
            _is_int(self.bench_timestep) and self.bench_timestep <= 999,
            "an integer in 0..999",
        )


@dataclass
class SampleSettings:
    """The ``samples.png`` grid of the run folder: original and dynamic model, same seeds.

    Attributes:
        grid: Write ``samples.png`` (needs a class-conditional model whose samples are images).
        labels: Class labels, one sample each (None: the first classes, up to 10).
        steps: Sampler steps.
        cfg_scale: Classifier-free guidance scale (1.0: off).
        scheduler: "ddim", "dpm" or "ddpm".
        seed: Seed of the initial noise (the same for both models).
    """

    grid: bool = False
    labels: list[int] | None = None
    steps: int = 50
    cfg_scale: float = 1.5
    scheduler: str = "ddim"
    seed: int = 0

    def __post_init__(self) -> None:
        _check("samples.grid", self.grid, isinstance(self.grid, bool), "true or false")
        if self.labels is not None:
            _check(
                "samples.labels",
                self.labels,
                isinstance(self.labels, list)
                and bool(self.labels)
                and all(_is_int(v) for v in self.labels),
                "a non-empty list of class labels (integers >= 0) or null",
            )
        _check("samples.steps", self.steps, _is_int(self.steps, 1), "an integer >= 1")
        _check(
            "samples.cfg_scale",
            self.cfg_scale,
            _is_num(self.cfg_scale) and self.cfg_scale >= 1.0,
            "a number >= 1.0",
        )
        _check(
            "samples.scheduler",
            self.scheduler,
            self.scheduler in SCHEDULERS,
            f"one of {', '.join(SCHEDULERS)}",
        )
        _check("samples.seed", self.seed, _is_int(self.seed), "an integer >= 0")


@dataclass
class EvaluateSettings:
    """Quality metrics of the original and the dynamic model, for ``report.json``.

    Attributes:
        kind: "none", or "digits" (classifier accuracy and Frechet distance of samples of the
            digits demo, original vs dynamic, same seeds).
        per_class: Samples per class.
        steps: Sampler steps.
        seed: Seed of the initial noise.
    """

    kind: str = "none"
    per_class: int = 20
    steps: int = 25
    seed: int = 0

    def __post_init__(self) -> None:
        _check(
            "evaluate.kind", self.kind, self.kind in EVALUATIONS, f"one of {', '.join(EVALUATIONS)}"
        )
        _check("evaluate.per_class", self.per_class, _is_int(self.per_class, 1), "an integer >= 1")
        _check("evaluate.steps", self.steps, _is_int(self.steps, 1), "an integer >= 1")
        _check("evaluate.seed", self.seed, _is_int(self.seed), "an integer >= 0")


@dataclass
class Recipe:
    """A whole convert run: model, target, data, convert and calibration settings, reporting.

    Attributes:
        name: The recipe's name (``dynconvert recipes list``).
        description: One line on what it is for and where its numbers come from.
        model: The model it starts from: a preset name or alias (``dit-xl``, ``DiT-S/2``,
            ``U-ViT-H/2``, ``digits``) or a diffusers model name (``pixart-alpha``). ``--model``
            overrides it.
        model_kwargs: Constructor overrides of a preset (e.g. ``num_classes: 10``).
        applies_to: Presets this recipe is the default for when ``--model`` is given without
            ``--recipe``.
        target_flops: The FLOPs budget lambda, a fraction of the original whole-model MACs in
            (0, 1]. ``--target-flops`` overrides it.
        checkpoint: Default weights (file, or diffusers folder); ``--checkpoint`` overrides it.
        data: Default calibration data: a latents folder, ``digits``, or ``synthetic`` (random
            latents, for trying the pipeline); ``--data`` overrides it.
        launch: How to launch the run at full scale (documentation only).
        cpu_threads: Torch CPU threads while a CPU run calibrates and measures (None: torch's
            default, one per core). Small models run as fast on one thread and do not collapse
            when other processes share the cores.
        convert: Fields of ``ConvertConfig`` (router settings).
        calibration: Fields of ``CalibrationConfig`` except target, output_dir and resume.
        report: :class:`ReportSettings`.
        samples: :class:`SampleSettings`.
        evaluate: :class:`EvaluateSettings`.
        version: Recipe format version.
        source: Where the recipe was read from (set by the loader; not a YAML field).
    """

    name: str
    description: str = ""
    model: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    applies_to: list[str] = field(default_factory=list)
    target_flops: float = 0.5
    checkpoint: str | None = None
    data: str | None = None
    launch: str | None = None
    cpu_threads: int | None = None
    convert: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    report: ReportSettings = field(default_factory=ReportSettings)
    samples: SampleSettings = field(default_factory=SampleSettings)
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)
    version: int = RECIPE_VERSION
    source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _check(
            "name", self.name, isinstance(self.name, str) and bool(self.name), "a non-empty string"
        )
        _check("description", self.description, isinstance(self.description, str), "a string")
        for key in ("model", "checkpoint", "data", "launch"):
            v = getattr(self, key)
            _check(key, v, v is None or isinstance(v, str), "a string or null")
        _check("model_kwargs", self.model_kwargs, isinstance(self.model_kwargs, dict), "a mapping")
        _check("cpu_threads", self.cpu_threads, self.cpu_threads is None or _is_int(self.cpu_threads, 1),
               "an integer >= 1 or null")  # fmt: skip
        _check(
            "applies_to",
            self.applies_to,
            isinstance(self.applies_to, list) and all(isinstance(v, str) for v in self.applies_to),
            "a list of preset names",
        )
        _check(
            "target_flops",
            self.target_flops,
            _is_num(self.target_flops) and 0.0 < self.target_flops <= 1.0,
            "a number in (0, 1] (a fraction of the original FLOPs, e.g. 0.5)",
        )
        _check("version", self.version, _is_int(self.version, 1), "an integer >= 1")
        if self.version > RECIPE_VERSION:
            raise ConfigError(
                f"recipe version {self.version} is newer than this dynconvert ({RECIPE_VERSION}); "
                "upgrade dynconvert"
            )
        for sec, cls in (
            ("report", ReportSettings),
            ("samples", SampleSettings),
            ("evaluate", EvaluateSettings),
        ):
            v = getattr(self, sec)
            if isinstance(v, dict):
                setattr(self, sec, _build(cls, v, sec))
            elif not isinstance(v, cls):
                raise ConfigError(f"section {sec} must be a mapping; got {v!r}")
        for sec in ("convert", "calibration"):
            v = getattr(self, sec)
            if v is None:
                setattr(self, sec, {})
            elif not isinstance(v, dict):
                raise ConfigError(f"section {sec} must be a mapping; got {v!r}")
        taken = sorted(set(self.calibration) & set(RUN_FIELDS))
        if taken:
            raise ConfigError(
                f"section calibration may not set {', '.join(taken)}: the run sets them "
                "(use target_flops / --target-flops, --out and --resume)"
            )
        self.convert_config()
        self.calibration_config()

    def convert_config(self) -> ConvertConfig:
        """The validated :class:`ConvertConfig` of the ``convert`` section."""
        try:
            return ConvertConfig.from_dict(dict(self.convert))
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"section convert: {e}") from e

    def calibration_config(self, target: float | None = None, **run: Any) -> CalibrationConfig:
        """The validated :class:`CalibrationConfig`: the section plus the run's own fields.

        Example:
            >>> load_recipe("digits").calibration_config(0.5, output_dir="runs/x").target
            0.5
        """
        data = {
            **self.calibration,
            "target": self.target_flops if target is None else target,
            **run,
        }
        if isinstance(data.get("adam_betas"), list):
            data["adam_betas"] = tuple(data["adam_betas"])
        try:
            return CalibrationConfig.from_dict(data)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"section calibration: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        """Plain data (what a YAML file holds), without ``source``.

        Example:
            >>> r = load_recipe("digits")
            >>> recipe_from_dict(r.to_dict()) == r
            True
        """
        d = dataclasses.asdict(self)
        d.pop("source", None)
        return d


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build a settings dataclass from a dict, rejecting unknown keys with the valid ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"section {where} must be a mapping; got {data!r}")
    valid = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{where}.{k}' if where else k for k in unknown)}; "
            f"valid keys{' of ' + where if where else ''}: {', '.join(valid)}"
        )
    return cls(**data)


def recipe_from_dict(data: dict[str, Any], source: str | None = None) -> Recipe:
    """Build and check a recipe from plain data.

    Raises:
        ConfigError: An unknown key (the message lists the valid ones) or a bad value.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"a recipe must be a mapping of fields; got {type(data).__name__}")
    if "name" not in data:
        raise ConfigError("a recipe needs a name (e.g. name: my-recipe)")
    recipe = _build(Recipe, data, "")
    recipe.source = source
    return recipe


def shipped_recipes() -> dict[str, Path]:
    """Name -> file of every recipe shipped with dynconvert, sorted by name.

    Example:
        >>> "digits" in shipped_recipes()
        True
    """
    return {p.stem: p for p in sorted(RECIPE_DIR.glob("*.yaml"))}


def recipe_path(name_or_path: str | Path) -> Path:
    """The YAML file of a shipped recipe name or of a path.

    Raises:
        ConfigError: Neither a shipped name nor an existing file; lists the shipped names.
    """
    shipped = shipped_recipes()
    key = str(name_or_path)
    if key in shipped:
        return shipped[key]
    path = Path(key).expanduser()
    if path.is_file():
        return path
    if path.suffix in (".yaml", ".yml") or "/" in key:
        raise ConfigError(
            f"recipe file {path} does not exist; check the path, or use one of: {', '.join(shipped)}"
        )
    raise ConfigError(
        f"unknown recipe {key!r}; shipped recipes: {', '.join(shipped)} (or pass a .yaml file)"
    )


def read_recipe_data(name_or_path: str | Path) -> tuple[dict[str, Any], Path]:
    """The raw mapping of a recipe file (not yet checked) and its path."""
    path = recipe_path(name_or_path)
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(
            f"recipe {path} is not valid YAML{line}: {getattr(e, 'problem', e)}"
        ) from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read recipe {path}: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of fields; got {type(data).__name__}")
    data.setdefault("name", path.stem)
    return data, path


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Apply ``key=value`` overrides with dotted keys to recipe data (a new dict).

    Args:
        data: Recipe data (a mapping as read from YAML).
        overrides: ``["calibration.lr=2e-5", "model=dit-tiny"]`` or ``{"calibration.lr": 2e-5}``.

    Raises:
        ConfigError: A malformed item or a key that is not a recipe field (lists the valid ones).

    Example:
        >>> apply_overrides({"name": "x"}, ["calibration.lr=2e-5"])["calibration"]
        {'lr': 2e-05}
    """
    out = copy.deepcopy(data)
    items: list[tuple[str, Any]] = []
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        for item in overrides:
            key, sep, text = str(item).partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"--set takes key=value (e.g. calibration.lr=2e-5); got {item!r}")
            items.append((key.strip(), parse_value(text.strip())))
    for key, value in items:
        parts = key.split(".")
        _check_key(parts, key)
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"cannot set {key}: {p} is not a section")
            node = child
        node[parts[-1]] = value
    return out


_FREE_SECTIONS = ("model_kwargs",)


def _section_fields(section: str) -> list[str] | None:
    """Valid keys of a recipe section (None: any key)."""
    if section in _FREE_SECTIONS:
        return None
    classes = {
        "convert": ConvertConfig,
        "calibration": CalibrationConfig,
        "report": ReportSettings,
        "samples": SampleSettings,
        "evaluate": EvaluateSettings,
    }
    cls = classes.get(section)
    if cls is None:
        return []
    skip = RUN_FIELDS if section == "calibration" else ()
    return [f.name for f in dataclasses.fields(cls) if f.name not in skip]


def _check_key(parts: list[str], key: str) -> None:
    top = [f.name for f in dataclasses.fields(Recipe) if f.name != "source"]
    if parts[0] == "calibration" and len(parts) == 2 and parts[1] in RUN_FIELDS:
        flag = {
            "target": "--target-flops (or target_flops=...)",
            "output_dir": "--out",
            "resume": "--resume",
        }
        raise ConfigError(f"{key} is set by the run: use {flag[parts[1]]}")
    if parts[0] not in top:
        raise ConfigError(f"unknown recipe key {key!r}; valid top-level keys: {', '.join(top)}")
    if len(parts) == 1:
        return
    valid = _section_fields(parts[0])
    if valid is None:
        return
    if not valid:
        raise ConfigError(f"recipe key {parts[0]!r} is not a section; set it as {parts[0]}=value")
    if len(parts) > 2 or parts[1] not in valid:
        raise ConfigError(
            f"unknown recipe key {key!r}; valid keys of {parts[0]}: {', '.join(valid)}"
        )


def load_recipe(
    name_or_path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    values: dict[str, Any] | None = None,
) -> Recipe:
    """Load, override and check a recipe (a shipped name or a YAML file).

    Args:
        name_or_path: A shipped recipe name (``dynconvert recipes list``) or a YAML file; None
            gives the built-in defaults (recipe "default": the dataclass defaults).
        overrides: ``key=value`` strings or a dict, with dotted keys.
        values: Typed values with dotted keys, applied after ``overrides`` (what explicit
            command-line options such as ``--target-flops`` set; not parsed as YAML).

    Returns:
        The checked :class:`Recipe`.

    Raises:
        ConfigError: Unknown recipe, invalid YAML, an unknown key (listing the valid ones), or a
            bad value.

    Example:
        >>> load_recipe("dit-xl-imagenet256").calibration["batch_size"]
        256
    """
    if name_or_path is None:
        data, source = {"name": "default"}, None
    else:
        data, path = read_recipe_data(name_or_path)
        source = str(path)
    for layer in (overrides, values):
        if layer:
            try:
                data = apply_overrides(data, layer)
            except ConfigError as e:
                raise ConfigError(f"{_where(data, source)}: {e}") from e
    try:
        return recipe_from_dict(data, source)
    except (ConfigError, TypeError) as e:  # TypeError: a mapping where a scalar belongs, ...
        raise ConfigError(f"{_where(data, source)}: {e}") from e


def _where(data: dict[str, Any], source: str | None) -> str:
    name = data.get("name", "default")
    shipped = source is not None and Path(source).parent == RECIPE_DIR
    return f"recipe {name} ({source})" if source and not shipped else f"recipe {name}"


def recipe_for_model(model: str) -> str | None:
    """The shipped recipe whose ``applies_to`` (or ``model``) names this model, if any.

    Example:
        >>> recipe_for_model("dit-xl")
        'dit-xl-imagenet256'
    """
    from dynconvert.errors import ModelNotFoundError
    from dynconvert.models import resolve_name

    def canon(name: str) -> str:
        try:
            return resolve_name(name)
        except ModelNotFoundError:  # a diffusers model name (pixart-alpha) is not a preset
            return name.lower()

    want = canon(model)
    for name, path in shipped_recipes().items():
        try:
            data, _ = read_recipe_data(path)
        except ConfigError:
            continue
        names = list(data.get("applies_to") or [])
        if data.get("model"):
            names.append(data["model"])
        if any(canon(str(n)) == want for n in names):
            return name
    return None


def recipe_summary(name: str) -> dict[str, Any]:
    """Name, model, target, steps and description of a shipped recipe (for ``recipes list``)."""
    r = load_recipe(name)
    cal = r.calibration_config()
    return {
        "name": r.name,
        "model": r.model,
        "target_flops": r.target_flops,
        "steps": cal.steps,
        "batch_size": cal.batch_size,
        "description": r.description,
        "file": r.source,
    }


__all__ = [
    "EvaluateSettings",
    "Recipe",
    "ReportSettings",
    "SampleSettings",
    "apply_overrides",
    "load_recipe",
    "parse_value",
    "recipe_for_model",
    "recipe_from_dict",
    "recipe_path",
    "shipped_recipes",
]
