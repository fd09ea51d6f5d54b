"""Every file dynconvert reads or writes in a folder goes through here (one safe-open helper).

- **No link is followed below the folder.** A file is opened relative to a descriptor of its
  folder, each part of the path below that folder (``root``) with ``O_NOFOLLOW``: a link there
  (``checkpoints`` pointing elsewhere, a weights file linked out of the folder, a planted
  ``.dynconvert.lock``) is refused with a :class:`~dynconvert.errors.FileError`, never followed.
  The folder the caller names may itself be a link (``runs/latest``): that is the caller's
  choice. Only regular files are read (a pipe or a device is refused at once, never waited on).
- **Written whole or not at all.** A write goes to a new temporary file in the same folder
  (``O_CREAT | O_EXCL | O_NOFOLLOW``), is flushed to disk, then renamed over the final name; a
  rename replaces a link instead of writing through it, and leaves a hard-linked file as it
  was. A failed write (no space, a read-only folder) removes its temporary file and raises a
  ``FileError`` that names the fix: the old file is untouched.
- **Nothing is removed outside the folder**: an entry is unlinked relative to its folder's
  descriptor, and unlinking never follows a link.

Tests kill a writer at each file operation through :data:`fault_hook` (called before each).

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> atomic_write_bytes(folder / "note.txt", b"hello")
    >>> read_bytes(folder / "note.txt", limit=10, root=folder)
    b'hello'
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from dynconvert.errors import DynconvertError, FileError

fault_hook: Callable[[str, Path], None] | None = None
"""Called as ``fault_hook(operation, path)`` before each file operation of a write ("create",
"write", "fsync", "rename", "remove"); tests raise from it to stop a writer at that point."""

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def fault_point(operation: str, path: Path) -> None:
    """Give :data:`fault_hook` its chance before a file operation (tests stop writers here)."""
    if fault_hook is not None:
        fault_hook(operation, path)


def file_error(e: OSError, path: Path, action: str = "write") -> FileError:
    """The one-line error of a failed file operation, naming the fix.

    Example:
        >>> str(file_error(OSError(errno.ENOSPC, "No space left on device"), Path("out/x")))
        'cannot write out/x: no space left on the device (or past the file size limit); free...'
    """
    reason = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = "no space left on the device (or past the file size limit); free space or write "
        fix += "elsewhere (nothing was half written)"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = f"{reason}: the folder is read-only or not yours; make it writable or write elsewhere"
    elif e.errno == errno.ELOOP:
        return link_error(path)
    elif e.errno == errno.ENOTDIR:
        fix = "a part of the path is a file or a link, not a folder; choose another path"
    elif e.errno == errno.EISDIR:
        fix = "it is a folder; choose a file name"
    else:
        fix = f"{reason}; check the path"
    return FileError(e.errno or 0, f"cannot {action} {path}: {fix}")


def link_error(path: Path) -> FileError:
    """The error for a link met inside a folder dynconvert reads or writes."""
    return FileError(
        errno.ELOOP,
        f"{path} is a symbolic link (or lies under one); dynconvert follows no link inside a "
        "folder it reads or writes: replace the link with the file or folder itself",
    )


def is_link(path: str | os.PathLike) -> bool:
    """Whether ``path`` itself is a symbolic link (it is not followed), e.g. ``is_link(".")``."""
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def _walk(folder: Path, root: Path | None, create: bool = False) -> int:
    """A descriptor of ``folder``: ``root`` opened as named, every part below it without
    following a link (created when ``create``)."""
    if root is None:
        if create:
            _mkdir(folder)
        return os.open(folder, _DIR)
    try:
        parts = folder.relative_to(root).parts
    except ValueError:
        raise FileError(errno.EINVAL, f"{folder} is not inside {root}") from None
    if create:
        _mkdir(root)
    fd = os.open(root, _DIR)
    here = root
    for part in parts:
        here = here / part
        try:
            if create:
                try:
                    os.mkdir(part, dir_fd=fd)
                except FileExistsError:
                    pass
            new = os.open(part, _DIR | os.O_NOFOLLOW, dir_fd=fd)
        except OSError as e:
            raise (link_error(here) if is_link(here) else file_error(e, here, "open")) from None
        finally:
            os.close(fd)
        fd = new
    return fd


def _mkdir(folder: Path) -> None:
    """Create ``folder`` and its parents; refuse a file or a dangling link in its place."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        what = "a link to a missing folder" if is_link(folder) else "a file, not a folder"
        raise FileError(errno.EEXIST, f"{folder} is {what}; pass a folder") from None
    except OSError as e:
        raise file_error(e, folder, "create") from None


@contextmanager
def folder_fd(folder: Path, root: Path | None = None, create: bool = False) -> Iterator[int]:
    """A descriptor of ``folder`` for ``dir_fd`` calls (parts below ``root``: no link).

    Example:
        >>> with folder_fd(Path(".")) as fd:
        ...     isinstance(fd, int)
        True
    """
    try:
        fd = _walk(Path(folder), None if root is None else Path(root), create)
    except FileNotFoundError:
        raise FileError(errno.ENOENT, f"{folder} does not exist") from None
    except DynconvertError:
        raise
    except OSError as e:
        raise file_error(e, Path(folder), "open") from None
    try:
        yield fd
    finally:
        os.close(fd)


def open_file(
    path: str | os.PathLike, root: str | os.PathLike | None = None, follow: bool = False
) -> int:
    """A read-only descriptor of the regular file ``path``, no link followed (see the module);
    ``follow``: a file the user names (a recipe), which may be a link.

    Raises:
        FileError: The file is missing, a link, under a link below ``root``, or not a regular
            file (a folder, a pipe, a device: refused at once, not waited on).

    Example:
        >>> fd = open_file(__file__); os.close(fd)
    """
    path = Path(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | (os.O_CLOEXEC if follow else _NOFOLLOW)
    with folder_fd(path.parent, None if root is None else Path(root)) as dfd:
        try:
            fd = os.open(path.name, flags, dir_fd=dfd)
        except FileNotFoundError:
            raise FileError(errno.ENOENT, f"{path} does not exist") from None
        except OSError as e:
            raise (link_error(path) if is_link(path) else file_error(e, path, "read")) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FileError(errno.EINVAL, f"{path} is not a regular file (a folder, pipe or device)")
    return fd


def fd_path(fd: int, fallback: Path) -> str:
    """A path that opens the very file behind ``fd`` (``/proc/self/fd/N``; else ``fallback``),
    for libraries that take a file name (safetensors, ``torch.load(mmap=True)``)."""
    for base in ("/proc/self/fd", "/dev/fd"):
        if os.path.isdir(base):
            return f"{base}/{fd}"
    return str(fallback)


def read_bytes(
    path: str | os.PathLike,
    limit: int,
    root: str | os.PathLike | None = None,
    error: type[DynconvertError] = FileError,
    follow: bool = False,
) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (checked before reading);
    ``root`` and ``follow`` as for :func:`open_file`.

    Raises:
        error: The file is missing, a link, not a regular file, or larger than ``limit``.

    Example:
        >>> len(read_bytes(__file__, 10**6)) > 0
        True
    """
    path = Path(path)
    try:
        fd = open_file(path, root, follow)
    except FileError as e:
        raise (e if error is FileError else error(str(e))) from None
    try:
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size  # refused before reading when too large
            data = f.read(limit + 1) if size <= limit else b""
    except OSError as e:
        raise error(str(file_error(e, path, "read"))) from None
    if size > limit or len(data) > limit:
        raise error(
            f"{path} is larger than {limit} bytes, more than such a file may be; it is not one "
            "dynconvert wrote, or it is corrupt"
        )
    return data


def sha256_of(fd: int) -> str:
    """sha256 of the whole file behind ``fd`` (read with ``pread``: its offset is kept).

    Example:
        >>> fd = open_file(__file__); len(sha256_of(fd)); os.close(fd)
        64
    """
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, 1 << 22, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


def file_digest(path: str | os.PathLike, root: str | os.PathLike | None = None) -> tuple[int, str]:
    """Size and sha256 of a whole regular file (no link followed).

    Example:
        >>> size, digest = file_digest(__file__)
    """
    fd = open_file(path, root)
    try:
        return os.fstat(fd).st_size, sha256_of(fd)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs (this one counts), e.g. ``pid_alive(os.getpid())``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid > 0
    return True


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[BinaryIO], object],
    root: str | os.PathLike | None = None,
) -> Path:
    """Write ``path`` whole or not at all (the module's rules); ``write(file)`` fills the new
    file.

    Raises:
        FileError: The folder is a file, a link below ``root``, read-only, or the disk is full
            (also when ``write`` turned the failed write into another error, as torch.save
            does); the old file (if any) is unchanged and no temporary file is left.

    Example:
        >>> import tempfile
        >>> p = atomic_write(Path(tempfile.mkdtemp()) / "a.bin", lambda f: f.write(b"1"))
    """
    path = Path(path)
    tmp = f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    with folder_fd(path.parent, None if root is None else Path(root), create=True) as dfd:
        watched = None
        try:
            fault_point("create", path)
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666, dir_fd=dfd)
            with os.fdopen(fd, "wb") as f:
                fault_point("write", path)
                watched = _Watched(f)
                write(watched)  # type: ignore[arg-type]
                f.flush()
                fault_point("fsync", path)
                os.fsync(f.fileno())
            fault_point("rename", path)
            os.replace(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
            os.fsync(dfd)  # the rename itself on disk
        except BaseException as e:
            _remove_quietly(tmp, dfd, path.parent)
            cause = e if isinstance(e, OSError) else getattr(watched, "error", None)
            if isinstance(cause, OSError) and not isinstance(cause, DynconvertError):
                raise file_error(cause, path) from None
            raise
    return path


class _Watched:
    """A file whose first failed write is kept: a writer (torch.save) may turn it into
    another error, and the cause (no space, read-only) is what the user must see."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str) -> object:
        return getattr(self._f, name)


def _remove_quietly(name: str, dfd: int, folder: Path) -> None:
    fault_point("remove", folder / name)
    try:
        os.unlink(name, dir_fd=dfd)
    except OSError:
        pass  # not created, or the folder went read-only: a stale temp file the next run removes


def atomic_write_bytes(
    path: str | os.PathLike, data: bytes, root: str | os.PathLike | None = None
) -> None:
    """Write ``data`` to ``path`` whole or not at all (:func:`atomic_write`).

    Example:
        >>> atomic_write_bytes(Path("/tmp/note.txt"), b"hello")  # doctest: +SKIP
    """
    atomic_write(path, lambda f: f.write(data), root)


def remove_file(path: str | os.PathLike, root: str | os.PathLike | None = None) -> bool:
    """Remove the entry ``path`` (a link is removed itself, never what it points to); the
    parts below ``root`` must not be links. Returns whether something was removed.

    Example:
        >>> remove_file("/tmp/no-such-file-here")
        False
    """
    path = Path(path)
    try:
        with folder_fd(path.parent, None if root is None else Path(root)) as dfd:
            fault_point("remove", path)
            os.unlink(path.name, dir_fd=dfd)
    except FileNotFoundError:
        return False
    except FileError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    except OSError as e:
        raise file_error(e, path, "remove") from None
    return True


def entries(folder: str | os.PathLike, root: str | os.PathLike | None = None) -> list[str]:
    """The names in ``folder`` (none when it does not exist); a link below ``root`` refused.

    Example:
        >>> "files.py" in entries(Path(__file__).parent)
        True
    """
    folder = Path(folder)
    if not os.path.lexists(folder):
        return []
    with folder_fd(folder, None if root is None else Path(root)) as dfd:
        return sorted(os.listdir(dfd))
