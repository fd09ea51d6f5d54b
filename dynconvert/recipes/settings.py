"""The recipe dataclasses: :class:`Recipe` and its checked sections (report, samples, evaluate).

Each class checks its fields in ``__post_init__``; building one from plain data rejects unknown
keys and lists the valid ones.

Example:
    >>> from dynconvert.recipes import recipe_from_dict
    >>> recipe_from_dict({"name": "mine", "model": "digits", "target_flops": 0.4}).target_flops
    0.4
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dynconvert.calibration.config import CalibrationConfig
from dynconvert.calibration.trainable import LORA_ROUTER_EMBED_DIM
from dynconvert.config import ConvertConfig
from dynconvert.errors import ConfigError
from dynconvert.fields import INT_MAX, SEED_MAX, Range, check_fields, check_value, shown
from dynconvert.measure.evaluations import evaluation_names
from dynconvert.runtime.budgets import parse_budget
from dynconvert.sampling import SCHEDULERS

RECIPE_VERSION = 1
RUN_FIELDS = ("target", "output_dir", "resume")
"""Calibration fields a recipe may not set: the run sets them (from ``target_flops``, and the
run's output folder and ``resume``)."""


def _check(section: str, value: Any, ok: bool, what: str) -> None:
    if not ok:
        raise ConfigError(f"{section} must be {what}; got {shown(value)}")


_REPORT_RANGES = {
    "profile_timesteps": Range(1, 1000),
    "profile_batch": Range(1, 65536),
    "executed_timesteps": Range(0, 1000),
    "bench_timestep": Range(0, 999),
    "bench_batch": Range(1, 65536),
    "bench_repeats": Range(1, 10_000),
    "sampling_budget": Range(0, 65536),
}
_SAMPLE_RANGES = {
    "labels": Range(0),
    "steps": Range(1, 10_000),
    "cfg_scale": Range(1, 100),
    "seed": Range(0, SEED_MAX),
}
_EVALUATE_RANGES = {
    "per_class": Range(1, 100_000),
    "steps": Range(1, 10_000),
    "seed": Range(0, SEED_MAX),
}
_RECIPE_FIELDS: list[tuple[str, Any, Range | None]] = [
    ("name", str, None),
    ("description", str, None),
    ("model", str | None, None),
    ("checkpoint", str | None, None),
    ("data", str | None, None),
    ("launch", str | None, None),
    ("model_kwargs", dict[str, Any], None),
    ("applies_to", list[str], None),
    ("target_flops", float, Range(0, 1, low_open=True)),
    ("budget_range", list[float] | None, None),
    ("cpu_threads", int | None, Range(1, 4096)),
    ("version", int, Range(1, INT_MAX)),
]
"""Top-level recipe fields checked by type and range (the sections check themselves)."""


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
        sampling_budget: Held-out samples on which, after calibration, the router thresholds
            are shifted so that the ``samples`` sampler spends the target on average (0: off;
            ``dynconvert.sampling.budget``).
    """

    profile_timesteps: int = 20
    profile_batch: int = 16
    executed_timesteps: int = 20
    bench: bool = True
    bench_timestep: int = 500
    bench_batch: int = 8
    bench_repeats: int = 5
    sampling_budget: int = 0

    def __post_init__(self) -> None:
        check_fields(self, _REPORT_RANGES, "report.")


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
        check_fields(self, _SAMPLE_RANGES, "samples.")
        _check("samples.labels", self.labels, self.labels != [], "a non-empty list or null")
        _check(
            "samples.scheduler",
            self.scheduler,
            self.scheduler in SCHEDULERS,
            f"one of {', '.join(SCHEDULERS)}",
        )


@dataclass
class EvaluateSettings:
    """Quality metrics of the original and the dynamic model, for ``report.json``.

    Attributes:
        kind: "none", or a registered evaluation (``dynconvert.measure.evaluations``; the demo adds
            "digits": classifier accuracy and Frechet distance of samples of the digits model,
            original vs dynamic, same seeds).
        per_class: Samples per class.
        steps: Sampler steps.
        seed: Seed of the initial noise.
    """

    kind: str = "none"
    per_class: int = 20
    steps: int = 25
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, _EVALUATE_RANGES, "evaluate.")
        _check(
            "evaluate.kind",
            self.kind,
            self.kind in evaluation_names(),
            f"one of {', '.join(evaluation_names())}",
        )


@dataclass
class Recipe:
    """A whole convert run: model, target, data, convert and calibration settings, reporting.

    Attributes:
        name: The recipe's name (``dynconvert recipes list``).
        description: One line on what it is for and where its numbers come from.
        model: The model it starts from: a preset name or alias (``dit-xl``, ``DiT-S/2``,
            ``U-ViT-H/2``, ``digits``) or a diffusers model name (``pixart-alpha``). A run's
            ``model`` overrides it.
        model_kwargs: Constructor overrides of a preset (e.g. ``num_classes: 10``).
        applies_to: Presets this recipe is the default for when a run names a ``model`` but no
            ``recipe``.
        target_flops: The FLOPs budget lambda, a fraction of the original whole-model MACs in
            (0, 1]. A run's ``target_flops`` overrides it.
        budget_range: ``[low, high]`` for a budget-conditioned model (one model for every
            budget in the range, chosen per call; docs/budgets.md), its low end equal to
            ``target_flops``; None: one budget. ``--target-flops 0.3:1.0`` sets both.
        checkpoint: Default weights (file, or diffusers folder); a run's ``checkpoint``
            overrides it.
        data: Default calibration data: a latents folder, ``digits``, or ``synthetic`` (random
            latents, for trying the pipeline); a run's ``data`` overrides it.
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
    budget_range: list[float] | None = None
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
        for name, kind, bounds in _RECIPE_FIELDS:
            check_value(name, getattr(self, name), kind, bounds)
        _check("name", self.name, bool(self.name), "a non-empty string")
        if self.budget_range is not None:
            low, _ = parse_budget(self.budget_range)  # BudgetError naming what a range is
            _check("target_flops", self.target_flops, low == self.target_flops,
                   f"the budget range's low end ({low:g}) with budget_range set")  # fmt: skip
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
                raise ConfigError(f"section {sec} must be a mapping; got {shown(v)}")
        for sec in ("convert", "calibration"):
            v = getattr(self, sec)
            if v is None:
                setattr(self, sec, {})
            elif not isinstance(v, dict):
                raise ConfigError(f"section {sec} must be a mapping; got {shown(v)}")
        taken = sorted(set(self.calibration) & set(RUN_FIELDS))
        if taken:
            raise ConfigError(
                f"section calibration may not set {', '.join(taken)}: the run sets them "
                "(use `target_flops` for the target, and the run's `out` and `resume=True`)"
            )
        self.convert_config()
        self.calibration_config()

    def convert_config(self) -> ConvertConfig:
        """The validated :class:`ConvertConfig` of the ``convert`` section; a ``trainable="lora"``
        run that leaves ``router_embed_dim`` unset gets the LoRA path's narrower router embedding
        (``LORA_ROUTER_EMBED_DIM``: its encoder is trained, and at 256 it dominates a small
        model's trainable share; docs/lora.md).

        Example:
            >>> from dynconvert.recipes import load_recipe
            >>> r = load_recipe("digits")
            >>> r.calibration["trainable"] = "lora"
            >>> r.convert_config().router_embed_dim
            32
        """
        data = dict(self.convert)
        if self.calibration.get("trainable") == "lora":
            data.setdefault("router_embed_dim", LORA_ROUTER_EMBED_DIM)
        try:
            return ConvertConfig.from_dict(data)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"section convert: {e}") from e

    def calibration_config(self, target: float | None = None, **run: Any) -> CalibrationConfig:
        """The validated :class:`CalibrationConfig`: the section plus the run's own fields.

        Example:
            >>> from dynconvert.recipes import load_recipe
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
            >>> from dynconvert.recipes import load_recipe
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
        raise ConfigError(f"section {where} must be a mapping; got {shown(data)}")
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

    Example:
        >>> recipe_from_dict({"name": "mine", "calibration": {"steps": 10}}).calibration
        {'steps': 10}
    """
    if not isinstance(data, dict):
        raise ConfigError(f"a recipe must be a mapping of fields; got {type(data).__name__}")
    if "name" not in data:
        raise ConfigError("a recipe needs a name (e.g. name: my-recipe)")
    recipe = _build(Recipe, data, "")
    recipe.source = source
    return recipe
