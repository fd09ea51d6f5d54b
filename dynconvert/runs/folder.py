"""The run folder: its default name, ``run.json``, refusing a folder that holds another run,
checking that ``out`` can be written, cleanup after a failed run (only what this process wrote),
stale temp files, JSON files, and loading a finished run back."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from dynconvert.calibration.checkpoint import checkpoint_dir, list_checkpoints
from dynconvert.calibration.config import RESUME_FREE_FIELDS
from dynconvert.errors import OutputExistsError, RecordError
from dynconvert.fields import shown
from dynconvert.io.files import entries, is_link, remove_file
from dynconvert.io.limits import read_json
from dynconvert.io.restore import build_within
from dynconvert.io.save import RECORD, atomic_write_bytes, load, read_record
from dynconvert.recipes import Recipe
from dynconvert.runs.guard import refuse_links
from dynconvert.runs.lock import LOCK_FILE
from dynconvert.runs.memory import stop_note
from dynconvert.runs.sources import ModelSource
from dynconvert.version import __version__

if TYPE_CHECKING:
    from dynconvert.runs.request import PreparedRun

RUN_FILE = "run.json"
REPORT_FILE = "report.json"
SAMPLES_FILE = "samples.png"
RUN_FORMAT = "dynconvert-run"
RUN_VERSION = 1
RUN_STATUSES = ("running", "finished")


def default_out(model: str, target: float | tuple[float, float]) -> Path:
    """``runs/<model>-<target>``, e.g. ``runs/digits-0.5`` (a range: ``runs/digits-0.3-1``).

    Example:
        >>> default_out("DiT-XL/2", 0.5).as_posix()
        'runs/dit-xl-2-0.5'
    """
    slug = model.strip().lower().replace("/", "-").replace(" ", "-")
    budget = "-".join(f"{b:g}" for b in target) if isinstance(target, tuple) else f"{target:g}"
    return Path("runs") / f"{slug}-{budget}"


def _normal_path(value: str | None) -> str | None:
    """An absolute path for a path that exists (``latents/`` and ``./latents`` are the same)."""
    if value is None or value in ("digits", "synthetic") or not Path(value).expanduser().exists():
        return value
    return str(Path(value).expanduser().resolve())


def run_identity(recipe: Recipe, source: ModelSource, target: float) -> dict[str, Any]:
    """What makes two runs the same run (everything but the length and the reporting)."""

    return {
        "model": source.to_dict(with_config=False),
        "target_flops": target,
        "budget_range": recipe.budget_range,  # absent (None) in runs before ranges
        "recipe": recipe.name,
        "data": _normal_path(recipe.data),
        "convert": recipe.convert_config().to_dict(),
        "calibration": {k: v for k, v in recipe.calibration.items() if k not in RESUME_FREE_FIELDS},
    }


def _differences(now: dict[str, Any], was: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(now) | set(was)):
        a, b = now.get(k), was.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} ({b!r} there, {a!r} now)")
    return out


def read_run(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``run.json`` of a run folder, or None when there is none."""
    path = Path(folder) / RUN_FILE
    if not os.path.lexists(path):
        return None
    data = read_json(path, OutputExistsError, root=folder)  # bounded, no link followed
    if not isinstance(data, dict) or data.get("format") != RUN_FORMAT:
        raise OutputExistsError(f"{path} is not a dynconvert run file; choose another `out`")
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= RUN_VERSION:
        raise OutputExistsError(
            f"{path} has run-folder version {version!r}; this dynconvert reads version "
            f"{RUN_VERSION} (upgrade dynconvert for a newer one); choose another `out`"
        )
    kinds = {"status": str, "identity": dict, "source": dict, "recipe": dict, "steps": int}
    for key, kind in kinds.items():
        if key in data and not isinstance(data[key], kind) or isinstance(data.get(key), bool):
            raise OutputExistsError(
                f"{path} is corrupt: {key} is {type(data[key]).__name__}, not "
                f"{kind.__name__}; choose another `out`"
            )
    if data.get("status") not in RUN_STATUSES:
        raise OutputExistsError(
            f"{path} is corrupt: status {data.get('status')!r} is not one of "
            f"{', '.join(RUN_STATUSES)}; choose another `out`"
        )
    return data


def is_scratch(name: str) -> bool:
    """Whether a file name is the lock or a temp file (they do not make a folder non-empty).

    Example:
        >>> is_scratch(".model.safetensors.k2j4.tmp"), is_scratch("run.json")
        (True, False)
    """
    return name == LOCK_FILE or (name.startswith(".") and name.endswith(".tmp"))


def remove_stale_temps(out: Path) -> list[Path]:
    """Remove the temp files a killed writer left in ``out`` and its checkpoints folder.

    Call it holding the folder's lock: every temp file there is then stale.

    Returns:
        The removed paths.
    """
    removed = []
    for folder in (out, checkpoint_dir(out)):
        for name in entries(folder, out):  # a link below `out` is refused, never followed
            if name != LOCK_FILE and is_scratch(name) and not (folder / name).is_dir():
                remove_file(folder / name, out)
                removed.append(folder / name)
    return removed


def check_writable(path: Path, what: str = "`out`") -> None:
    """Refuse a path that cannot be created or written, before any work starts.

    ``path`` may exist (a folder, or a file to overwrite) or not (its nearest existing parent
    must be a folder this process can create files in: probed with a temp file).

    Raises:
        OutputExistsError: The message names the path and why.

    Example:
        >>> check_writable(Path(tempfile.mkdtemp()) / "runs" / "x")
    """
    path = Path(path).expanduser()
    try:
        path.exists()
    except OSError as e:  # a name too long for the file system
        raise OutputExistsError(f"{what} cannot be written ({e.strerror}); choose a path") from None
    if is_link(path) and not path.exists():
        raise OutputExistsError(f"{what} {path} is a link to a missing folder; pass a folder")
    parent = path if path.is_dir() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputExistsError(
            f"{what} {path} cannot be written: {parent} is a file, not a folder"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".dynconvert-probe.", suffix=".tmp", dir=parent)
        os.close(fd)
        os.unlink(probe)
        if path.is_file() and not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is read-only")
    except OSError as e:
        reason = e.strerror or str(e)
        raise OutputExistsError(
            f"{what} {path} cannot be written ({reason} in {parent}); choose a writable path"
        ) from None


def check_out(
    out: Path, identity: dict[str, Any], resume: bool, steps: int
) -> dict[str, Any] | None:
    """Refuse an output folder that holds another run; returns the run there when resuming.

    Raises:
        OutputExistsError: The folder holds another run, a finished one, or other files, or
            ``resume`` was asked where there is nothing to resume. The message names the fix.
    """

    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"`out` {out} is a file; choose a folder")
    refuse_links(out)
    if not out.exists() or all(is_scratch(p.name) for p in out.iterdir()):
        if resume:
            raise OutputExistsError(
                f"nothing to resume in {out}: no run there; drop `resume=True` to start one"
            )
        return None
    previous = read_run(out)
    if previous is None:
        raise OutputExistsError(
            f"{out} is not empty and holds no dynconvert run; choose another `out`"
        )
    was = previous.get("identity", {})
    desc = (
        f"{was.get('model', {}).get('name')} at target {was.get('target_flops')}, "
        f"recipe {was.get('recipe')}"
    )
    diff = _differences(identity, was)
    if diff:
        more = f" and {len(diff) - 2} more" if len(diff) > 2 else ""
        raise OutputExistsError(
            f"{out} holds another run ({desc}) that differs in {'; '.join(diff[:2])}{more}; choose "
            "another `out`, or repeat that run's settings with `resume=True` to continue it"
        )
    found = list_checkpoints(out)
    last = found[-1][0] if found else 0
    if previous.get("status") == "finished":
        if not resume:
            raise OutputExistsError(
                f"{out} holds a finished run ({desc}, {last} steps); choose another `out`, or "
                f"add `resume=True` with `steps` above {last} to calibrate it further"
            )
        if steps <= last:
            raise OutputExistsError(
                f"the run in {out} already finished {last} steps; `resume=True` needs `steps` "
                f"above {last}, or choose another `out`"
            )
    elif not resume:
        raise OutputExistsError(
            f"{out} holds an unfinished run of these settings ({last} steps checkpointed"
            f"{stop_note(previous)}); add `resume=True` to continue it, or choose another `out`"
        )
    elif steps < last:
        raise OutputExistsError(
            f"the run in {out} has a checkpoint at step {last}; `resume=True` needs `steps` of "
            f"at least {last} (got {steps}), or choose another `out`"
        )
    return previous


def snapshot(out: Path) -> set[str]:
    """Relative paths of every file and folder under ``out`` (empty when it does not exist)."""
    if not out.is_dir():
        return set()
    return {p.relative_to(out).as_posix() for p in out.rglob("*")}


def remove_created(out: Path, before: set[str], created_folder: bool) -> None:
    """Remove what this process wrote into ``out`` after :func:`snapshot` gave ``before``.

    Only paths that were not there before go (deepest first); files that were there stay, even
    when this process rewrote them. The folder itself goes when this process created it and
    nothing else is left in it but the lock.

    Args:
        out: The run folder.
        before: :func:`snapshot` of the folder taken when this process started writing.
        created_folder: Whether this process created ``out``.
    """
    for rel in sorted(snapshot(out) - before - {LOCK_FILE}, key=lambda r: -r.count("/")):
        p = out / rel
        try:  # best effort (a folder made read-only keeps them), never through a link
            if p.is_dir() and not any(is_link(q) for q in (p, *p.parents) if out in q.parents):
                shutil.rmtree(p, ignore_errors=True)
            else:
                remove_file(p, out)
        except OSError:
            pass
    if created_folder and out.is_dir():
        if all(p.name == LOCK_FILE for p in out.iterdir()):
            try:
                remove_file(out / LOCK_FILE, out)
                out.rmdir()
            except OSError:
                pass  # someone put a file there meanwhile, or it is read-only: leave it


_NUMBERS = re.compile(r"\[\s*((?:-?[\d.eE+-]+|null)(?:,\s*(?:-?[\d.eE+-]+|null))*)\s*\]")


def dumps(data: Any, indent: int = 2) -> str:
    """JSON with indentation, but lists of numbers on one line (the 1000-value FLOPs profile).

    Example:
        >>> print(dumps({"a": [1, 2.5], "b": float("inf")}))
        {
          "a": [1, 2.5],
          "b": null
        }
    """
    text = json.dumps(_finite(data), indent=indent, default=_plain_default, allow_nan=False)
    return _NUMBERS.sub(
        lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text
    )


def _finite(obj: Any) -> Any:
    """JSON has no inf or nan: they become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _plain_default(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return _finite(obj.to_dict())
    if hasattr(obj, "tolist"):
        return _finite(obj.tolist())
    return str(obj)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` atomically as JSON (:func:`dumps`: inf and nan as null), newline-ended."""
    atomic_write_bytes(path, (dumps(data) + "\n").encode())


def write_run_state(prepared: PreparedRun, status: str, steps: int | None = None) -> None:
    """Write the run's ``run.json``: status, times, steps, identity, model source and recipe.

    The "created" time of an earlier run.json in the folder is kept.

    Args:
        prepared: The run.
        status: For example "running" or "finished".
        steps: Steps to record (None: the calibration's configured steps).
    """
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    write_json(prepared.out / RUN_FILE, {
        "format": RUN_FORMAT,
        "version": RUN_VERSION,
        "status": status,
        "created": (prepared.previous or {}).get("created", now),
        "updated": now,
        "steps": steps if steps is not None else prepared.calibration.steps,
        "identity": prepared.identity,
        "source": prepared.source.to_dict(),
        "recipe": prepared.recipe.to_dict(),
        "recipe_file": prepared.recipe.source,
        "dynconvert_version": __version__,
    })  # fmt: skip


def load_run(
    folder: str | os.PathLike, device: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The calibrated model of a run folder (or any ``dynconvert.save`` folder) and ``run.json``.

    Returns:
        ``(model, info)``: the converted model in eval mode, and the run's ``run.json`` (empty
        for a folder written by ``dynconvert.save`` alone).

    Raises:
        RecordError: The folder holds no saved model.

    Example:
        >>> model, info = load_run("runs/digits-0.5")        # doctest: +SKIP
    """

    path = Path(folder)
    if not path.is_dir():
        raise RecordError(
            f"no such run folder: {path}; pass a folder written by dynconvert convert"
        )
    try:
        run = read_run(path) or {}
    except OutputExistsError as e:
        raise RecordError(str(e).replace("; choose another `out`", "")) from e
    if not (path / RECORD).is_file():
        unfinished = run.get("status") == "running"
        hint = (
            " yet (the run has not finished: convert it again with `resume=True`)"
            if unfinished
            else ""
        )
        raise RecordError(f"{path} holds no saved model{hint}; pass a finished run folder")
    record = read_record(path)
    base = None
    if not record.get("preset") and run.get("source"):
        source = ModelSource.from_dict(run["source"])
        try:
            base = build_within(source.skeleton, path, record)
        except RecordError:
            raise
        except Exception as e:  # diffusers checks a config in many ways
            raise RecordError(
                f"cannot build the model run.json in {path} names ({shown(str(e), 120)[1:-1]}); "
                "load the folder with dynconvert.load(folder, base_model)"
            ) from None
    return load(path, base, device=device), run
