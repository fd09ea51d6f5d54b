"""What ``calibrate`` shows of its progress by itself: a bar on a terminal, log lines elsewhere.

``calibrate`` hands every step to ``on_step`` (the CLI draws its own bar from it). Without a
callback it is not silent for minutes: ``CalibrationConfig.progress`` chooses

- ``"auto"`` (default): a tqdm bar on stderr when stderr is a terminal, else log lines;
- ``"bar"``: the bar, wherever stderr goes;
- ``"log"``: a line through ``logging`` every ``log_every`` steps (and at the first and last);
- ``"off"``: nothing (the CLI's choice: it draws its own bar).

Only the main process shows progress. The bar shows the step, loss, FLOPs ratio -> lambda, speed
and ETA; a log line says the same.

A step that accumulates gradients (``grad_accum_steps`` > 1) may take minutes (DiT-XL/2's
global batch of 256 on a CPU: 128 micro-batches), so its micro-batches are reported as they
finish (:class:`MicroBatchReport`): the bar shows the micro-batch and its pace, the log gets a
line after the run's first micro-batch and then at most one a minute, with the time per
micro-batch and the run's ETA at that pace; ``calibrate(on_micro_batch=...)`` gets each one.

Logging: the lines go to the logger ``"dynconvert.calibration"`` at level INFO. As transformers
and diffusers do for theirs, they are visible by default: when the program configured no
logging (no handler on the root logger, none on ``"dynconvert"``), the first line adds a stderr
handler to the ``"dynconvert"`` logger, sets it to INFO and stops its propagation (so a later
``logging.basicConfig`` does not print every line twice). A program that configures logging
first gets the lines through its own handlers, at the level it chose: enable them with
``logging.getLogger("dynconvert").setLevel(logging.INFO)``.

Example:
    >>> import logging
    >>> logging.getLogger("dynconvert").setLevel(logging.WARNING)  # silence the log lines
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from dynconvert.calibration.config import PROGRESS
from dynconvert.calibration.result import StepInfo
from dynconvert.errors import ConfigError

logger = logging.getLogger("dynconvert.calibration")
MICRO_BATCH_LOG_SECONDS = 60.0
"""At most one micro-batch line a minute in the log (the first one at once)."""


def default_log_every(steps: int) -> int:
    """Steps between two log lines when ``log_every`` is None: about 20 lines in a run, and at
    least one every 100 steps.

    Example:
        >>> default_log_every(30), default_log_every(1000), default_log_every(200_000)
        (1, 50, 100)
    """
    return min(100, max(1, steps // 20))


class _StderrHandler(logging.StreamHandler):
    """A stream handler writing to whatever ``sys.stderr`` is when a line is logged."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        """``sys.stderr`` now (a notebook or a test may have replaced it)."""
        return sys.stderr


def ensure_log_handler() -> logging.Handler | None:
    """Make the ``"dynconvert"`` logger's INFO lines visible when nobody configured logging.

    Returns:
        The stderr handler added, or None when logging was configured (a handler on the root
        logger or on ``"dynconvert"``) and nothing was changed.

    Example:
        >>> handler = ensure_log_handler()  # doctest: +SKIP
    """
    root = logging.getLogger("dynconvert")
    if root.handlers or logging.getLogger().handlers:
        return None
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    root.addHandler(handler)
    if root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    root.propagate = False  # a handler added to the root logger later would print it twice
    return handler


def duration(seconds: float | None) -> str:
    """An ETA as ``m:ss`` or ``h:mm:ss`` (the CLI's format); ``-`` when unknown.

    Example:
        >>> duration(42.3), duration(245), duration(7620), duration(float("inf"))
        ('0:42', '4:05', '2:07:00', '-')
    """
    if seconds is None or not math.isfinite(seconds):
        return "-"
    h, rest = divmod(int(round(seconds)), 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def describe(info: StepInfo) -> str:
    """The loss and the FLOPs ratio -> its target of one step, and why it was skipped if it was.

    Example:
        >>> describe(StepInfo(step=3, total_steps=10, loss=0.25, terms={}, flops_ratio=0.9,
        ...                   lambda_target=0.8, lr=1e-4, grad_norm=1.0, steps_per_sec=2.0,
        ...                   eta_seconds=3.5))
        'loss 0.2500 flops 0.900->0.800'
    """
    text = f"loss {info.loss:.4f} flops {info.flops_ratio:.3f}->{info.lambda_target:.3f}"
    return text + (f" skipped: {info.skipped}" if info.skipped else "")


def log_line(info: StepInfo) -> str:
    """One log line of a step: the words of the CLI's line, and the checkpoint written if any.

    Example:
        >>> log_line(StepInfo(step=3, total_steps=10, loss=0.25, terms={}, flops_ratio=0.9,
        ...                   lambda_target=0.8, lr=1e-4, grad_norm=1.0, steps_per_sec=2.0,
        ...                   eta_seconds=3.5))
        'step 3/10  loss 0.2500 flops 0.900->0.800 2.00 it/s ETA 0:04'
    """
    line = (
        f"step {info.step}/{info.total_steps}  {describe(info)} "
        f"{info.steps_per_sec:.2f} it/s ETA {duration(info.eta_seconds)}"
    )
    return line + (f" checkpoint {info.checkpoint}" if info.checkpoint else "")


class CalibrationProgress:
    """The progress a run shows on its own (see the module docstring), as a context manager.

    Args:
        mode: One of ``config.PROGRESS``; "auto" is resolved once, from ``stream``.
        total: The run's ``steps``.
        log_every: Steps between log lines (None: :func:`default_log_every`).
        stream: Where the bar goes (default: ``sys.stderr`` as it is now).

    Example:
        >>> with CalibrationProgress("off", total=10) as progress:  # doctest: +SKIP
        ...     progress.start(0, target=0.5)
        ...     progress(info)  # after every step
    """

    def __init__(
        self,
        mode: str,
        total: int,
        log_every: int | None = None,
        stream: TextIO | None = None,
    ) -> None:
        if mode not in PROGRESS:
            raise ConfigError(f"progress must be one of {', '.join(PROGRESS)}; got {mode!r}")
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if _is_terminal(self.stream) else "log"
        self.mode = mode
        self.total = total
        self.every = log_every or default_log_every(total)
        self.bar: Any = None  # the tqdm bar while it is shown
        self.pacer = LinePacer()

    def __enter__(self) -> CalibrationProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self, first: int, target: float, resumed_from: Path | None = None) -> None:
        """Announce the run: ``first`` steps are already done (a resumed run's checkpoint)."""
        if self.mode == "bar":
            from tqdm import tqdm

            width = _fixed_width(self.stream)
            self.bar = tqdm(
                total=self.total, initial=first, desc="calibrating", unit="step",
                file=self.stream, ncols=width, dynamic_ncols=width is None, leave=True,
            )  # fmt: skip
        elif self.mode == "log":
            ensure_log_handler()
            where = f", resumed from {resumed_from}" if resumed_from else ""
            if first >= self.total:
                logger.info("calibration: all %d steps done already%s", self.total, where)
            else:
                steps = f"steps {first + 1}..{self.total}" if first else f"{self.total} steps"
                logger.info("calibrating toward FLOPs ratio %g: %s%s", target, steps, where)

    def __call__(self, info: StepInfo) -> None:
        """Show one completed step (called on the main process after every step)."""
        if self.bar is not None:
            self.bar.set_postfix_str(describe(info), refresh=False)
            self.bar.update(info.step - self.bar.n)
        elif self.mode == "log" and (
            info.step % self.every == 0 or info.step in (1, info.total_steps) or info.checkpoint
        ):
            logger.info("%s", log_line(info))
            self.pacer.mark()

    def micro_batch(self, info: MicroBatchInfo) -> None:
        """Show a micro-batch of a step still accumulating (see the module docstring)."""
        if self.bar is not None:
            self.bar.set_postfix_str(micro_text(info))
        elif self.mode == "log" and self.pacer():
            logger.info("%s", micro_line(info))

    def close(self) -> None:
        """Close the bar (idempotent): what follows prints below it."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _fixed_width(stream: Any) -> int | None:
    """None (tqdm follows the terminal's width), or 100 columns for a terminal that reports a
    width of 0 (a pseudo-terminal without a size), on which tqdm would draw nothing."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):  # no descriptor (io.UnsupportedOperation)
        return None
    return None if columns > 0 else 100


@dataclass(frozen=True)
class MicroBatchInfo:
    """A micro-batch done while its step accumulates gradients (``grad_accum_steps`` > 1).

    Attributes:
        step: The step it belongs to, counted from 1 (``StepInfo.step`` once the step is done).
        total_steps: The run's steps.
        done: Micro-batches of this step done, counting this one.
        parts: Micro-batches per step (``grad_accum_steps``).
        seconds_each: Mean wall-clock seconds per micro-batch in this call so far.
        eta_seconds: Seconds to the end of the run at that pace.
    """

    step: int
    total_steps: int
    done: int
    parts: int
    seconds_each: float
    eta_seconds: float


def micro_text(info: MicroBatchInfo) -> str:
    """The micro-batch, its pace and the run's ETA (the bar's text).

    Example:
        >>> micro_text(MicroBatchInfo(1, 10, 2, 64, 13.04, 8300.0))
        'micro-batch 2/64 13.0 s each (13:55 a step) ETA 2:18:20'
    """
    per_step = duration(info.seconds_each * info.parts)
    return (
        f"micro-batch {info.done}/{info.parts} {info.seconds_each:.1f} s each "
        f"({per_step} a step) ETA {duration(info.eta_seconds)}"
    )


def micro_line(info: MicroBatchInfo) -> str:
    """One log line of a micro-batch: the step it belongs to, then :func:`micro_text`.

    Example:
        >>> micro_line(MicroBatchInfo(1, 10, 2, 64, 13.04, 8300.0))
        'step 1/10  micro-batch 2/64 13.0 s each (13:55 a step) ETA 2:18:20'
    """
    return f"step {info.step}/{info.total_steps}  {micro_text(info)}"


class LinePacer:
    """Whether a progress line is due: the first at once, then one per ``seconds`` at most.

    Example:
        >>> pacer = LinePacer(60.0)
        >>> pacer(), pacer()
        (True, False)
    """

    def __init__(self, seconds: float = MICRO_BATCH_LOG_SECONDS) -> None:
        self.seconds = seconds
        self.last: float | None = None

    def mark(self) -> None:
        """A line was written now (a step's line counts too)."""
        self.last = time.monotonic()

    def __call__(self) -> bool:
        """True (and marked) when a line is due."""
        if self.last is not None and time.monotonic() - self.last < self.seconds:
            return False
        self.mark()
        return True


class MicroBatchReport:
    """Turns each finished micro-batch into a :class:`MicroBatchInfo` for the run's progress
    and ``on_micro_batch``; the pace is measured from this call's first step.

    Args:
        total: The run's steps.
        parts: ``grad_accum_steps`` (1: nothing is reported; a step is one micro-batch).
        progress: The run's :class:`CalibrationProgress`.
        on_micro_batch: Also called with each one (main process only), or None.

    Example:
        >>> report = MicroBatchReport(10, 1, CalibrationProgress("off", 10))
        >>> report.at(0) is None
        True
    """

    def __init__(
        self,
        total: int,
        parts: int,
        progress: CalibrationProgress,
        on_micro_batch: Callable[[MicroBatchInfo], None] | None = None,
    ) -> None:
        self.total, self.parts = total, parts
        self.progress, self.on_micro_batch = progress, on_micro_batch
        self.t0: float | None = None
        self.count = 0

    def at(self, step: int) -> Callable[[int], None] | None:
        """The callback for step ``step`` (0-based) that ``forward_backward`` calls with the
        micro-batches done, or None without accumulation."""
        if self.parts < 2:
            return None
        if self.t0 is None:  # the first step of this call starts now
            self.t0 = time.perf_counter()
        return lambda done: self._report(step, done)

    def _report(self, step: int, done: int) -> None:
        self.count += 1
        each = (time.perf_counter() - self.t0) / self.count
        left = ((self.total - step) * self.parts - done) * each
        info = MicroBatchInfo(step + 1, self.total, done, self.parts, each, left)
        self.progress.micro_batch(info)
        if self.on_micro_batch is not None:
            self.on_micro_batch(info)
