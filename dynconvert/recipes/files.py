"""Recipe files: the shipped YAML recipes next to this module, finding one, and reading it.

YAML is read with a safe loader that takes ``1e-4`` as a float (YAML 1.2), as override values
are (:func:`parse_value`), within :data:`dynconvert.fields.RECIPE_LIMITS`: the size before
parsing, then depth, number of values (each use of an alias counts its whole value again, so
a few hundred bytes of aliases cannot stand for millions of values), length of each string
and digits of each integer while the document is composed, before any value is built.

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
from yaml.nodes import ScalarNode

from dynconvert.errors import ConfigError, FileError
from dynconvert.fields import RECIPE_LIMITS, shown
from dynconvert.io.files import read_bytes


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


class LimitError(ConfigError):
    """A YAML document past :data:`~dynconvert.fields.RECIPE_LIMITS` (raised while composing)."""


class _Loader(yaml.SafeLoader):
    """Safe YAML loader that reads ``1e-4`` as a float (YAML 1.2), not as a string, within
    :data:`~dynconvert.fields.RECIPE_LIMITS` (the module says which)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0
        self._count = 0  # values so far, each alias counted as its whole value
        self._weight: dict[int, int] = {}  # id(node) -> values in it, aliases expanded

    def compose_node(self, parent: Any, index: Any) -> Any:
        """One node, counted and checked against the limits before the next is read."""
        limits = RECIPE_LIMITS
        if self.check_event(yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if id(node) not in self._weight:  # still being composed: it would hold itself
                raise LimitError("has an alias inside the value it names")
            self._add(self._weight[id(node)])
            return node
        self._depth += 1
        if self._depth > limits.depth:
            raise LimitError(f"is nested more than {limits.depth} deep")
        start = self._count
        node = super().compose_node(parent, index)
        self._depth -= 1
        self._add(1)
        self._weight[id(node)] = self._count - start
        if isinstance(node, ScalarNode) and len(node.value) > limits.string:
            raise LimitError(f"holds a string of {len(node.value)} characters")
        return node

    def _add(self, values: int) -> None:
        self._count += values
        if self._count > RECIPE_LIMITS.nodes:
            raise LimitError(
                f"holds more than {RECIPE_LIMITS.nodes} values (YAML aliases count at each use)"
            )

    def construct_yaml_int(self, node: Any) -> int:
        """An integer of at most 40 digits (a longer one is refused before it is built)."""
        if len(node.value) > RECIPE_LIMITS.int_digits + 2:
            raise LimitError(f"holds an integer of {len(node.value)} digits")
        return super().construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


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
    """An override's value as YAML (``2e-5`` -> float, ``true`` -> bool, ``[1, 2]`` -> list);
    text that is not YAML stays text.

    Raises:
        LimitError: The value is past :data:`~dynconvert.fields.RECIPE_LIMITS`.

    Example:
        >>> parse_value("2e-5"), parse_value("null"), parse_value("ddim")
        (2e-05, None, 'ddim')
    """
    if len(text) > RECIPE_LIMITS.bytes:
        raise LimitError(f"is {len(text)} characters long (at most {RECIPE_LIMITS.bytes})")
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, RecursionError):
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
    try:
        if path.is_file():
            return path
    except OSError:  # a name too long for the file system
        raise ConfigError(f"recipe {shown(key)} is not a recipe name or a readable file") from None
    if path.suffix in (".yaml", ".yml") or "/" in key:
        raise ConfigError(
            f"recipe file {path} does not exist; check the path, or use one of: "
            f"{', '.join(shipped)}"
        )
    raise ConfigError(
        f"unknown recipe {shown(key)}; shipped recipes: {', '.join(shipped)} (or pass a .yaml file)"
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
        text = read_bytes(path, RECIPE_LIMITS.bytes, follow=True).decode("utf-8")
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(
            f"recipe {path} is not valid YAML{line}: {str(getattr(e, 'problem', e))[:120]}"
        ) from None
    except LimitError as e:
        raise ConfigError(f"recipe {path} {e}; a recipe is a short file of settings") from None
    except (FileError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read recipe {path}: {str(e)[:200]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of fields; got {type(data).__name__}")
    data.setdefault("name", path.stem)
    return data, path
