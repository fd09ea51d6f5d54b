"""What calibrate shows by itself: a bar on a terminal, log lines elsewhere, nothing when off or
when the CLI draws its own; the "dynconvert" logger is visible when nobody configured logging."""

from __future__ import annotations

import io
import logging
import os
import sys
from contextlib import contextmanager

import pytest
import torch

import dynconvert
from dynconvert.calibration import CalibrationConfig, calibrate
from dynconvert.calibration.progress import CalibrationProgress, ensure_log_handler
from dynconvert.errors import ConfigError
from dynconvert.testing import tiny_dit

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeTerminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def run(steps: int = 3, **overrides):
    model = dynconvert.convert(tiny_dit(seed=0), budget=0.5)
    g = torch.Generator().manual_seed(0)
    data = {
        "x": torch.randn(16, 4, 8, 8, generator=g),
        "y": torch.randint(0, 10, (16,), generator=g),
    }
    cfg = CalibrationConfig(
        target=0.5, steps=steps, batch_size=4, lambda_hold_steps=0, warmup_steps=0,
        capacity_points=0, **overrides,
    )  # fmt: skip
    infos = []
    calibrate(model, data, cfg, on_step=infos.append)
    return infos


def progress_records(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("dynconvert")]


def test_a_terminal_gets_a_bar_and_no_log_lines(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="dynconvert")
    err = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", err)
    infos = run(steps=3)
    text = err.getvalue()
    assert "calibrating" in text and "3/3" in text and "step/s" in text
    last = infos[-1]
    assert f"loss {last.loss:.4f} flops {last.flops_ratio:.3f}->0.500" in text
    assert progress_records(caplog) == []


def test_piped_stderr_gets_a_log_line_every_n_steps(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="dynconvert")
    err = io.StringIO()  # a pipe or a log file: not a terminal
    monkeypatch.setattr(sys, "stderr", err)
    infos = run(steps=5, log_every=2)
    lines = progress_records(caplog)
    assert lines[0] == "calibrating toward FLOPs ratio 0.5: 5 steps"
    assert [line.split()[1] for line in lines[1:]] == ["1/5", "2/5", "4/5", "5/5"]
    assert (
        lines[3].startswith(f"step 4/5  loss {infos[3].loss:.4f} flops ")
        and " it/s ETA " in lines[3]
    )
    assert err.getvalue() == ""  # no bar; the lines go through logging only
    assert {r.levelno for r in caplog.records if r.name.startswith("dynconvert")} == {logging.INFO}


def test_off_shows_nothing_and_bar_is_forced(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="dynconvert")
    err = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", err)
    assert len(run(steps=2, progress="off")) == 2  # on_step still gets every step
    assert err.getvalue() == "" and progress_records(caplog) == []
    piped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", piped)
    run(steps=2, progress="bar")
    assert "2/2" in piped.getvalue() and progress_records(caplog) == []


def test_a_resumed_run_starts_its_bar_and_log_at_the_checkpoint(tmp_path):
    bar = FakeTerminal()
    progress = CalibrationProgress("auto", total=10, stream=bar)
    assert progress.mode == "bar"
    with progress:
        progress.start(6, target=0.5, resumed_from=tmp_path / "step-0000006.pt")
    assert "6/10" in bar.getvalue() and progress.bar is None  # closed on exit
    assert CalibrationProgress("auto", total=10, stream=io.StringIO()).mode == "log"


def test_settings_are_checked_and_may_change_on_resume():
    with pytest.raises(ConfigError, match="progress must be one of auto, bar, log, off"):
        CalibrationConfig(target=0.5, progress="tqdm")
    with pytest.raises(ConfigError, match="log_every"):
        CalibrationConfig(target=0.5, log_every=0)
    saved = CalibrationConfig(target=0.5, progress="bar").to_dict()
    assert CalibrationConfig(target=0.5, progress="off", log_every=7).resume_mismatch(saved) == []


@contextmanager
def logging_configured(*handlers: logging.Handler):
    """Logging as a program sees it that configured only ``handlers`` on the root logger (none:
    no logging configured); pytest's own handlers are hidden inside and put back after."""
    root, lib = logging.getLogger(), logging.getLogger("dynconvert")
    saved = root.handlers, lib.handlers, lib.level, lib.propagate
    root.handlers, lib.handlers = list(handlers), []
    try:
        yield lib
    finally:
        root.handlers, lib.handlers = saved[0], saved[1]
        lib.setLevel(saved[2])
        lib.propagate = saved[3]


def test_log_lines_are_visible_when_nobody_configured_logging(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with logging_configured() as lib:
        handler = ensure_log_handler()
        assert handler is not None and lib.handlers == [handler]
        assert ensure_log_handler() is None  # once only
        logging.getLogger("dynconvert.calibration").info("step %d/%d", 1, 5)
        assert lib.level == logging.INFO and not lib.propagate
    assert err.getvalue() == "dynconvert.calibration: step 1/5\n"


def test_configured_logging_is_left_alone():
    with logging_configured(logging.NullHandler()) as lib:
        assert ensure_log_handler() is None
        assert lib.handlers == [] and lib.propagate


QUICK_RUN = [
    "calibration.batch_size=4", "report.profile_timesteps=2", "report.profile_batch=4",
    "report.executed_timesteps=1", "report.bench=false", "samples.grid=false", "cpu_threads=1",
]  # fmt: skip


def test_a_run_with_its_own_on_step_shows_one_progress(tmp_path, monkeypatch, caplog):
    # The CLI passes on_step (its own bar) through runs: calibrate's progress stays off.
    from dynconvert.runs import RunRequest, convert_run

    caplog.set_level(logging.INFO, logger="dynconvert")
    err = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", err)
    infos = []
    request = RunRequest(
        model="dit-tiny", target_flops=0.5, data="synthetic", steps=2, random_init=True,
        device="cpu", out=str(tmp_path / "run"), overrides=QUICK_RUN,
    )  # fmt: skip
    convert_run(request, on_step=infos.append)
    assert [i.step for i in infos] == [1, 2]
    assert "calibrating" not in err.getvalue()
    assert not [m for m in progress_records(caplog) if m.startswith(("step ", "calibrating"))]


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_a_terminal_without_a_size_still_gets_a_bar():
    import fcntl
    import struct
    import termios

    from dynconvert.calibration.progress import _fixed_width

    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        for columns, width in ((0, 100), (90, None)):  # tqdm draws nothing at width 0
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
            assert _fixed_width(tty) == width
        progress = CalibrationProgress("auto", total=4, stream=tty)
        assert progress.mode == "bar"
    os.close(master)
