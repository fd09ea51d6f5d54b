"""Calibration checkpoints: atomic writes, discovery of the latest, RNG state capture.

A checkpoint is one ``torch.save`` file ``<output_dir>/checkpoints/step-0001000.pt`` holding::

    {"format": "dynconvert-calibration", "version": 1, "step": 1000,
     "model": state_dict, "ema": EMA.state_dict(), "optimizer": ..., "scaler": ... or None,
     "scheduler": None, "rng": [per-process RNG states], "data": {"position": rows read},
     "counters": {...}, "history": {"loss": [...], "flops_ratio": [...]}, "config": {...}}

It is written to a temporary file in the same folder, flushed to disk, then ``os.replace``d over
the final name, so a killed run never leaves a half-written checkpoint under a real name. It loads
with ``torch.load(weights_only=True)``: everything in it is tensors and plain Python values.

An FSDP run with sharded checkpoints writes a folder ``step-0000100/`` instead (its shards and a
``meta.pt`` holding the rest, ``kind`` "fsdp-sharded"; see ``sharded_checkpoint.py``): it is
listed, pruned and checked here like a file, and its tensors are loaded after sharding.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from dynconvert.errors import CheckpointError, OutputExistsError
from dynconvert.runtime.state import get_state

CHECKPOINT_FORMAT = "dynconvert-calibration"
CHECKPOINT_VERSION = 1
_NAME = re.compile(r"^step-(\d{7,})(\.pt)?$")  # a file, or a sharded checkpoint's folder
SHARDED_META = "meta.pt"  # what a sharded checkpoint folder holds besides its shards
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


_FIELDS: dict[str, type | tuple[type, ...]] = {
    "step": int,
    "model": dict,
    "ema": dict,
    "optimizer": dict,
    "rng": list,
    "counters": dict,
    "history": dict,
    "config": dict,
}
"""The keys a checkpoint to resume from must hold, and their types."""


def check_training_payload(payload: dict[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint that lacks a key of a training state or holds one of another type.

    Raises:
        CheckpointError: The message names the key; delete the file to resume from the one
            before.

    Example:
        >>> check_training_payload({"step": 1}, "x.pt")
        Traceback (most recent call last):
        ...
        dynconvert.errors.CheckpointError: checkpoint x.pt lacks 'model' (it is not a training state or is corrupt); delete it to resume from the previous one
    """
    for key, kind in _FIELDS.items():
        if key not in payload:
            raise CheckpointError(
                f"checkpoint {path} lacks {key!r} (it is not a training state or is corrupt); "
                "delete it to resume from the previous one"
            )
        value = payload[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(
                f"checkpoint {path} is corrupt: {key!r} is a {type(value).__name__}; delete it "
                "to resume from the previous one"
            )
    if payload["step"] < 0:
        raise CheckpointError(f"checkpoint {path} is corrupt: step {payload['step']} < 0")
    groups = payload["optimizer"].get("param_groups")
    if not isinstance(groups, list) or not isinstance(payload["optimizer"].get("state"), dict):
        raise CheckpointError(f"checkpoint {path} is corrupt: its optimizer state is incomplete")


def check_optimizer_fits(
    optimizer_state: dict[str, Any], params: list[torch.Tensor], path: str | Path
) -> None:
    """Refuse an optimizer state written for other parameters (another model or ``trainable``).

    Args:
        optimizer_state: The checkpoint's ``optimizer.state_dict()``.
        params: The trainable parameters in the optimizer's order.
        path: The checkpoint, for the message.

    Raises:
        CheckpointError: Another number of parameters, or a moment of another shape.
    """
    ids = [i for g in optimizer_state.get("param_groups", []) for i in g.get("params", [])]
    if len(ids) != len(params):
        raise CheckpointError(
            f"checkpoint {path} holds optimizer state for {len(ids)} parameters, this model "
            f"trains {len(params)}: it is from another model or `trainable` setting"
        )
    for i, p in zip(ids, params):
        for name, value in optimizer_state.get("state", {}).get(i, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != p.shape:
                raise CheckpointError(
                    f"checkpoint {path} holds optimizer state {name} of shape "
                    f"{tuple(value.shape)} for a parameter of shape {tuple(p.shape)}: it is "
                    "from another model"
                )


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


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU, and CUDA where present).

    Example:
        >>> state = capture_rng()
        >>> a = torch.rand(1); restore_rng(state); bool(torch.rand(1) == a)
        True
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore states captured by ``capture_rng`` (CUDA only when present on both sides)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) for one step of one process.

    Every random draw of a step (timesteps, noise, label dropout, router Gumbel noise, dropout)
    then depends only on (seed, rank, step), so a resumed run repeats an uninterrupted one.

    Example:
        >>> seed_step(0, 0, 5); a = torch.rand(1); seed_step(0, 0, 5); bool(torch.rand(1) == a)
        True
    """
    mixed = (seed * 1_000_003 + rank) * 1_000_033 + step
    mixed = (mixed * 6364136223846793005 + 1442695040888963407) % (2**63)
    torch.manual_seed(mixed)
    random.seed(mixed)
    np.random.seed(mixed % (2**32))


def _check_resumable(cfg: Any, payload: dict[str, Any], path: Path) -> None:
    """The checkpoint is a training state of these settings, at most ``cfg.steps`` in."""
    check_training_payload(payload, path)
    if payload["step"] > cfg.steps:
        raise CheckpointError(
            f"cannot resume from {path}: it is at step {payload['step']}, past the {cfg.steps} "
            f"steps asked; ask for at least {payload['step']} steps"
        )
    mismatch = cfg.resume_mismatch(payload["config"])
    if mismatch:
        raise CheckpointError(
            f"cannot resume from {path}: these settings differ from the run that wrote it: "
            f"{', '.join(mismatch)}; use the same values (only steps, checkpoint_every, "
            "keep_checkpoints, output_dir, num_workers and cpu may change)"
        )


def check_resume(cfg: Any, model: nn.Module) -> int | None:
    """Check, before any work, the checkpoint a resumed run would continue from.

    The tensors are memory-mapped, not read. Checked: the checkpoint's keys and types, its
    step against ``cfg.steps``, its settings against ``cfg``, its weights' names and shapes
    against ``model``, and that its optimizer moments have the shapes of this model's
    parameters. ``calibrate`` checks again when it loads.

    Args:
        cfg: The run's ``CalibrationConfig``.
        model: The converted model the run calibrates.

    Returns:
        The checkpoint's step, or None when nothing is resumed.

    Raises:
        CheckpointError: What is wrong, naming the checkpoint.
    """
    if not cfg.resume or not cfg.output_dir:
        return None
    path = latest_checkpoint(cfg.output_dir)
    if path is None:
        return None
    payload = load_checkpoint(path, mmap=True)
    _check_resumable(cfg, payload, path)
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in payload["model"].items() if isinstance(v, torch.Tensor)}
    if payload.get("kind") == "fsdp-sharded":  # shapes recorded beside the shards
        theirs = {k: tuple(v) for k, v in payload.get("shapes", {}).items()}
    if mine != theirs:
        diff = sorted(set(mine) ^ set(theirs)) or [k for k in mine if mine[k] != theirs[k]]
        raise CheckpointError(
            f"checkpoint {path} does not match this model (e.g. {', '.join(diff[:3])}): it is "
            "from another model or conversion"
        )
    if cfg.trainable == "routers":
        bank = get_state(model)
        routers = (
            bank.router_parameters() if hasattr(bank, "router_parameters") else bank.parameters()
        )
        ids = {id(p) for p in routers}
        trainable = [p for p in model.parameters() if id(p) in ids]
    else:
        trainable = [p for p in model.parameters() if p.requires_grad]
    check_optimizer_fits(payload["optimizer"], trainable, path)
    return payload["step"]


def load_training_state(cfg: Any, model: nn.Module, ema: Any) -> dict[str, Any] | None:
    """Load the checkpoint to resume from into ``model`` and ``ema``; None for a fresh run.

    Args:
        cfg: The run's ``CalibrationConfig``.
        model: The (unwrapped) model; its state dict is loaded.
        ema: The ``EMA``; its shadow is loaded.

    Returns:
        The checkpoint dict plus "path" (the optimiser state is for the caller to load), or None
        when there is no output_dir or no checkpoint yet.

    Raises:
        OutputExistsError: Checkpoints exist but ``resume`` is False.
        CheckpointError: Settings differ from the checkpoint's, or it does not fit the model.
    """
    if not cfg.output_dir:
        return None
    remove_stale_temps(cfg.output_dir)
    path = latest_checkpoint(cfg.output_dir)
    if path is None:
        return None
    if not cfg.resume:
        raise OutputExistsError(
            f"{cfg.output_dir} already holds checkpoints of a calibration run (latest {path}); "
            "set resume=True to continue it, or choose another output_dir"
        )
    payload = load_checkpoint(path)
    _check_resumable(cfg, payload, path)
    payload["path"] = path
    if payload.get("kind") == "fsdp-sharded":  # loaded once the model is sharded
        return payload
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path} does not match this model: {err}") from err
    check_optimizer_fits(
        payload["optimizer"], [p for p in model.parameters() if p.requires_grad], path
    )
    try:
        if ema is not None:  # None under FSDP: the EMA is made after sharding and loaded then
            ema.load_state_dict(payload["ema"])
    except (KeyError, RuntimeError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {path}: its EMA does not match this model ({err})"
        ) from err
    return payload


def save_training_state(
    accelerator: Any,
    cfg: Any,
    raw: nn.Module,
    ema: Any,
    optimizer: Any,
    done: int,
    history: dict[str, list[float]],
    counters: dict[str, int],
) -> Path:
    """Write the run's checkpoint after ``done`` steps on the main process, then prune.

    Every process takes part (their RNG states are gathered); only the main one writes.

    Returns:
        The checkpoint path.
    """
    from accelerate.utils import gather_object

    rng = [capture_rng()]
    if accelerator.num_processes > 1:
        rng = gather_object(rng)
    path = checkpoint_path(cfg.output_dir, done)
    if accelerator.is_main_process:
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        payload = {
            "step": done,
            "model": {k: v.detach().cpu() for k, v in raw.state_dict().items()},
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler,
            "scheduler": None,
            "rng": rng,
            "data": {"position": done * cfg.batch_size, "step": done},
            "counters": dict(counters),
            "history": {k: list(v) for k, v in history.items()},
            "config": cfg.to_dict(),
        }
        save_checkpoint(path, payload)
        prune_checkpoints(cfg.output_dir, cfg.keep_checkpoints)
    accelerator.wait_for_everyone()
    return path
