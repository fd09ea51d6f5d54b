"""The ``dynconvert`` command: one app factory, every command registered in one place."""

from __future__ import annotations

from typing import Annotated

import typer

from dynconvert.cli.errors import known_errors

HELP = """Convert pretrained diffusion transformers into dynamic-compute models and calibrate them
toward a FLOPs budget (timestep-wise dynamic width, spatial-wise dynamic tokens).

[bold]Examples[/bold]

  dynconvert convert --model digits --target-flops 0.5

  dynconvert inspect --model dit-xl

  dynconvert sample --run runs/digits-0.5 --out grid.png --compare

Errors are one line on stderr with exit code 1 (set DYNCONVERT_DEBUG=1 for tracebacks); a bad
option prints the usage with exit code 2; Ctrl-C exits with code 130.
"""


def _version(value: bool) -> None:
    if value:
        from dynconvert import __version__

        typer.echo(f"dynconvert {__version__}")
        raise typer.Exit()


def make_app() -> typer.Typer:
    """Build the ``dynconvert`` Typer app (inspect, convert, sample, bench, export, recipes).

    Example:
        >>> from typer.testing import CliRunner
        >>> CliRunner().invoke(make_app(), ["--version"]).output.startswith("dynconvert ")
        True
    """
    from dynconvert.cli import (
        commands_bench,
        commands_convert,
        commands_export,
        commands_inspect,
        commands_recipes,
        commands_sample,
    )

    app = typer.Typer(
        name="dynconvert",
        help=HELP,
        rich_markup_mode="rich",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @app.callback()
    def root(
        version: Annotated[
            bool,
            typer.Option(
                "--version", help="Print the version and exit.", callback=_version, is_eager=True
            ),
        ] = False,
    ) -> None:
        """Convert diffusion transformers into dynamic-compute models."""

    app.command("inspect", epilog=commands_inspect.SCHEMA)(known_errors(commands_inspect.inspect))
    app.command("convert", epilog=commands_convert.REPORT_KEYS)(
        known_errors(commands_convert.convert)
    )
    app.command("sample")(known_errors(commands_sample.sample))
    app.command("bench", epilog=commands_bench.SCHEMA)(known_errors(commands_bench.bench))
    app.command("export", epilog=commands_export.SCHEMA)(known_errors(commands_export.export))
    app.add_typer(commands_recipes.make_recipes_app(), name="recipes")
    return app


app = make_app()


def main() -> None:
    """Console-script entry point (``dynconvert`` and ``python -m dynconvert``)."""
    app(prog_name="dynconvert")
