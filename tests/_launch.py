"""Start a two-process run on CPU (gloo) for the distributed calibration tests: one helper for
``torchrun`` (test_calibrate_ddp.py) and ``accelerate launch`` (test_calibrate_fsdp.py).

Example:
    >>> launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
    >>> proc = run_two(launcher, "--master_port", "train.py", ["out"])  # doctest: +SKIP
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nobody listens on now, for the rendezvous of the two processes."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two(
    launcher: list[str], port_flag: str, script: Path | str, args: list[str], timeout: int
) -> subprocess.CompletedProcess:
    """``python LAUNCHER PORT_FLAG <free port> SCRIPT ARGS...`` with this checkout importable
    and one thread per process (two processes share the 2-core machine)."""
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, *launcher, port_flag, str(free_port()), str(script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
