"""Calibration checkpoints: what one holds, and resuming a run from it.

A checkpoint is one ``torch.save`` file ``<output_dir>/checkpoints/step-0001000.pt`` holding::

    {"format": "dynconvert-calibration", "version": 1, "step": 1000,
     "model": state_dict, "ema": EMA.state_dict(), "optimizer": ..., "scaler": ... or None,
     "scheduler": None, "rng": [per-process RNG states], "data": {"position": rows read},
     "counters": {...}, "history": {"loss": [...], "flops_ratio": [...]}, "config": {...}}

An FSDP run with sharded checkpoints writes a folder instead (``sharded_checkpoint.py``): its
``meta.pt`` says ``"kind": "fsdp-sharded"`` and records the weights' shapes, which the checks
here read; its tensors load once the model is sharded.

The files themselves (atomic writes, the latest, pruning) are ``checkpoint_files.py``; the RNG
states and per-step seeds are ``seeding.py``. Both are re-exported here, the module the rest of
the package imports checkpoints from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dynconvert.calibration.checkpoint_files import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    SHARDED_META,
    checkpoint_dir,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    remove_stale_temps,
    save_checkpoint,
)
from dynconvert.calibration.config import RESUME_FREE_FIELDS
from dynconvert.calibration.seeding import capture_rng, restore_rng, seed_step
from dynconvert.calibration.trainable import attach_lora, router_parameters, trainable_parameters
from dynconvert.errors import CheckpointError, OutputExistsError

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "SHARDED_META",
    "capture_rng",
    "check_optimizer_fits",
    "check_resume",
    "check_training_payload",
    "checkpoint_dir",
    "checkpoint_path",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_training_state",
    "prune_checkpoints",
    "remove_stale_temps",
    "restore_rng",
    "router_parameters",
    "save_checkpoint",
    "save_training_state",
    "seed_step",
]


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
        >>> check_training_payload({"step": 1}, "x.pt")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        dynconvert.errors.CheckpointError: checkpoint x.pt lacks 'model' (it is not a training ...
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
    _check_finite(payload, path)


def _check_finite(payload: dict[str, Any], path: str | Path) -> None:
    """Refuse NaN or infinite weights, EMA shadows or optimizer moments, and EMA counters out
    of range: resumed, they would end in a model whose routers are NaN, written as a finished
    run that ``load`` then refuses."""
    ema = payload["ema"]
    # a sharded FSDP checkpoint's meta.pt keeps the EMA counters apart from its shards
    counters = payload.get("ema_counters") or ema
    decay, updates = counters.get("decay"), counters.get("num_updates")
    fix = "delete it to resume from the previous one, or start the run again"
    if not isinstance(decay, (int, float)) or isinstance(decay, bool) or not 0 <= decay <= 1:
        raise CheckpointError(f"checkpoint {path}: EMA decay {decay!r:.40} not in [0, 1]; {fix}")
    if not isinstance(updates, int) or isinstance(updates, bool) or updates < 0:
        raise CheckpointError(f"checkpoint {path}: EMA num_updates {updates!r:.40}; {fix}")
    moments = [v for s in payload["optimizer"]["state"].values() if isinstance(s, dict)
               for v in s.values()]  # fmt: skip
    shadow = ema.get("shadow") if isinstance(ema.get("shadow"), dict) else {}
    groups = {"model": payload["model"].items(), "EMA": shadow.items(),
              "optimizer": enumerate(moments)}  # fmt: skip
    for where, items in groups.items():
        for name, value in items:
            if not isinstance(value, torch.Tensor):
                continue
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise CheckpointError(
                    f"checkpoint {path} holds NaN or infinite values ({where} {str(name)[:80]}); "
                    + fix
                )


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
            f"{', '.join(mismatch)}; use the same values (only "
            f"{', '.join(sorted(RESUME_FREE_FIELDS))} may change)"
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
    attach_lora(model, cfg)  # trainable="lora": the adapter the checkpoint holds (added once)
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
    check_optimizer_fits(payload["optimizer"], trainable_parameters(model, cfg), path)
    return payload["step"]


def load_training_state(cfg: Any, model: nn.Module, ema: Any) -> dict[str, Any] | None:
    """Load the checkpoint to resume from into ``model`` and ``ema``; None for a fresh run.

    Args:
        cfg: The run's ``CalibrationConfig``.
        model: The (unwrapped) model; its state dict is loaded.
        ema: The ``EMA``; its shadow is loaded (None: left in the returned dict).

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
    check_optimizer_fits(payload["optimizer"], trainable_parameters(model, cfg), path)
    try:
        if ema is not None:  # None under FSDP: the EMA is made after sharding, loaded then
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
