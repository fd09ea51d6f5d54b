"""Overrides: ``key=value`` items with dotted keys (``calibration.lr=2e-5``), checked against the
recipe's fields before they are applied.

Example:
    >>> from dynconvert.recipes import apply_overrides
    >>> apply_overrides({"name": "x"}, {"report.bench": False})
    {'name': 'x', 'report': {'bench': False}}
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from dynconvert.calibration.config import CalibrationConfig
from dynconvert.config import ConvertConfig
from dynconvert.errors import ConfigError
from dynconvert.fields import RECIPE_LIMITS, shown
from dynconvert.io.limits import check_shape
from dynconvert.recipes.files import LimitError, parse_value
from dynconvert.recipes.settings import (
    RUN_FIELDS,
    EvaluateSettings,
    Recipe,
    ReportSettings,
    SampleSettings,
)


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
    if len(overrides) > _MAX_ITEMS:
        raise ConfigError(f"`overrides` has {len(overrides)} items; at most {_MAX_ITEMS}")
    out = copy.deepcopy(data)
    items: list[tuple[str, Any]] = []
    if isinstance(overrides, dict):
        items = list(overrides.items())
        for key, value in items:
            check_shape(value, f"the value of {shown(key)}", ConfigError, RECIPE_LIMITS)
    else:
        for item in overrides:
            key, sep, text = item.partition("=") if isinstance(item, str) else ("", "", "")
            if not sep or not key.strip():
                raise ConfigError(
                    f"each item of `overrides` must be key=value (e.g. calibration.lr=2e-5); "
                    f"got {shown(item)}"
                )
            try:
                items.append((key.strip(), parse_value(text.strip())))
            except LimitError as e:
                raise ConfigError(f"the value of {shown(key.strip())} {e}") from None
    for key, value in items:
        if not isinstance(key, str) or len(key) > 200 or key.count(".") >= RECIPE_LIMITS.depth:
            raise ConfigError(f"recipe key {shown(key)} is not a dotted name of a recipe field")
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
_MAX_ITEMS = 1000
"""At most this many overrides in one call (a command line holds far fewer)."""


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
        use = {
            "target": "set `target_flops` instead",
            "output_dir": "set the run's `out`",
            "resume": "set the run's `resume=True`",
        }
        raise ConfigError(f"{key} is set by the run: {use[parts[1]]}")
    if parts[0] not in top:
        raise ConfigError(
            f"unknown recipe key {shown(key)}; valid top-level keys: {', '.join(top)}"
        )
    if len(parts) == 1:
        return
    valid = _section_fields(parts[0])
    if valid is None:
        return
    if not valid:
        raise ConfigError(f"recipe key {parts[0]!r} is not a section; set it as {parts[0]}=value")
    if len(parts) > 2 or parts[1] not in valid:
        raise ConfigError(
            f"unknown recipe key {shown(key)}; valid keys of {parts[0]}: {', '.join(valid)}"
        )
