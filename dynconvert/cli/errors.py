"""The one place where dynconvert's errors become one line on stderr and exit code 1.

Every command body runs under :func:`known_errors` (applied in :func:`dynconvert.cli.app.make_app`):

* a :class:`~dynconvert.errors.DynconvertError` prints ``Error: <message>`` as exactly one line
  on stderr and exits with code 1; ``DYNCONVERT_DEBUG=1`` prints its traceback first;
* ``Ctrl-C`` (``KeyboardInterrupt``) prints ``Interrupted.`` and exits with code 130;
* anything else is a bug and keeps its traceback.

Bad command-line input (an unknown option, a value of the wrong type) never reaches a command
body: typer reports it itself, with the usage line, and exits with code 2. Only typer's public
API is used (``typer.Exit``); there is no custom command class.

Setting names: library messages are written for Python users and name a setting by its Python
or recipe name between single backquotes. Before printing, :func:`cli_message` rewrites each
backquoted name found in :data:`FLAGS` (the command line's one table of flags) into its flag::

    `checkpoint`          ->  --checkpoint
    `random_init=True`    ->  --random-init     (a switch)
    `device="cpu"`        ->  --device cpu      (name=value: the flag, then the value unquoted)

Backquoted text not in the table (`dynconvert.write_latents`) is left as it is. A library
message that names a new setting needs a row in :data:`FLAGS`, nothing else.

Example:
    >>> cli_message("pass `checkpoint` or `random_init=True`; drop `resume=True`")
    'pass --checkpoint or --random-init; drop --resume'
"""

from __future__ import annotations

import functools
import os
import re
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from dynconvert.errors import DynconvertError

DEBUG_VAR = "DYNCONVERT_DEBUG"
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
_MAX_MESSAGE = 2000
"""A last guard: messages are cut where they are built, and never print past this."""

FLAGS: dict[str, str] = {
    # dynconvert convert (dynconvert.runs.RunRequest and recipe fields)
    "model": "--model",
    "recipe": "--recipe",
    "target_flops": "--target-flops",
    "checkpoint": "--checkpoint",
    "data": "--data",
    "steps": "--steps",
    "calibration.steps": "--steps",
    "out": "--out",
    "output_dir": "--out",
    "resume": "--resume",
    "force": "--force",
    "random_init": "--random-init",
    "overrides": "--set",
    "device": "--device",
    # dynconvert export (dynconvert.export's arguments)
    "format": "--format",
    "timesteps": "--timesteps",
    "batch": "--batch",
    "overwrite": "--overwrite",
    # dynconvert sample and bench
    "vae": "--vae",
    "raw": "--raw",
    "dtype": "--dtype",
}
"""Python / recipe setting name -> command-line flag: the one mapping the CLI's messages use."""

_SETTING = re.compile(r"`([A-Za-z_][\w.]*)(?:=([^`]*))?`")
_QUOTES = "\"'"
_F = TypeVar("_F", bound=Callable[..., Any])


def cli_message(message: str) -> str:
    """A library message with its backquoted setting names turned into command-line flags.

    A backquoted name becomes its flag; ``name=True`` between backquotes the bare flag (a
    switch); ``name=value`` the flag followed by the value without quotes. Names not in
    :data:`FLAGS` keep their backquotes.

    Example:
        >>> cli_message('`target_flops` must be in (0, 1]; use `device="cpu"`')
        '--target-flops must be in (0, 1]; use --device cpu'
    """

    def flag(m: re.Match[str]) -> str:
        name, value = m.group(1), m.group(2)
        if name not in FLAGS:
            return m.group(0)
        if value is None or value == "True":
            return FLAGS[name]
        return f"{FLAGS[name]} {value.strip().strip(_QUOTES)}"

    return _SETTING.sub(flag, message)


def debug() -> bool:
    """Whether ``DYNCONVERT_DEBUG`` asks for tracebacks.

    Example:
        >>> isinstance(debug(), bool)
        True
    """
    return os.environ.get(DEBUG_VAR, "").strip().lower() in ("1", "true", "yes", "on")


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space.

    Example:
        >>> one_line("no such file\\n  check the path")
        'no such file check the path'
    """
    return " ".join(str(text).split())


def fail(message: str, exc: BaseException | None = None) -> typer.Exit:
    """Print ``Error: message`` as one line on stderr (the traceback first under debug).

    Returns:
        The ``typer.Exit(1)`` for the caller to raise.

    Example:
        >>> raise fail("no such run folder")  # doctest: +SKIP
    """
    if exc is not None and debug():
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    text = one_line(cli_message(message[:_MAX_MESSAGE]))
    line = f"Error: {text}{'...' if len(message) > _MAX_MESSAGE else ''}\n"
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"  # bytes a file held print escaped
    sys.stderr.write(line.encode(encoding, "backslashreplace").decode(encoding))
    sys.stderr.flush()
    return typer.Exit(EXIT_ERROR)


def known_errors(command: _F) -> _F:
    """Wrap a command so that dynconvert's errors end it with one line and exit code 1.

    The wrapper keeps the command's signature (``functools.wraps``), so typer reads its options
    as before.

    Example:
        >>> app = typer.Typer()
        >>> @app.command()
        ... @known_errors
        ... def hello(name: str) -> None:
        ...     typer.echo(f"hello {name}")
    """

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except DynconvertError as e:
            raise fail(str(e), e) from None
        except KeyboardInterrupt:
            sys.stderr.write("Interrupted.\n")
            sys.stderr.flush()
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return run  # type: ignore[return-value]
