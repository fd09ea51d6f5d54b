"""Loading a recipe: read its file, apply overrides and a run's own values, check it; and the
shipped recipe for a model.

Example:
    >>> from dynconvert.recipes import load_recipe
    >>> load_recipe("digits", ["calibration.steps=10"]).calibration["steps"]
    10
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dynconvert.errors import ConfigError
from dynconvert.recipes.files import RECIPE_DIR, read_recipe_data, shipped_recipes
from dynconvert.recipes.overrides import apply_overrides
from dynconvert.recipes.settings import Recipe, recipe_from_dict


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
        values: Typed values with dotted keys, applied after ``overrides`` (what a run's own
            settings such as ``target_flops`` set; not parsed as YAML).

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
    """Name, model, target, steps, batch size, description and file of a shipped recipe.

    Example:
        >>> recipe_summary("digits")["model"]
        'digits'
    """
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
