"""The ``dynconvert`` command line (typer + rich): inspect, convert, sample, bench, recipes.

Example:
    >>> from typer.testing import CliRunner
    >>> from dynconvert.cli import app
    >>> CliRunner().invoke(app, ["recipes", "list", "--json"]).exit_code
    0
"""

from dynconvert.cli.app import app, main, make_app

__all__ = ["app", "main", "make_app"]
