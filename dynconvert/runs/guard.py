"""What a run folder may hold before dynconvert reads or writes it: no links among its entries
(or its checkpoints'), and a ``run.json`` model source that names only what dynconvert can
build without importing anything a file names (a built-in preset, a hidden test model, or a
model class of the installed diffusers).

Example:
    >>> check_source({"name": "digits", "kind": "preset", "target": "digits", "weights": "shipped"})
    {'name': 'digits', 'kind': 'preset', 'target': 'digits', 'weights': 'shipped'}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dynconvert.errors import RecordError
from dynconvert.fields import shown
from dynconvert.io.files import entries, is_link, link_error

SOURCE_FIELDS = {
    "name": (str,), "kind": (str,), "target": (str,), "weights": (str,),
    "checkpoint": (str, type(None)), "model_kwargs": (dict,), "seed": (int,),
    "repo": (str, type(None)), "config": (dict, type(None)),
}  # fmt: skip
"""The fields of a recorded model source and their types."""

WEIGHTS = ("shipped", "checkpoint", "folder", "hub", "random")


def refuse_links(out: str | os.PathLike) -> None:
    """Refuse a run folder with a link among its entries or its checkpoints' (a link to a
    user's file would be read, truncated or pruned through).

    Raises:
        FileError: The first link found, named, with the fix.

    Example:
        >>> refuse_links("/no/such/run")
    """
    out = Path(out)
    for name in entries(out):
        if is_link(out / name):
            raise link_error(out / name)
    for name in entries(out / "checkpoints", out):
        if is_link(out / "checkpoints" / name):
            raise link_error(out / "checkpoints" / name)


def check_source(data: Any) -> dict[str, Any]:
    """A recorded model source (``run.json``'s ``source``), checked field by field; its class
    or preset must be one dynconvert knows by name.

    Raises:
        RecordError: An unknown field or kind, a field of the wrong type, or a target that is
            not a preset, a hidden test model or a diffusers model class.
    """
    from dynconvert.io.restore import diffusers_class
    from dynconvert.models import PRESETS
    from dynconvert.models.tiny import TINY_DIFFUSERS

    def bad(what: str) -> RecordError:
        return RecordError(
            f"run.json's model source {what}; it is not one dynconvert wrote: load the folder "
            "with dynconvert.load(folder, base_model) or convert the model again"
        )

    if not isinstance(data, dict):
        raise bad("is not a mapping")
    for key, value in data.items():
        kinds = SOURCE_FIELDS.get(key)
        if kinds is None:
            raise bad(f"has an unknown field {shown(key)}")
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise bad(f"field {key} is {shown(value)}")
    if any(key not in data for key in ("name", "kind", "target", "weights")):
        raise bad("lacks name, kind, target or weights")
    kind, target = data["kind"], data["target"]
    known = {
        "preset": lambda: target in PRESETS,
        "testing": lambda: target in TINY_DIFFUSERS,
        "diffusers": lambda: target.isidentifier() and diffusers_class(f"diffusers.{target}"),
    }
    if kind not in known or not known[kind]():
        raise bad(f"names {shown(kind)} {shown(target)}, not a built-in preset or diffusers class")
    if data["weights"] not in WEIGHTS:
        raise bad(f"has weights {shown(data['weights'])}")
    return data
