"""Checkpoint files: atomic writes, discovery of the latest, pruning, stale temporary files.

A checkpoint is one ``torch.save`` file ``<output_dir>/checkpoints/step-0001000.pt`` (what it
holds: ``checkpoint.py``). It is written to a temporary file in the same folder, flushed to disk,
then ``os.replace``d over the final name, so a killed run never leaves a half-written checkpoint
under a real name. It loads with ``torch.load(weights_only=True)``: everything in it is tensors
and plain Python values.

An FSDP run with sharded checkpoints writes a folder ``step-0001000/`` instead (its shards and a
``meta.pt`` holding the rest; ``sharded_checkpoint.py``): it is listed, pruned and loaded (its
``meta.pt``) here like a file, complete once ``meta.pt`` is in it.

Every file operation goes through ``dynconvert.io.files``: below the run folder no link is
followed (a ``checkpoints`` link or a checkpoint linked out of the folder is refused, never
read, written or pruned through), and nothing is removed outside the folder.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from dynconvert.errors import CheckpointError, FileError
from dynconvert.io.files import (
    atomic_write,
    entries,
    fd_path,
    open_file,
    pid_alive,
    remove_file,
)

CHECKPOINT_FORMAT = "dynconvert-calibration"
CHECKPOINT_VERSION = 1
_NAME = re.compile(r"^step-(\d{7,})(\.pt)?$")  # a file, or a sharded checkpoint's folder
SHARDED_META = "meta.pt"
"""What a sharded checkpoint folder holds besides its shards (written last)."""
_TEMP = re.compile(r"^\.step-\d{7,}\.pt\.(\d+)(?:\.[0-9a-f]{8})?\.tmp$")


def checkpoint_dir(output_dir: str | Path) -> Path:
    """``<output_dir>/checkpoints``."""
    return Path(output_dir) / "checkpoints"


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    """Path of the checkpoint after ``step`` completed steps.

    Example:
        >>> checkpoint_path("run", 1000).as_posix()
        'run/checkpoints/step-0001000.pt'
    """
    return checkpoint_dir(output_dir) / f"step-{step:07d}.pt"


def _root(path: Path) -> Path:
    """The run folder of a checkpoint path: no link is followed below it."""
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first.

    Raises:
        FileError: ``checkpoints`` is a link (or not a folder).
    """
    folder = checkpoint_dir(output_dir)
    found = []
    for name in entries(folder, output_dir):
        m = _NAME.match(name)
        if m and (m.group(2) or SHARDED_META in entries(folder / name, output_dir)):
            found.append((int(m.group(1)), folder / name))  # a folder once its meta.pt is in
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint in ``output_dir``, or None.

    Example:
        >>> latest_checkpoint("/no/such/run") is None
        True
    """
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` atomically (temp file in the same folder, fsync, ``os.replace``).

    Args:
        path: The final file name.
        payload: The checkpoint dict; "format" and "version" are added.

    Returns:
        The path written.

    Example:
        >>> import tempfile
        >>> p = save_checkpoint(Path(tempfile.mkdtemp()) / "step-0000001.pt", {"step": 1})
        >>> load_checkpoint(p)["step"]
        1
    """
    path = Path(path)
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}
    return atomic_write(path, lambda f: torch.save(payload, f), _root(path))


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint`` (``mmap``: map the tensors, read lazily).

    Raises:
        CheckpointError: Missing, unreadable, another format, or a newer version.
    """
    path = Path(path)
    if path.is_dir() and not path.is_symlink():  # sharded: its meta.pt (shards load later)
        path = path / SHARDED_META
    try:
        fd = open_file(path, _root(path))
    except FileError as e:
        missing = f"checkpoint {path} does not exist"
        raise CheckpointError(missing if not os.path.lexists(path) else str(e)) from None
    try:
        payload = torch.load(
            fd_path(fd, path), map_location=map_location, weights_only=True, mmap=mmap
        )
    except Exception as err:  # torch raises many types for a corrupt file
        raise CheckpointError(
            f"checkpoint {path} is corrupt or unreadable ({type(err).__name__}: "
            f"{str(err)[:200]}); delete it to resume from the previous one"
        ) from None
    finally:
        os.close(fd)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a dynconvert calibration checkpoint")
    version = payload.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(
            f"checkpoint {path} has no valid version ({version!r}); it is corrupt"
        )
    if version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has version {version}, newer than this dynconvert "
            f"({CHECKPOINT_VERSION}); upgrade dynconvert"
        )
    return payload


def remove_stale_temps(output_dir: str | Path) -> list[Path]:
    """Remove checkpoint temp files whose writer is gone (killed during a write).

    A temp file is ``.step-XXXXXXX.pt.<pid>.tmp``; one whose process no longer runs is stale.

    Returns:
        The removed paths.
    """
    folder = checkpoint_dir(output_dir)
    removed = []
    for name in entries(folder, output_dir):
        m = _TEMP.match(name)
        pid = int(m.group(1)) if m else 0
        if m and (pid == os.getpid() or not pid_alive(pid)):  # none of ours is being written
            remove_file(folder / name, output_dir)
            removed.append(folder / name)
    return removed


def prune_checkpoints(output_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints; returns the deleted paths."""
    found = list_checkpoints(output_dir)
    doomed = [p for _, p in found[: max(0, len(found) - keep)]]
    for p in doomed:
        if p.is_dir() and not p.is_symlink():  # a sharded checkpoint (rmtree follows no link)
            shutil.rmtree(p, ignore_errors=True)
        else:
            remove_file(p, output_dir)  # the entry itself, inside the folder
    return doomed
