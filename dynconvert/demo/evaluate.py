"""Evaluate the digits demo: the original and the converted model sample from the same noise,
then the digits classifier scores both (accuracy and Frechet distance to the real digits).

Example:
    >>> import dynconvert
    >>> from dynconvert.models import build_model
    >>> from dynconvert.demo import evaluate_digits
    >>> model = dynconvert.convert(build_model("digits").eval(), budget=0.5)
    >>> result = evaluate_digits(None, model, per_class=2, steps=5)
    >>> result["samples"]
    20
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dynconvert.demo.models import demo_spec
from dynconvert.errors import ConfigError
from dynconvert.flops import last_flops_ratio
from dynconvert.measure.evaluations import Evaluation
from dynconvert.runtime.routing import routing
from dynconvert.runtime.state import get_state, is_converted
from dynconvert.sampling import compare_grid, comparison_titles, sample

_CHUNK = 50
"""Samples per model call (100 rows with guidance): measured fastest on a 2-core CPU."""


def _flops_probe(model: nn.Module) -> tuple[list[float], Callable[[int, int], None] | None]:
    """A per-step callback recording the whole-model FLOPs ratio of a converted model's last
    call."""
    ratios: list[float] = []
    if not is_converted(model):
        return ratios, None
    bank = get_state(model)

    def probe(done: int, total: int) -> None:
        ratios.append(float(last_flops_ratio(bank).mean()))

    return ratios, probe


def _sample_digits(
    model: nn.Module,
    labels: torch.Tensor,
    *,
    mode: str | None,
    steps: int,
    cfg_scale: float,
    seed: int,
    scheduler: str,
    stage: str,
    on_progress: Callable[[str, int, int], None] | None,
    clip_sample: bool = True,
) -> tuple[torch.Tensor, float, float | None]:
    """Samples of one model (routing ``mode`` when converted), seconds, mean FLOPs ratio."""

    ratios, probe = _flops_probe(model) if mode == "eval" else ([], None)

    def step(done: int, total: int) -> None:
        if probe is not None:
            probe(done, total)
        if on_progress is not None:
            on_progress(stage, done, total)

    context = routing(model, mode) if is_converted(model) else contextlib.nullcontext()
    start = time.perf_counter()
    with context:
        images = sample(
            model,
            labels=labels,
            steps=steps,
            cfg_scale=cfg_scale,
            seed=seed,
            scheduler=scheduler,
            clip_sample=clip_sample,
            on_step=step,
            batch_size=_CHUNK,
        ).cpu()
    seconds = time.perf_counter() - start
    return images, seconds, (sum(ratios) / len(ratios) if ratios else None)


def _check(original: nn.Module | None, dynamic: nn.Module, per_class: Any, benchmark: str) -> None:
    """Refuse a bad sample count, an unconverted model without an original, or a model of
    another class count."""
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ConfigError(f"per_class must be an integer >= 1; got {per_class!r}")
    if not is_converted(dynamic) and original is None:
        raise ConfigError(
            "dynamic is not a converted model; pass the model from dynconvert.convert (or load), "
            "or give original= explicitly"
        )
    for model in (original, dynamic):
        if model is not None and getattr(model, "num_classes", 10) != 10:
            raise ConfigError(
                f"evaluate_digits needs a 10-class {benchmark} model; got "
                f"num_classes={model.num_classes}"
            )


def _score(
    orig_images: torch.Tensor,
    dyn_images: torch.Tensor,
    labels: torch.Tensor,
    seed: int,
    benchmark: str,
) -> dict[str, Any]:
    """Classifier accuracy and Frechet distances of both sample sets (see evaluate_digits)."""
    from dynconvert.demo import metrics

    real_x, real_y = metrics.real_digits(benchmark)
    f_real = metrics.features(real_x, benchmark=benchmark)
    f_orig = metrics.features(orig_images, benchmark=benchmark)
    f_dyn = metrics.features(dyn_images, benchmark=benchmark)
    g = torch.Generator().manual_seed(seed)
    subset = torch.randperm(len(real_x), generator=g)[: len(labels)]
    _, heldout = metrics.digits_split(benchmark=benchmark)
    fd = metrics.frechet_from_features
    return {
        "classifier_accuracy": {
            "original": metrics.classifier_accuracy(orig_images, labels, benchmark),
            "dynamic": metrics.classifier_accuracy(dyn_images, labels, benchmark),
            "real_heldout": metrics.classifier_accuracy(
                real_x[heldout], real_y[heldout], benchmark
            ),
        },
        "frechet_distance": {
            "original": fd(f_orig, f_real),
            "dynamic": fd(f_dyn, f_real),
            "dynamic_vs_original": fd(f_dyn, f_orig),
            "real_subset": fd(f_real[subset], f_real),
        },
    }


def evaluate_digits(
    original: nn.Module | None,
    dynamic: nn.Module,
    *,
    per_class: int = 20,
    steps: int = 50,
    cfg_scale: float = 1.5,
    seed: int = 0,
    scheduler: str = "ddim",
    on_progress: Callable[[str, int, int], None] | None = None,
    benchmark: str = "digits",
) -> dict[str, Any]:
    """Sample ``per_class`` digits of every class from both models (same seeds) and score them.

    Both models draw from the same initial noise (``seed``), so sample i of the original and
    sample i of the dynamic model are directly comparable. The dynamic model samples with routing
    "eval" (its real, reduced compute); the original with routing "full" when it is the same
    converted object (or ``None``).

    Args:
        original: The original demo model, or ``None`` to run ``dynamic`` with every router on.
        dynamic: The converted (and calibrated) demo model.
        per_class: Samples per class (10 classes).
        steps: Sampler steps.
        cfg_scale: Classifier-free guidance scale.
        seed: Seed of the initial noise, shared by both models.
        scheduler: "ddim", "dpm" or "ddpm" (see ``dynconvert.sampling.sample``).
        on_progress: Called as ``on_progress(stage, done, total)`` after each sampler step,
            ``stage`` being "original" or "dynamic".
        benchmark: The demo the models belong to (``digits``, ``translated``): its classifier
            and real images score the samples.

    Returns:
        A dict, JSON-ready except for ``"tensors"``::

            {"classifier_accuracy": {"original": a, "dynamic": b, "real_heldout": r},
             "frechet_distance": {"original": fd(original, real), "dynamic": fd(dynamic, real),
                                  "dynamic_vs_original": fd(dynamic, original),
                                  "real_subset": fd(n real digits, all real digits)},
             "flops_ratio": {"dynamic": mean whole-model F_dyn/F_static over the sampler's calls},
             "samples": n, "per_class": k, "steps": s, "cfg_scale": g, "seed": seed,
             "scheduler": name, "benchmark": name,
             "seconds": {"original", "dynamic", "metrics", "total"},
             "tensors": {"original": (n, 1, S, S), "dynamic": (n, 1, S, S), "labels": (n,)}}

        Frechet distances are to all 1797 real images of the demo, in its classifier's feature
        space; ``real_subset`` (n real images against all) is the floor a perfect model would
        reach. Drop ``"tensors"`` before ``json.dumps``.

    Raises:
        ConfigError: ``per_class`` or ``steps`` below 1, an unknown demo, or a model that is not
            a 10-class one.

    Example:
        >>> r = evaluate_digits(None, model, per_class=1, steps=2)  # doctest: +SKIP
        >>> r["classifier_accuracy"]["dynamic"]  # doctest: +SKIP
        0.9
    """
    benchmark = demo_spec(benchmark).name
    _check(original, dynamic, per_class, benchmark)
    labels = torch.arange(10).repeat_interleave(per_class)
    clip = demo_spec(benchmark).sampling["clip_sample"]
    common = dict(steps=steps, cfg_scale=cfg_scale, seed=seed, scheduler=scheduler,
                  on_progress=on_progress, clip_sample=clip)  # fmt: skip
    start = time.perf_counter()
    first = dynamic if original is None else original
    orig_images, orig_s, _ = _sample_digits(first, labels, mode="full", stage="original", **common)
    dyn_mode = "eval" if is_converted(dynamic) else None
    dyn_images, dyn_s, ratio = _sample_digits(
        dynamic, labels, mode=dyn_mode, stage="dynamic", **common
    )
    metrics_start = time.perf_counter()
    result = _score(orig_images, dyn_images, labels, seed, benchmark)
    result.update(
        flops_ratio={"dynamic": ratio}, samples=int(len(labels)), per_class=per_class,
        steps=steps, cfg_scale=float(cfg_scale), seed=seed, scheduler=scheduler,
        benchmark=benchmark,
    )  # fmt: skip
    end = time.perf_counter()
    result["seconds"] = {
        "original": orig_s,
        "dynamic": dyn_s,
        "metrics": end - metrics_start,
        "total": end - start,
    }
    result["tensors"] = {"original": orig_images, "dynamic": dyn_images, "labels": labels}
    return result


def write_demo_grid(
    evaluation: dict[str, Any],
    path: str | os.PathLike,
    *,
    columns: int | None = 10,
    upscale: int = 2,
) -> Path:
    """Write the original (left) and dynamic (right) samples of ``evaluate_digits`` as one PNG,
    titled "original" and "dynamic" with its FLOPs ratio.

    Each grid has one row per class (0 at the top) and ``columns`` samples per row, the same
    noise in the same cell of both grids.

    Args:
        evaluation: The dict ``evaluate_digits`` returned.
        path: The PNG file (written atomically).
        columns: Samples per class to show (default 10; ``None``: all of them).
        upscale: Integer magnification of each 16x16 digit.

    Returns:
        The path written.

    Example:
        >>> write_demo_grid(result, "runs/digits/samples.png")  # doctest: +SKIP
    """

    tensors = evaluation.get("tensors") if isinstance(evaluation, dict) else None
    if not tensors or "original" not in tensors or "dynamic" not in tensors:
        raise ConfigError(
            "write_demo_grid needs the dict evaluate_digits returned (with its 'tensors' entry)"
        )
    per_class = int(evaluation.get("per_class") or len(tensors["labels"]) // 10)
    show = per_class if columns is None else max(1, min(int(columns), per_class))
    keep = torch.cat([torch.arange(show) + c * per_class for c in range(10)])
    ratio = (evaluation.get("flops_ratio") or {}).get("dynamic")  # over the sampler's calls
    return compare_grid(
        tensors["original"][keep],
        tensors["dynamic"][keep],
        path,
        nrow=show,
        upscale=upscale,
        titles=comparison_titles(ratio),
    )


# -- the "digits" evaluation of a run (evaluate.kind: digits) ----------------------------------
SAMPLES_FILE = "samples.png"
"""The grid a run writes (original left, dynamic right), as named in ``report.json``."""


def check_digits_model(model: nn.Module, benchmark: str = "digits") -> str:
    """Why ``model`` cannot take a demo's evaluation ("" when it can): the demo's classifier
    only knows that demo model's images (16x16 digits, or the 32x32 translated canvas)."""
    if getattr(model, "preset", None) != benchmark:
        return f"it scores samples of the {benchmark} demo model only"
    return ""


def digits_report(
    original: nn.Module, dynamic: nn.Module, recipe: Any, out: Path, benchmark: str = "digits"
) -> dict[str, Any]:
    """The report fields of a demo run: classifier accuracy and Frechet distance of the
    original and the dynamic model (same seeds), the other figures under ``evaluation``, and
    the sample grid when the recipe asks for one."""
    ev, samples = recipe.evaluate, recipe.samples
    res = evaluate_digits(original, dynamic, per_class=ev.per_class, steps=ev.steps, seed=ev.seed,
                          cfg_scale=samples.cfg_scale, scheduler=samples.scheduler,
                          benchmark=benchmark)  # fmt: skip
    keep = ("classifier_accuracy", "frechet_distance")
    fields: dict[str, Any] = {
        k: {m: float(res[k][m]) for m in ("original", "dynamic")} for k in keep
    }
    extra = {k: v for k, v in res.items() if k not in (*keep, "tensors") and _jsonable(v)}
    for k in keep:  # the other figures (real held-out accuracy, distance between the two models)
        extra.update(
            {f"{k}_{m}": float(v) for m, v in res[k].items() if m not in ("original", "dynamic")}
        )
    fields["evaluation"] = extra
    if samples.grid:
        write_demo_grid(res, Path(out) / SAMPLES_FILE, columns=min(10, ev.per_class), upscale=2)
        fields["samples"] = SAMPLES_FILE
    return fields


def _jsonable(v: Any) -> bool:
    """Small enough, and plain enough, for report.json."""
    return isinstance(v, (str, int, float, bool, type(None))) or (
        isinstance(v, (list, dict)) and len(json.dumps(v, default=str)) < 2000
    )


def demo_evaluation(benchmark: str) -> Evaluation:
    """The run evaluation ``evaluate.kind: <benchmark>`` of a demo (``digits``, ``translated``).

    Example:
        >>> demo_evaluation("translated").check(object())
        'it scores samples of the translated demo model only'
    """
    return Evaluation(
        benchmark,
        run=partial(digits_report, benchmark=benchmark),
        check=partial(check_digits_model, benchmark=benchmark),
        description="sampling both models for classifier accuracy and Frechet distance "
        f"({benchmark})",
        summary=lambda r: "accuracy {original:.3f} -> {dynamic:.3f}".format(
            **r["classifier_accuracy"]
        ),
    )


DIGITS_EVALUATION = demo_evaluation("digits")
"""``evaluate.kind: digits``."""

TRANSLATED_EVALUATION = demo_evaluation("translated")
"""``evaluate.kind: translated``."""
