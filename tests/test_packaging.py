"""What a wheel installs: every package folder, the shipped recipes' package included."""

from __future__ import annotations

from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    folders = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "dynconvert").rglob("__init__.py")
    }
    assert listed == folders | {"dynconvert.recipes.shipped"}
