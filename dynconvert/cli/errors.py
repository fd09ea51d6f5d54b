"""The one place where known errors become one line on stderr and exit code 1.

Known errors are dynconvert's own (:class:`~dynconvert.errors.DynconvertError`) and bad
command-line input (an unknown option, a value of the wrong type). Anything else is a bug and
keeps its traceback. ``DYNCONVERT_DEBUG=1`` prints the traceback of known errors too.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

import typer
from typer.core import TyperGroup

from dynconvert.errors import DynconvertError

DEBUG_VAR = "DYNCONVERT_DEBUG"
USAGE_ERROR: type[Exception] = next(
    (c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"), typer.BadParameter
)
"""Base class of typer's command-line errors (click's ``ClickException``, vendored by typer 0.29
as a subclass of ``typer.TyperException``), found from the public ``typer.BadParameter``."""
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def debug() -> bool:
    """Whether ``DYNCONVERT_DEBUG`` asks for tracebacks."""
    return os.environ.get(DEBUG_VAR, "").strip().lower() in ("1", "true", "yes", "on")


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


def fail(message: str, exc: BaseException | None = None) -> int:
    """Print ``Error: message`` as one line on stderr (with the traceback under debug)."""
    if exc is not None and debug():
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    sys.stderr.write(f"Error: {one_line(message)}\n")
    sys.stderr.flush()
    return EXIT_ERROR


def _usage_message(e: Exception) -> str:
    """The message of a command-line error, with where to find the valid options."""
    text = one_line(e.format_message())
    ctx = getattr(e, "ctx", None)
    path = getattr(ctx, "command_path", None)
    if path:
        text = f"{text.rstrip('.')}. See '{path} --help'."
    return text


class DynconvertGroup(TyperGroup):
    """The root command group: runs the app and turns known errors into one line + exit 1."""

    def main(  # type: ignore[override]
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        code: int = 0
        try:
            rv = super().main(
                args=args, prog_name=prog_name or "dynconvert", complete_var=complete_var,
                standalone_mode=False, **extra,
            )  # fmt: skip
            code = rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
            if not standalone_mode:
                return rv
        except DynconvertError as e:
            code = fail(str(e), e)
        except USAGE_ERROR as e:  # bad command-line input (typer's usage errors)
            if type(e).__name__ == "NoArgsIsHelpError":
                code = 0  # no arguments: the help was printed
            else:
                code = fail(_usage_message(e), e)
        except typer.Abort as e:
            code = fail("aborted", e)
        if not standalone_mode:
            return code
        sys.exit(code)
