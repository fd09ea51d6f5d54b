"""What a wheel installs: every package folder, the shipped recipes' package included."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
SOURCES = {".py", ".md", ".yaml", ".yml", ".toml", ".cfg", ".txt"}


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    folders = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "dynconvert").rglob("__init__.py")
    }
    assert listed == folders | {"dynconvert.recipes.shipped"}


def test_no_merge_conflict_markers_are_left_in_the_sources():
    # A marker inside a docstring or a markdown page breaks no parser and no linter: a merge
    # once left one in a module docstring for an hour.
    folders = ["dynconvert", "tests", "docs", "benchmarks", "examples", "recipes"]
    files = [p for f in folders for p in (REPO / f).rglob("*") if p.suffix in SOURCES]
    files += [p for p in REPO.iterdir() if p.suffix in SOURCES]
    marker = re.compile(r"^(<{7} |>{7} |={7}$)", re.M)
    found = [str(p.relative_to(REPO)) for p in files if marker.search(p.read_text("utf-8"))]
    assert found == []
