"""Calibration under FSDP2 (``fully_shard`` through accelerate's FSDP plugin).

What changes when the accelerator shards the model (``distributed.sharding_of``):

- **Units**: one per transformer block of the plan (the plugin's transformer wrap policy, with
  the blocks' classes filled in when the accelerate config names none), plus the root unit.
  The routers live in the RouterBank, a submodule of the root, so they are sharded with the
  root unit and gathered once per forward; the routing state of a call (masks, records) is
  plain Python on the bank and never sharded.
- **EMA**: its shadow is made after sharding, from the sharded parameters (DTensors with the
  parameters' placements): each process holds its shard, never a full copy.
- **Checkpoints**: the plugin's ``state_dict_type``. ``FULL_STATE_DICT``: one file, the same as
  DDP's (model, EMA and optimizer gathered on the main process, the optimizer keyed by parameter
  index), so a run may move between DDP and FSDP and change its number of processes.
  ``SHARDED_STATE_DICT``: a folder ``step-0000100/`` written by torch.distributed.checkpoint
  (each process its shards; resharded on load) plus ``meta.pt`` (step, history, RNG states).
- **Result**: the EMA weights gathered into an unsharded copy of the model on the main process
  (made on the meta device before sharding, so it costs nothing until filled); the pipeline
  saves it as the same single folder as ever. The other processes get ``None``.

The FLOPs term is per process, as under DDP; FSDP averages the gradients.

Example:
    >>> import torch.nn as nn
    >>> skeleton = unsharded_skeleton(nn.Linear(2, 2))
    >>> skeleton.weight.device.type
    'meta'
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from dynconvert.errors import CheckpointError, ConfigError


def wrap_blocks(accelerator: Any, model: nn.Module, blocks: list[str]) -> list[str]:
    """Make the FSDP plugin shard one unit per transformer block (before ``prepare``).

    A transformer wrap policy without class names, or no policy, gets the classes of the
    plan's blocks; a policy the accelerate config names (size based, or given classes) is kept.

    Returns:
        The class names the plugin wraps (empty when it keeps its own policy).
    """
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = accelerator.state.fsdp_plugin
    if plugin.activation_checkpointing:
        raise ConfigError(
            "the accelerate config sets fsdp_activation_checkpointing: its recomputation would "
            "draw "
            "new router noise; set it to false and use calibration.gradient_checkpointing=true"
        )
    policy = plugin.auto_wrap_policy
    if policy not in (None, transformer_auto_wrap_policy) or plugin.transformer_cls_names_to_wrap:
        return []
    names = sorted({type(model.get_submodule(b)).__name__ for b in blocks if b})
    plugin.auto_wrap_policy = transformer_auto_wrap_policy
    plugin.transformer_cls_names_to_wrap = names
    return names


def unsharded_skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters are on the meta device (nothing allocated).

    Made before sharding (``fully_shard`` replaces the parameters in place); filled with the
    gathered weights at the end by ``load_state_dict(..., assign=True)``.
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    return copy.deepcopy(model, memo)


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (a sharded parameter or EMA shadow)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The sharded model's full state dict on the CPU of the main process (empty elsewhere).

    Every process must call it (it gathers).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def full_shadow(shadow: dict[str, torch.Tensor], main: bool) -> dict[str, torch.Tensor]:
    """The EMA shadow gathered, on the CPU of the main process (empty elsewhere)."""
    out = {}
    for name, value in shadow.items():
        full = value.full_tensor() if is_dtensor(value) else value
        if main:
            out[name] = full.detach().cpu()
    return out


def shard_like(full: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Full tensors (an EMA shadow from a checkpoint) sharded like the model's parameters."""
    from torch.distributed.tensor import distribute_tensor

    params = dict(model.named_parameters())
    out = {}
    for name, value in full.items():
        p = params[name]
        value = value.to(device=p.device, dtype=torch.float32)
        out[name] = (
            distribute_tensor(value, p.device_mesh, p.placements) if is_dtensor(p) else value
        )
    return out


def optimizer_by_index(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """A full optimizer state keyed by parameter name -> keyed by index (``optimizer.state_dict``'s
    layout, as DDP writes it), ``names`` in the optimizer's order."""
    index = {n: i for i, n in enumerate(names)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[n]: v for n, v in state["state"].items()}, "param_groups": groups}


def optimizer_by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of :func:`optimizer_by_index`."""
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {names[i]: v for i, v in state["state"].items()}, "param_groups": groups}


def full_optimizer_state(model: nn.Module, optimizer: Any, names: list[str]) -> dict[str, Any]:
    """The sharded optimizer's full state, keyed by index, on the main process (gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_optimizer_state_dict(model, _unwrap(optimizer), options=options)
    return optimizer_by_index(state, names) if state.get("state") is not None else state


def load_full_optimizer_state(
    model: nn.Module, optimizer: Any, state: dict[str, Any], names: list[str]
) -> None:
    """Load a full, index-keyed optimizer state (a DDP or FSDP full checkpoint) into the
    sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(
        model, _unwrap(optimizer), optimizer_by_name(state, names), options=options
    )


def _unwrap(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def gather_result(
    model: nn.Module, ema: Any, skeleton: nn.Module, main: bool
) -> tuple[nn.Module | None, dict[str, torch.Tensor]]:
    """The calibrated model, unsharded, on the main process: the raw weights gathered, then the
    EMA weights copied into the shards and gathered into ``skeleton``.

    Returns:
        ``(model with the EMA weights or None, the raw weights)``; on other processes
        ``(None, {})``.
    """
    raw = full_model_state(model)
    ema.copy_to(model)
    averaged = full_model_state(model)
    if not main:
        return None, {}
    skeleton.load_state_dict(averaged, assign=True)
    return skeleton, raw


def prepare_sharding(
    accelerator: Any, model: nn.Module, resumed: dict[str, Any] | None, sharded: bool
) -> nn.Module | None:
    """Before ``accelerator.prepare``: one FSDP unit per block, and the meta-device copy the
    result is gathered into (None without FSDP).

    Raises:
        CheckpointError: The run resumes a sharded checkpoint folder without FSDP.
    """
    from dynconvert.runtime.state import get_state

    if resumed is not None and resumed.get("kind") == "fsdp-sharded" and not sharded:
        raise CheckpointError(
            f"checkpoint {resumed['path']} is sharded (written by an FSDP run): resume it with "
            "accelerate launch --config_file examples/accelerate/fsdp.yaml, or write full "
            "checkpoints (fsdp_state_dict_type: FULL_STATE_DICT), which any run resumes"
        )
    if not sharded:
        return None
    wrap_blocks(accelerator, model, get_state(model).plan.blocks)
    return unsharded_skeleton(model)


def finish_unsharded(result: nn.Module | None, sharded: nn.Module, device: Any) -> nn.Module | None:
    """The gathered model with what the sharded one had restored: requires_grad flags, label
    dropout and routing mode (the copy was made mid-setup); on ``device``."""
    from dynconvert.calibration.adapters import label_embedders
    from dynconvert.runtime.routing import set_routing
    from dynconvert.runtime.state import get_state

    if result is None:
        return None
    flags = {n: p.requires_grad for n, p in sharded.named_parameters()}
    for n, p in result.named_parameters():
        p.requires_grad_(flags.get(n, p.requires_grad))
    for mine, theirs in zip(label_embedders(result), label_embedders(sharded), strict=True):
        mine.dropout_prob = theirs.dropout_prob
    set_routing(result, get_state(sharded).mode)
    return result.to(device)
