"""The digits demo: a small DiT that ships with dynconvert, and metrics to judge its samples.

Importing this package (``import dynconvert`` does) registers the demo with the core's
registries: the model preset ``digits`` (alias ``dit-digits``), so that
``dynconvert.models.build_model("digits")`` builds the digits DiT with its shipped weights, and
the named calibration data ``"digits"`` (``dynconvert.demo.data.digits``) and the run
evaluation ``evaluate.kind: digits`` (``dynconvert.demo.evaluate.digits_report``).
Everything else loads on first use:

- ``build_digits``, ``DIGITS_CONFIG``, ``DIGITS_WEIGHTS`` (``dynconvert.demo.digits``)
- ``train_digits`` (``dynconvert.demo.training``), used by ``examples/train_digits.py``
- ``classifier_accuracy``, ``frechet_distance``, ``load_classifier``, ``real_digits``
  (``dynconvert.demo.metrics``)
- ``evaluate_digits``, ``write_demo_grid`` (``dynconvert.demo.evaluate``)

Example:
    >>> import dynconvert
    >>> from dynconvert.demo import evaluate_digits, write_demo_grid
    >>> from dynconvert.models import build_model
    >>> model = dynconvert.convert(build_model("digits").eval(), budget=0.5)
    >>> result = evaluate_digits(None, model, per_class=1, steps=4)
    >>> sorted(result["classifier_accuracy"])
    ['dynamic', 'original', 'real_heldout']
"""

from __future__ import annotations

import importlib
from typing import Any

from dynconvert.calibration.data import register_source
from dynconvert.demo import data as _data
from dynconvert.demo import digits as _digits
from dynconvert.demo.evaluate import DIGITS_EVALUATION
from dynconvert.measure.evaluations import register_evaluation

_LAZY = {
    "DIGITS_CONFIG": "digits",
    "DIGITS_SAMPLING": "digits",
    "DIGITS_WEIGHTS": "digits",
    "build_digits": "digits",
    "digits": "data",
    "digits_model_info": "digits",
    "save_digits_weights": "digits",
    "train_digits": "training",
    "TrainResult": "training",
    "classifier_accuracy": "metrics",
    "frechet_distance": "metrics",
    "features": "metrics",
    "load_classifier": "metrics",
    "real_digits": "metrics",
    "evaluate_digits": "evaluate",
    "write_demo_grid": "evaluate",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dynconvert.demo' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"dynconvert.demo.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


_digits.register()
register_source("digits", _data.digits)
register_evaluation(DIGITS_EVALUATION)
