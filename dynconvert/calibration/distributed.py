"""accelerate set-up for calibration: the Accelerator, and undoing its wrapping of forward.

Sharding comes from the accelerate launch config, as for any accelerate script: ``accelerate
launch --config_file examples/accelerate/fsdp.yaml`` sets ``ACCELERATE_USE_FSDP`` and the
``FSDP_*`` settings, from which the Accelerator builds its FSDP plugin (version 2:
``fully_shard``). accelerate turns FSDP on only on accelerators; on CPU (tests over gloo)
:func:`make_accelerator` gives the Accelerator the same plugin and distributed type, so the same
FSDP2 code path (``accelerator.prepare`` -> ``fsdp2_prepare_model``) runs there.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn

from dynconvert.calibration.config import CalibrationConfig
from dynconvert.errors import ConfigError

MISSING = object()
"""Marks a model that had no instance-level ``forward`` before ``accelerator.prepare``."""


def make_accelerator(config: CalibrationConfig):
    """An ``accelerate.Accelerator`` for the config (mixed precision, DDP unused-parameter search).

    On a machine without CUDA launched as several processes (torchrun), it asks for CPU, so
    DDP runs over gloo. In a single process, an earlier Accelerator with another mixed
    precision is reset rather than refused.

    Example:
        >>> from dynconvert.calibration.config import CalibrationConfig
        >>> make_accelerator(CalibrationConfig(target=0.5)).num_processes
        1

    Raises:
        ConfigError: accelerate refuses the settings (e.g. fp16 without a GPU, or a different
            mixed precision than an Accelerator already created in this process).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedDataParallelKwargs

    if AcceleratorState._shared_state and not PartialState().use_distributed:
        # One process (a notebook, a test): an earlier run's settings would make accelerate
        # refuse a different mixed precision; start its state afresh instead.
        old = AcceleratorState()
        if old.mixed_precision != config.mixed_precision or (
            config.cpu and old.device.type != "cpu"
        ):
            AcceleratorState._reset_state()
    # Launched as several processes (torchrun) on a machine without CUDA: DDP over gloo on CPU.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = config.cpu or (launched and not torch.cuda.is_available())
    try:
        accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            cpu=cpu,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
    except (ValueError, RuntimeError) as err:
        raise ConfigError(
            f"mixed_precision={config.mixed_precision!r}: accelerate says: {err}"
        ) from err
    if fsdp_requested() and accelerator.num_processes > 1:  # one process has nothing to shard
        _use_fsdp2(accelerator)
    return accelerator


def fsdp_requested() -> bool:
    """Whether the launch asks for FSDP (``accelerate launch`` with an FSDP config sets it).

    Example:
        >>> import os
        >>> fsdp_requested() == (os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true")
        True
    """
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _use_fsdp2(accelerator: Any) -> None:
    """Check the launch's FSDP plugin is FSDP2, and on CPU give it to the Accelerator."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    plugin = state.fsdp_plugin if state.distributed_type == DistributedType.FSDP else None
    if plugin is None:  # accelerate enables FSDP on accelerators only: the CPU (gloo) case
        plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* environment
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)
        state.fsdp_plugin = plugin
        state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if getattr(plugin, "fsdp_version", 1) != 2:
        raise ConfigError(
            f"the accelerate config asks for FSDP version {getattr(plugin, 'fsdp_version', 1)}; "
            "dynconvert shards with FSDP2 (fully_shard): set fsdp_version: 2 (see "
            "examples/accelerate/fsdp.yaml), with an accelerate that has it (upgrade accelerate)"
        )


def restore_forward(model: nn.Module, saved: Any) -> None:
    """Undo accelerate's mixed-precision wrapping of ``forward`` (its own unwrap would bind a
    callable-object forward, such as a converted model's, as a method).

    Args:
        model: The model ``accelerator.prepare`` was given.
        saved: ``model.__dict__.get("forward", MISSING)`` taken before ``prepare``.

    Example:
        >>> import torch.nn as nn
        >>> m = nn.Linear(1, 1); m.forward = print
        >>> restore_forward(m, MISSING); "forward" in m.__dict__
        False
    """
    model.__dict__.pop("_original_forward", None)
    if saved is MISSING:
        model.__dict__.pop("forward", None)
    else:
        model.forward = saved


def sharding_of(accelerator: Any) -> str:
    """ "fsdp" when the accelerator shards the model (its FSDP plugin), else "none".

    Example:
        >>> from dynconvert.calibration.config import CalibrationConfig
        >>> sharding_of(make_accelerator(CalibrationConfig(target=0.5)))
        'none'
    """
    from accelerate.utils import DistributedType

    return "fsdp" if accelerator.distributed_type == DistributedType.FSDP else "none"
