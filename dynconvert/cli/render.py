"""Rendering for the CLI: results on stdout (rich tables, or JSON), progress and notes on stderr.

The library never prints and never imports rich; everything a person reads goes through here.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

_CONSOLES: dict[str, Console] = {}


def out() -> Console:
    """The console for results (stdout; resolved at each write, so redirection is followed)."""
    return _CONSOLES.setdefault("out", Console(highlight=False))


def err() -> Console:
    """The console for progress, notes and warnings (stderr): one, so that lines printed while
    a spinner or progress bar is live go above it."""
    return _CONSOLES.setdefault("err", Console(stderr=True, highlight=False))


def print_json(obj: Any) -> None:
    """Write ``obj`` as indented JSON on stdout (inf and nan as null, number lists on one line)."""
    from dynconvert.runs import dumps

    sys.stdout.write(dumps(obj) + "\n")
    sys.stdout.flush()


def note(message: str) -> None:
    """A short status line on stderr."""
    err().print(message, markup=False)


def macs(n: float | int | None, compact: bool = False) -> str:
    """Human-readable MACs: ``118.62 G`` (``118.6G`` when compact)."""
    if n is None:
        return "-"
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}" if compact else f"{n / size:.2f} {unit}"
    return f"{n:.0f}" if compact else f"{n:.0f} "


def ratio(v: float | None, digits: int = 3) -> str:
    """A ratio with ``digits`` decimals (``0.512``); ``-`` for None."""
    return "-" if v is None else f"{v:.{digits}f}"


def duration(seconds: float | None) -> str:
    """Seconds rounded to ``m:ss`` or ``h:mm:ss``; ``-`` for None, inf or nan."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def table(title: str | None = None, *columns: str, **kwargs: Any) -> Table:
    """A table in the CLI's style; columns named ``"name>"`` are right-aligned."""
    t = Table(title=title, title_justify="left", header_style="bold", **kwargs)
    for i, c in enumerate(columns):
        t.add_column(
            c.rstrip(">"),
            justify="right" if c.endswith(">") else "left",
            overflow="fold",
            no_wrap=i == 0,
        )  # the first column holds names: never broken
    return t


def key_values(title: str, rows: list[tuple[str, Any]]) -> Table:
    """A two-column table of named values."""
    t = table(title, "", "", show_header=False)
    for k, v in rows:
        t.add_row(k, "-" if v is None else str(v))
    return t


class StepProgress:
    """Live calibration progress on stderr: a bar on a terminal, a line every ~5% otherwise."""

    def __init__(self, total: int, console: Console | None = None):
        self.console = console or err()
        self.total = total
        self.live = self.console.is_terminal
        self.every = max(1, total // 20)
        self.progress: Progress | None = None
        self.task: Any = None
        self.last_info: Any = None
        from dynconvert.calibration.progress import LinePacer

        self.pacer = LinePacer()  # micro-batch lines off a terminal: at most one a minute

    def __enter__(self) -> StepProgress:
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]calibrating[/bold]"), BarColumn(bar_width=16),
                MofNCompleteColumn(), TextColumn("{task.fields[info]}"), console=self.console,
                transient=False,
            )  # fmt: skip
            self.progress.start()
            self.task = self.progress.add_task("calibrate", total=self.total, info="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    @staticmethod
    def describe(info: Any) -> str:
        """One line: loss, FLOPs ratio -> its current target, speed, ETA."""
        speed = f"{info.steps_per_sec:.2f} it/s" if info.steps_per_sec else ""
        skipped = f" skipped: {info.skipped}" if info.skipped else ""
        return (
            f"loss {info.loss:.4f} flops {info.flops_ratio:.3f}->{info.lambda_target:.3f} "
            f"{speed} ETA {duration(info.eta_seconds)}{skipped}"
        )

    def micro_batch(self, info: Any) -> None:
        """A micro-batch of a step still accumulating (``MicroBatchInfo``): its pace on the bar,
        or a line (the run's first at once, then at most one a minute)."""
        from dynconvert.calibration.progress import micro_line, micro_text

        if self.progress is not None:
            self.progress.update(self.task, info=micro_text(info))
        elif self.pacer():
            self.console.print(micro_line(info), markup=False)

    def __call__(self, info: Any) -> None:
        """The ``on_step`` callback of calibration."""
        self.last_info = info
        if self.progress is not None:
            self.progress.update(
                self.task, completed=info.step, total=info.total_steps, info=self.describe(info)
            )
            if info.step >= info.total_steps:
                self.progress.stop()  # the stages after calibration print below the bar
        elif info.step % self.every == 0 or info.step == info.total_steps or info.step == 1:
            self.console.print(
                f"step {info.step}/{info.total_steps}  {self.describe(info)}", markup=False
            )
            self.pacer.mark()


def event_printer(console: Console | None = None):
    """An ``on_event(stage, message)`` callback printing finished stages on stderr."""
    console = console or err()
    started: dict[str, float] = {}

    def on_event(stage: str, message: str) -> None:
        if stage not in started:
            started[stage] = time.perf_counter()
        console.print(f"[dim]{stage:>9}[/dim]  {message}", highlight=False)

    return on_event


@contextmanager
def status(message: str) -> Iterator[None]:
    """A transient spinner on stderr while a slow step runs (nothing when not on a terminal)."""
    console = err()
    if console.is_terminal:
        with console.status(message):
            yield
    else:
        yield


@contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Silence what native code (the torch profiler's C++ side) writes to the stderr file
    descriptor, while Python's ``sys.stderr`` (progress, notes, warnings) still reaches it.

    The process's stderr descriptor points at the null device for the duration; ``sys.stderr``
    writes through a copy of the original descriptor. The library never touches descriptors:
    the bench command wraps its call with this. Nothing happens when stderr has no descriptor
    (a captured stream, as under ``typer.testing.CliRunner``).

    Example:
        >>> with native_stderr_silenced():
        ...     pass
    """
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stream: nothing to silence
        yield
        return
    python_stderr = sys.stderr
    python_stderr.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    kept = os.fdopen(saved, "w", buffering=1, encoding=python_stderr.encoding, closefd=False)
    try:
        os.dup2(devnull, fd)
        sys.stderr = kept
        yield
    finally:
        kept.flush()
        sys.stderr = python_stderr
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)
