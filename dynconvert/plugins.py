"""Plugins: packages that add presets, calibration data and evaluations to the registries.

The registries (model presets, named calibration data, run evaluations) are :class:`Registry`
tables that load the plugins on their first read (and ``runtime.state.attach`` loads them before
it runs the attach hooks of a converted model), so ``import dynconvert`` stays light (the
command line's ``--help`` imports no torch) and a preset registered by a plugin is found wherever
it is looked up. The digits demo (``dynconvert.demo``) is the built-in plugin; an installed
package adds its own through the ``dynconvert.plugins`` entry-point group, whose value is the
module to import (it registers what it provides when imported).

Only installed packages are imported this way: nothing named in a run folder or record is.

Example:
    >>> from dynconvert.plugins import Registry
    >>> table = Registry()
    >>> table["mine"] = 1
    >>> "mine" in table
    True
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import Any

BUILTIN = ("dynconvert.demo", "dynconvert.io.pretrained")
"""Modules imported before any registry is read or any model is converted or loaded: the digits
demo (its preset, data and evaluation) and the diffusers integration (the hooks that make a
converted diffusers model save its record with ``save_pretrained``)."""

GROUP = "dynconvert.plugins"
"""Entry-point group of third-party plugins."""

_loaded = False


def load_plugins() -> None:
    """Import the built-in plugins and those of installed packages, once per process.

    Example:
        >>> load_plugins()
        >>> from dynconvert.models import list_presets
        >>> "digits" in list_presets()
        True
    """
    global _loaded
    if _loaded:
        return
    _loaded = True  # first, so that a plugin reading a registry while it registers does not recurse
    for name in BUILTIN:
        importlib.import_module(name)
    for entry in entry_points(group=GROUP):
        entry.load()


class Registry(dict):
    """A name -> object table filled by plugins on its first read (a plain dict otherwise).

    Example:
        >>> r = Registry(a=1)
        >>> sorted(r)
        ['a']
    """

    def __getitem__(self, key: Any) -> Any:
        load_plugins()
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        load_plugins()
        return super().__contains__(key)

    def __iter__(self) -> Iterator[Any]:
        load_plugins()
        return super().__iter__()

    def __len__(self) -> int:
        load_plugins()
        return super().__len__()

    def get(self, key: Any, default: Any = None) -> Any:
        """``dict.get`` after the plugins have registered."""
        load_plugins()
        return super().get(key, default)

    def keys(self):  # noqa: D102 - dict's
        load_plugins()
        return super().keys()

    def values(self):  # noqa: D102 - dict's
        load_plugins()
        return super().values()

    def items(self):  # noqa: D102 - dict's
        load_plugins()
        return super().items()
