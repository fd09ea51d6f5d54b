"""The demos: small DiTs that ship with dynconvert, and metrics to judge their samples.

Two demos, one machinery (``dynconvert.demo.models``): ``digits`` (scikit-learn's digits at
16x16) and ``translated`` (the same digits at a random position on an empty 32x32 canvas, where
most tokens are background). Importing this package (``import dynconvert`` does) registers, for
each, the model preset (``digits`` / ``dit-digits``, ``translated`` / ``dit-translated``), so that
``dynconvert.models.build_model("translated")`` builds that DiT with its shipped weights, the
named calibration data (``data: translated``) and the run evaluation (``evaluate.kind:
translated``: classifier accuracy and Frechet distance of samples). Everything else loads on
first use:

- ``build_demo``, ``demo_spec``, ``demo_model_info``, ``save_demo_weights``
  (``dynconvert.demo.models``); ``build_digits``, ``DIGITS_CONFIG``, ``DIGITS_WEIGHTS``
  (``dynconvert.demo.digits``); ``TRANSLATED_CONFIG`` (``dynconvert.demo.translated``)
- ``dynconvert.demo.data.digits`` and ``.translated``: the data sets
- ``train_digits`` (``dynconvert.demo.training``), used by ``examples/train_digits.py`` and
  ``examples/train_translated.py``
- ``classifier_accuracy``, ``frechet_distance``, ``load_classifier``, ``real_digits``
  (``dynconvert.demo.metrics``); every one takes ``benchmark="digits"`` or ``"translated"``
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
from dynconvert.demo import translated as _translated
from dynconvert.demo.evaluate import DIGITS_EVALUATION, TRANSLATED_EVALUATION
from dynconvert.demo.models import register_demo
from dynconvert.measure.evaluations import register_evaluation

_LAZY = {
    "DIGITS_CONFIG": "digits",
    "DIGITS_SAMPLING": "digits",
    "DIGITS_WEIGHTS": "digits",
    "TRANSLATED_CONFIG": "translated",
    "build_demo": "models",
    "demo_spec": "models",
    "demo_model_info": "models",
    "save_demo_weights": "models",
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
    "train_classifier": "metrics",
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
register_demo(_translated.TRANSLATED)
register_source("digits", _data.digits)
register_source("translated", _translated.TRANSLATED.data)
register_evaluation(DIGITS_EVALUATION)
register_evaluation(TRANSLATED_EVALUATION)
