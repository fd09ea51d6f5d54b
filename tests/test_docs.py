"""The documentation site builds with no warning: ``mkdocs build --strict`` (mkdocs.yml).

Strict mode fails on a page in the nav that does not exist, a page left out of the nav, and a
link or an anchor between pages that does not resolve.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install -e .[docs])")
    pytest.importorskip("material", reason="mkdocs-material is not installed")
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert (site / "method" / "index.html").is_file()
    assert (site / "results" / "quality_digits_fd.png").is_file()  # served by docs/hooks


def test_the_code_cites_only_pages_of_the_repository():
    """A docstring or comment that names a document names one in docs/ that exists, with a
    heading that exists (``docs/method.md, "Training objective"``)."""
    cite = re.compile(r'(?:docs/)?([\w-]+)\.md(?:[,:]? \(?"([^"]+)")?')
    bad = []
    for path in sorted((ROOT / "dynconvert").rglob("*.py")):
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            for m in cite.finditer(line):
                page = ROOT / "docs" / f"{m.group(1)}.md"
                where = f"{path.relative_to(ROOT)}:{line_no}"
                if not m.group(0).startswith("docs/") or not page.is_file():
                    bad.append(f"{where} cites {m.group(0)!r} (not a page in docs/)")
                elif m.group(2) and not _has_heading(page, m.group(2)):
                    bad.append(f"{where}: {page.name} has no heading {m.group(2)!r}")
    assert bad == []


def _has_heading(page: Path, title: str) -> bool:
    return any(
        line.lstrip("#").strip().lower() == title.lower()
        for line in page.read_text().splitlines()
        if line.startswith("#")
    )
