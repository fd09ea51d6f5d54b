"""Checkpoint files: atomic writes, discovery of the latest, pruning, stale temporary files.

A checkpoint is one ``torch.save`` file ``<output_dir>/checkpoints/step-0001000.pt`` (what it
holds: ``checkpoint.py``). It is written to a temporary file in the same folder, flushed to disk,
then ``os.replace``d over the final name, so a killed run never leaves a half-written checkpoint
under a real name. It loads with ``torch.load(weights_only=True)``: everything in it is tensors
and plain Python values.

An FSDP run with sharded checkpoints writes a folder ``step-0001000/`` instead (its shards and a
``meta.pt`` holding the rest; ``sharded_checkpoint.py``): it is listed, pruned and loaded (its
``meta.pt``) here like a file, complete once ``meta.pt`` is in it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from dynconvert.errors import CheckpointError

CHECKPOINT_FORMAT = "dynconvert-calibration"
CHECKPOINT_VERSION = 1
_NAME = re.compile(r"^step-(\d{7,})(\.pt)?$")  # a file, or a sharded checkpoint's folder
SHARDED_META = "meta.pt"
"""What a sharded checkpoint folder holds besides its shards (written last)."""
_TEMP = re.compile(r"^\.step-\d{7,}\.pt\.(\d+)\.tmp$")


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


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m and (m.group(2) or (p / SHARDED_META).is_file()):  # a folder once complete
            found.append((int(m.group(1)), p))
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
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint`` (``mmap``: map the tensors, read lazily).

    Raises:
        CheckpointError: Missing, unreadable, another format, or a newer version.
    """
    path = Path(path)
    if path.is_dir():  # a sharded checkpoint: its meta.pt (the shards load after sharding)
        path = path / SHARDED_META
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises many types for a corrupt file
        raise CheckpointError(
            f"checkpoint {path} is corrupt or unreadable ({type(err).__name__}: {err}); delete it "
            "to resume from the previous one"
        ) from err
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
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TEMP.match(p.name)
        if m and not _alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process writes no checkpoint while it looks for stale ones
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prune_checkpoints(output_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints; returns the deleted paths."""
    found = list_checkpoints(output_dir)
    doomed = [p for _, p in found[: max(0, len(found) - keep)]]
    for p in doomed:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return doomed
