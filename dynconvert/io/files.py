"""Files written whole or not at all: a temporary file in the same folder, flushed to disk, then
renamed over the final name (a crash leaves the old file or the new one, never half of one);
and a cheap fingerprint that tells a truncated or swapped weights file from the one recorded.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename.

    Example:
        >>> atomic_write_bytes(Path("/tmp/note.txt"), b"hello")  # doctest: +SKIP
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_tensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None
) -> Path:
    """Write a safetensors file through a temporary file in the same folder, then rename.

    Example:
        >>> atomic_save_tensors({"w": torch.zeros(2)}, "/tmp/w.safetensors")  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:  # on disk before the rename: a crash leaves old or new
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _file_mode() -> int:
    """The mode a plainly created file would get (0o666 minus the umask); mkstemp gives 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fingerprint(path: Path) -> str:
    """sha256 of a file's size, first and last MiB (cheap check against truncation and swaps).

    Example:
        >>> len(fingerprint(Path(__file__)))
        64
    """
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(2**20))
        if size > 2**20:
            f.seek(max(size - 2**20, 2**20))
            h.update(f.read(2**20))
    return h.hexdigest()
