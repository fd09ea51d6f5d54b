"""Recipe files: the shipped YAML recipes next to this module, finding one, and reading it.

YAML is read with a safe loader that takes ``1e-4`` as a float (YAML 1.2), as override values
are (:func:`parse_value`).

Example:
    >>> from dynconvert.recipes import read_recipe_data
    >>> data, path = read_recipe_data("digits")
    >>> data["model"], path.name
    ('digits', 'digits.yaml')
"""

from __future__ import annotations

import importlib.resources
import re
from pathlib import Path
from typing import Any

import yaml

from dynconvert.errors import ConfigError


def _recipe_dir() -> Path:
    # A source checkout (editable install, a git worktree) reads its own top-level recipes/;
    # an installed wheel carries them as the package dynconvert.recipes.shipped.
    checkout = Path(__file__).resolve().parents[2] / "recipes"
    if (checkout / "__init__.py").is_file():
        return checkout
    return Path(str(importlib.resources.files("dynconvert.recipes.shipped")))


RECIPE_DIR = _recipe_dir()
"""The folder of the shipped ``*.yaml`` recipes: the repository's top-level ``recipes/``,
installed with the package as ``dynconvert.recipes.shipped``."""


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
    """An override's value as YAML (``2e-5`` -> float, ``true`` -> bool, ``[1, 2]`` -> list).

    Example:
        >>> parse_value("2e-5"), parse_value("null"), parse_value("ddim")
        (2e-05, None, 'ddim')
    """
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:
        return text


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

    Example:
        >>> recipe_path("digits").name
        'digits.yaml'
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
    """The raw mapping of a recipe file (not yet checked) and its path.

    Raises:
        ConfigError: Unknown recipe, unreadable file, invalid YAML, or not a mapping.

    Example:
        >>> read_recipe_data("dit-s")[0]["target_flops"]
        0.5
    """
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
