"""The run folder's lock: one writer at a time, held with an OS file lock for the whole run.

``<run>/.dynconvert.lock`` is locked with ``fcntl.flock`` (exclusive, non-blocking) and holds the
holder's PID. The OS drops the lock when the process ends in any way (``kill -9`` included), so
a lock is never stale; a second writer is refused at once and told the holder's PID. The file
is removed on release, while still locked, and a taker checks that the file it locked is still
the one at that path (else it tries again), so a lock removed in between is never held twice.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> with RunLock(folder):
    ...     holder(folder) == os.getpid()
    True
    >>> holder(folder) is None
    True
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from types import TracebackType

from dynconvert.errors import OutputExistsError

LOCK_FILE = ".dynconvert.lock"


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text.isdigit() else None
    except (OSError, UnicodeDecodeError):
        return None


def holder(folder: str | os.PathLike) -> int | None:
    """The PID of the process that holds the folder's lock, or None when it is free.

    A holder whose PID is not written yet reads as 0.
    """
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        return _read_pid(fd) or 0
    finally:
        os.close(fd)  # closing drops a lock taken here
    return None


def refuse_if_locked(folder: str | os.PathLike) -> None:
    """Raise when another process holds the folder's lock (a check; takes no lock).

    Raises:
        OutputExistsError: The message names the holder's PID.
    """
    pid = holder(folder)
    if pid is not None:
        raise OutputExistsError(_busy(Path(folder), pid))


def _busy(folder: Path, pid: int) -> str:
    who = f"PID {pid}" if pid else "a process that is starting"
    return (
        f"{folder} is in use by another dynconvert run ({who}); wait for it to end, or choose "
        "another `out`"
    )


class RunLock:
    """An exclusive lock on a run folder, for a ``with`` block (the folder must exist).

    Raises:
        OutputExistsError: On entry, when another process holds it (its PID in the message).
    """

    def __init__(self, folder: str | os.PathLike):
        """Lock ``folder`` (taken on entering the ``with`` block)."""
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise at once when another process holds it."""
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                pid = _read_pid(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise OutputExistsError(_busy(self.folder, pid or 0)) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed the file as we opened it: take the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self.fd = fd
            return self
        raise OutputExistsError(_busy(self.folder, 0))

    def release(self) -> None:
        """Remove the lock file and drop the lock (removed first: no one locks a dying file)."""
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        """Take the lock."""
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Drop the lock, however the block ended."""
        self.release()
