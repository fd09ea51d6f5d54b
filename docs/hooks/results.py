"""mkdocs hook: serve the repository's benchmarks/results/ under results/ on the site.

The figures and raw results stay in one place, where the benchmark scripts write them; pages
link to ``results/<file>``.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files, InclusionLevel

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
SERVED = (".png", ".json", ".txt", ".md")


def on_files(files: Files, config) -> Files:
    """Add every result file to the site as ``results/<name>`` (outside the nav)."""
    for path in sorted(RESULTS.iterdir()):
        if path.suffix in SERVED:
            files.append(
                File.generated(
                    config,
                    f"results/{path.name}",
                    abs_src_path=str(path),
                    inclusion=InclusionLevel.NOT_IN_NAV,
                )
            )
    return files
