"""A save over an earlier save is all or nothing: the record is the commit point.

A saved folder is several files (the weights, the record, a diffusers model's config.json, LoRA
adapter files, some in a subfolder per adapter), and no rename swaps several files at once. So
:func:`commit_save`

1. writes each new file (atomically, ``files.py``) under a staged name
   ``.<name>.<token>.next`` beside the old one, which stays as it was;
2. writes the new record, which names the staged files (``weights.staged``): from this rename
   on, ``load`` reads the new save, taking each file from its staged copy while that exists
   (``record.current_file``);
3. renames each staged file over its final name;
4. writes the record again without ``staged``, and removes what an earlier save killed on the
   way left behind (staged copies, temporary files of writers that are gone).

A kill before step 2 leaves the old save loading as it was; a kill at any point after it leaves
the new one loading. Tests stop a save at each of its file operations (``files.fault_hook``).

Example:
    >>> writers = {"model.safetensors": write}  # doctest: +SKIP
    >>> commit_save(Path("out"), record, writers, "model.safetensors")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from dynconvert.io.files import (
    atomic_write,
    atomic_write_bytes,
    entries,
    fault_point,
    file_digest,
    file_error,
    folder_fd,
    pid_alive,
    remove_file,
)
from dynconvert.io.record import RECORD

Writer = Callable[[BinaryIO], Any]
"""Fills a new file: ``write(file)``."""

_STAGED = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{8}\.next$")
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def commit_save(out: Path, record: dict[str, Any], files: dict[str, Writer], weights: str) -> None:
    """Write ``files`` and ``record`` into ``out`` as one all-or-nothing save (module steps).

    Args:
        out: The folder (created if needed).
        record: The record; its ``weights`` entry is filled in here (file, size, sha256).
        files: File name ("/"-separated below ``out``: an adapter's subfolder) -> writer of its
            new content.
        weights: Which of ``files`` is the weights file.

    Raises:
        FileError: A file could not be written (the old save, if any, still loads).
    """
    token = secrets.token_hex(4)
    staged = {name: _staged_name(name, token) for name in files}
    for name, write in files.items():
        atomic_write(out / staged[name], write, root=out)
    size, digest = file_digest(out / staged[weights], root=out)
    record["weights"] = {
        "file": weights,
        "bytes": size,
        "sha256": {weights: digest},
        "staged": staged,
    }
    atomic_write_bytes(out / RECORD, _dumps(record), root=out)  # the commit
    for folder in dict.fromkeys(PurePosixPath(name).parent for name in files):
        with folder_fd(out / folder, out) as dfd:  # renamed within its folder: no link walked
            for name in [n for n in files if PurePosixPath(n).parent == folder]:
                fault_point("rename", out / name)
                try:
                    os.replace(
                        PurePosixPath(staged[name]).name, PurePosixPath(name).name,
                        src_dir_fd=dfd, dst_dir_fd=dfd,
                    )  # fmt: skip
                except OSError as e:
                    raise file_error(e, out / name) from None
            os.fsync(dfd)
    del record["weights"]["staged"]
    atomic_write_bytes(out / RECORD, _dumps(record), root=out)
    remove_leftovers(out, [*files, RECORD])


def _staged_name(name: str, token: str) -> str:
    """``a/x`` -> ``a/.x.<token>.next``: staged beside its final name, in the same folder."""
    path = PurePosixPath(name)
    return str(path.with_name(f".{path.name}.{token}.next"))


def _dumps(record: dict[str, Any]) -> bytes:
    return json.dumps(record, indent=1).encode()


def remove_leftovers(out: Path, names: list[str]) -> list[str]:
    """Remove what saves stopped on the way left for the files ``names`` of ``out``: staged
    copies, their temporary files, and temporary files of writers that are gone (or of this
    process: call it once the record names no staged file, with no other save into this
    folder running).

    Example:
        >>> remove_leftovers(Path("/no/such/folder"), ["model.safetensors"])
        []
    """
    removed = []
    for folder in dict.fromkeys(PurePosixPath(name).parent for name in names):
        mine = {PurePosixPath(n).name for n in names if PurePosixPath(n).parent == folder}
        for entry in entries(out / folder, out):
            temp = _TEMP.match(entry)
            staged = _STAGED.match(temp["name"] if temp else entry)
            pid = int(temp["pid"]) if temp else 0
            gone = temp is not None and (pid == os.getpid() or not pid_alive(pid))
            if (staged and staged["name"] in mine) or (gone and temp["name"] in mine):
                remove_file(out / folder / entry, out)
                removed.append(str(folder / entry))
    return removed
