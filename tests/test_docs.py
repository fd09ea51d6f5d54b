"""The documentation site builds with no warning: ``mkdocs build --strict`` (mkdocs.yml).

Strict mode fails on a page in the nav that does not exist, a page left out of the nav, and a
link or an anchor between pages that does not resolve.
"""

import os
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
