"""The run folder's lock: one writer at a time, held with an OS file lock for the whole run.

``<run>/.dynconvert.lock`` is locked with ``fcntl.flock`` (exclusive, non-blocking) and holds the
holder's PID. The OS drops the lock when the process ends in any way (``kill -9`` included), so
a lock is never stale; a second writer is refused at once and told the holder's PID. The file
is removed on release, while still locked, and a taker checks that the file it locked is still
the one at that path (else it tries again), so a lock removed in between is never held twice.
The lock file is created with ``O_EXCL`` and opened with ``O_NOFOLLOW``: a link (or a hard link
to another file, or anything but a plain file) planted under its name is refused, never
truncated or written through.

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
import stat
from pathlib import Path
from types import TracebackType

from dynconvert.errors import FileError, OutputExistsError
from dynconvert.io.files import file_error, link_error

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
        fd = _open(path, os.O_RDONLY)
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


def _open(path: Path, flags: int) -> int:
    """Open the lock file without following a link; refuse anything but a plain file of one
    name (a hard link's other name would be truncated with it)."""
    flags |= os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EEXIST):
            raise
        raise (
            link_error(path) if e.errno == errno.ELOOP else file_error(e, path, "lock")
        ) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        raise FileError(
            errno.EINVAL,
            f"{path} is not a plain file of its own (a folder, a device, or a hard link to "
            "another file); remove it, it is only dynconvert's lock",
        )
    return fd


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
            try:
                fd = _open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
            except FileExistsError:  # left by a run that ended, or held: lock it as it is
                try:
                    fd = _open(self.path, os.O_RDWR)
                except FileNotFoundError:
                    continue  # removed in between: create it again
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                pid = _read_pid(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise OutputExistsError(_busy(self.folder, pid or 0)) from None
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed the file as we opened it: take the new one
                os.close(fd)
                continue
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError as e:  # a full disk: the lock is held all the same, without a PID
                if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    os.close(fd)
                    raise file_error(e, self.path, "lock") from None
            self.fd = fd
            return self
        raise OutputExistsError(_busy(self.folder, 0))

    def release(self) -> None:
        """Remove the lock file and drop the lock (removed first: no one locks a dying file)."""
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass  # gone, or the folder became read-only: the OS drops the lock all the same
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
