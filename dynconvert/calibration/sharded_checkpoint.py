"""Checkpoints of a calibration sharded with FSDP2, written and resumed exactly.

Which kind follows the accelerate config's ``fsdp_state_dict_type``:

- ``FULL_STATE_DICT``: ``checkpoints/step-0000100.pt``, the same file DDP and a single process
  write (``checkpoint.save_training_state``): model, EMA and optimizer (keyed by parameter
  index) gathered on the main process. Any number of processes, DDP or FSDP, resumes it.
- ``SHARDED_STATE_DICT``: a folder ``checkpoints/step-0000100/`` written by
  ``torch.distributed.checkpoint`` (each process writes its shards of the model, the EMA and the
  optimizer; a different number of processes reshards on load) and ``meta.pt`` (step, history,
  counters, config, every process's RNG state, the EMA's counters). It is written as
  ``.step-0000100.tmp/`` and renamed once complete, so a killed run never leaves a partial
  folder under a real name.

Example:
    >>> from pathlib import Path
    >>> is_sharded_checkpoint(Path("/no/such/step-0000001"))
    False
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from torch import nn

from dynconvert.calibration.checkpoint import (
    SHARDED_META,
    capture_rng,
    checkpoint_dir,
    checkpoint_path,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from dynconvert.calibration.sharded import (
    full_model_state,
    full_optimizer_state,
    full_shadow,
    load_full_optimizer_state,
    shard_like,
)
from dynconvert.errors import CheckpointError

META = SHARDED_META


def is_sharded_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a complete sharded checkpoint folder (it holds ``meta.pt``)."""
    return path.is_dir() and (path / META).is_file()


def sharded_kind(accelerator: Any) -> bool:
    """Whether the FSDP plugin asks for sharded checkpoints (else full ones)."""
    from torch.distributed.fsdp import StateDictType

    return accelerator.state.fsdp_plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT


def _gathered_rng(accelerator: Any) -> list[dict[str, Any]]:
    from accelerate.utils import gather_object

    rng = [capture_rng()]
    return gather_object(rng) if accelerator.num_processes > 1 else rng


def _common(cfg: Any, accelerator: Any, ema: Any, done: int, history: dict, counters: dict) -> dict:
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
    return {
        "step": done, "scaler": scaler, "scheduler": None, "rng": _gathered_rng(accelerator),
        "data": {"position": done * cfg.batch_size, "step": done}, "counters": dict(counters),
        "history": {k: list(v) for k, v in history.items()}, "config": cfg.to_dict(),
        "ema_counters": {"decay": ema.decay, "warmup": ema.warmup, "num_updates": ema.num_updates},
    }  # fmt: skip


def _meta(model: nn.Module, names: list[str]) -> dict[str, Any]:
    """The entries of a sharded checkpoint's ``meta.pt`` that stand for its shards when a run
    is checked before resuming: the weights' shapes, and the optimizer's parameter count."""
    return {
        "kind": "fsdp-sharded", "model": {}, "ema": {},
        "optimizer": {"state": {}, "param_groups": [{"params": list(range(len(names)))}]},
        "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
    }  # fmt: skip


def save_sharded_training_state(
    accelerator: Any,
    cfg: Any,
    model: nn.Module,
    ema: Any,
    optimizer: Any,
    names: list[str],
    done: int,
    history: dict[str, list[float]],
    counters: dict[str, int],
) -> Path:
    """Write the checkpoint after ``done`` steps of an FSDP run (every process takes part).

    Returns:
        The checkpoint's path (a file for full checkpoints, a folder for sharded ones).
    """
    main = accelerator.is_main_process
    common = _common(cfg, accelerator, ema, done, history, counters)
    if not sharded_kind(accelerator):
        payload = {
            **common,
            "model": full_model_state(model),
            "ema": {
                "decay": ema.decay,
                "warmup": ema.warmup,
                "num_updates": ema.num_updates,
                "shadow": full_shadow(ema.shadow, main),
            },  # fmt: skip
            "optimizer": full_optimizer_state(model, optimizer, names),
        }
        path = checkpoint_path(cfg.output_dir, done)
        if main:
            save_checkpoint(path, payload)
            prune_checkpoints(cfg.output_dir, cfg.keep_checkpoints)
        accelerator.wait_for_everyone()
        return path
    import torch.distributed.checkpoint as dcp

    final = checkpoint_path(cfg.output_dir, done).with_suffix("")
    tmp = final.with_name(f".{final.name}.tmp")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    dcp.save(_sharded_state(model, ema, optimizer), checkpoint_id=str(tmp))
    if main:
        save_checkpoint(tmp / META, {**common, **_meta(model, names)})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        prune_checkpoints(cfg.output_dir, cfg.keep_checkpoints)
    accelerator.wait_for_everyone()
    return final


def _sharded_state(model: nn.Module, ema: Any, optimizer: Any) -> dict[str, Any]:
    """What a sharded checkpoint holds, as DTensors of this process (loaded in place too)."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opt = getattr(optimizer, "optimizer", optimizer)
    return {
        "model": get_model_state_dict(model),
        "optimizer": get_optimizer_state_dict(model, opt),
        "ema": dict(ema.shadow),
    }


def load_sharded_meta(path: Path) -> dict[str, Any]:
    """``meta.pt`` of a sharded checkpoint folder, checked like a checkpoint file."""
    return load_checkpoint(path / META)


def resume_after_sharding(
    resumed: dict[str, Any] | None, model: nn.Module, ema: Any, optimizer: Any, names: list[str]
) -> dict[str, Any] | None:
    """Load a resumed run's EMA and optimizer (and, from a folder, its model) into the sharded
    objects; returns the checkpoint's dict (step, history, RNG states...) or None.

    Args:
        resumed: What ``checkpoint.load_training_state`` returned before sharding: a full
            checkpoint (its model already loaded) or a sharded folder's ``meta.pt`` plus
            "path"; None for a fresh run.
        model: The sharded model.
        ema: The EMA made from the sharded parameters.
        optimizer: The prepared optimizer.
        names: Trainable parameter names, in the optimizer's order.
    """
    if resumed is None:
        return None
    counters = resumed.get("ema_counters") or resumed["ema"]
    if resumed.get("kind") == "fsdp-sharded":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        state = _sharded_state(model, ema, optimizer)
        try:
            dcp.load(state, checkpoint_id=str(resumed["path"]))
        except Exception as err:  # DCP raises several types for missing or mismatched entries
            raise CheckpointError(
                f"checkpoint {resumed['path']} does not match this model or is incomplete "
                f"({type(err).__name__}); delete it to resume from the previous one"
            ) from err
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(
            model, getattr(optimizer, "optimizer", optimizer), state["optimizer"]
        )
        ema.shadow = state["ema"]
    else:
        ema.shadow = shard_like(resumed["ema"]["shadow"], model)
        load_full_optimizer_state(model, optimizer, resumed["optimizer"], names)
    ema.num_updates = int(counters["num_updates"])
    ema.decay, ema.warmup = float(counters["decay"]), bool(counters["warmup"])
    return resumed


def remove_stale_sharded(output_dir: str | Path) -> list[Path]:
    """Remove ``.step-XXXXXXX.tmp`` folders a killed sharded write left (main process, before
    anyone writes)."""
    folder = checkpoint_dir(output_dir)
    gone = [p for p in folder.glob(".step-*.tmp") if p.is_dir()] if folder.is_dir() else []
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone
