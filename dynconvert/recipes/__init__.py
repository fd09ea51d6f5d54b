"""Recipes: named, checked settings of a whole convert run, shipped as YAML.

A recipe says which model to start from, the FLOPs target, the data, how convert builds the
routers (``convert:``, the fields of :class:`~dynconvert.ConvertConfig`), how calibration trains
them (``calibration:``, the fields of :class:`~dynconvert.CalibrationConfig` except ``target``,
``output_dir`` and ``resume``, which the run sets), and what the run measures afterwards
(``report:``, ``samples:``, ``evaluate:``). Every field is documented in :class:`Recipe` and in
the YAML files as comments. Loading is strict: an unknown key anywhere is an error that lists
the valid keys. Overrides are ``key=value`` items with dotted keys (``calibration.lr=2e-5``).

The shipped recipes are the ``*.yaml`` files of the repository's top-level ``recipes/`` folder
(:data:`RECIPE_DIR`).

Modules:
    settings: :class:`Recipe` and its checked sections, :func:`recipe_from_dict`.
    files: the shipped recipe files, finding and reading one, YAML values.
    overrides: dotted ``key=value`` overrides, checked against the fields.
    loading: :func:`load_recipe`, the recipe for a model, a recipe's summary.

Example:
    >>> from dynconvert.recipes import load_recipe
    >>> r = load_recipe("digits", overrides=["calibration.steps=10"])
    >>> r.model, r.calibration["steps"]
    ('digits', 10)
"""

from __future__ import annotations

from dynconvert.recipes.files import (
    RECIPE_DIR,
    parse_value,
    read_recipe_data,
    recipe_path,
    shipped_recipes,
)
from dynconvert.recipes.loading import load_recipe, recipe_for_model, recipe_summary
from dynconvert.recipes.overrides import apply_overrides
from dynconvert.recipes.settings import (
    RECIPE_VERSION,
    RUN_FIELDS,
    EvaluateSettings,
    Recipe,
    ReportSettings,
    SampleSettings,
    recipe_from_dict,
)

__all__ = [
    "RECIPE_DIR",
    "RECIPE_VERSION",
    "RUN_FIELDS",
    "EvaluateSettings",
    "Recipe",
    "ReportSettings",
    "SampleSettings",
    "apply_overrides",
    "load_recipe",
    "parse_value",
    "read_recipe_data",
    "recipe_for_model",
    "recipe_from_dict",
    "recipe_path",
    "recipe_summary",
    "shipped_recipes",
]
