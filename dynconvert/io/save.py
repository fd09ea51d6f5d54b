"""save / load: weights as safetensors plus a small JSON record of what convert did.

A saved folder holds two files (three for a diffusers model, with its config.json):

- ``model.safetensors``: every weight of the converted model (original names, plus routers
  under ``dynconvert.``);
- ``dynconvert.json``: the record (``record.py``: the plan, router settings, budget, always-on
  units, per-timestep width masks and FLOPs ratio, dtypes, the sha256 of the weights, and for
  built-in models the preset that rebuilds the base).

Each file is written whole or not at all, no link followed (``files.py``), and a save over an
earlier one is all or nothing, with the record as its commit point (``commit.py``).

``load`` replays the record onto a freshly built original model (modelopt's save/restore
pattern): analysis does not run again, so loading needs no example inputs. Its steps and checks
are ``restore.py`` and ``weights.py``. The names of ``files.py`` and ``record.py`` are
re-exported here, where the rest of the package imports them from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from dynconvert.convert import apply_plan, revert
from dynconvert.errors import RecordError
from dynconvert.io.commit import Writer, commit_save
from dynconvert.io.convention import check_timestep_convention
from dynconvert.io.files import atomic_write_bytes, file_digest
from dynconvert.io.lora import (
    base_state_dict,
    load_adapters,
    pop_gates,
    restore_gates,
    save_adapters,
)
from dynconvert.io.record import (
    DIFFUSERS_WEIGHTS,
    FORMAT,
    FORMAT_VERSION,
    RECORD,
    WEIGHTS,
    build_record,
    check_record,
    check_record_units,
    decode_masks,
    encode_masks,
    read_record,
    width_ratio_per_t,
)
from dynconvert.io.restore import (
    check_base,
    check_plan_matches,
    plan_and_config,
    rebuild_base,
    record_folder,
)
from dynconvert.io.weights import (
    atomic_save_tensors,
    check_record_tables,
    check_weights_fit,
    read_weights,
    write_safetensors,
)
from dynconvert.runtime.planned.controls import load_capacity_record
from dynconvert.runtime.planned.graphs import enable_cuda_graphs
from dynconvert.runtime.state import get_state
from dynconvert.version import __version__

__all__ = [
    "CONFIG_NOTE_KEY",
    "DIFFUSERS_WEIGHTS",
    "FORMAT",
    "FORMAT_VERSION",
    "RECORD",
    "WEIGHTS",
    "atomic_save_tensors",
    "atomic_write_bytes",
    "build_record",
    "check_record",
    "check_record_units",
    "config_note",
    "decode_masks",
    "encode_masks",
    "is_diffusers_model",
    "load",
    "read_record",
    "save",
    "width_ratio_per_t",
    "write_diffusers_config",
    "write_pretrained_record",
]


def save(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    flops_ratio_per_t: list[float] | None = None,
    extra: dict | None = None,
) -> Path:
    """Save a converted model: ``model.safetensors`` + ``dynconvert.json``, written atomically.

    Args:
        model: a converted model.
        directory: output folder (created if needed).
        flops_ratio_per_t: the measured FLOPs ratio at each of the 1000 timesteps (calibration
            provides it from real data); by default the ratio from the width masks with every
            token kept is recorded, and the record says so.
        extra: more JSON-ready fields for the record (e.g. the calibration summary).

    Example:
        >>> dynconvert.save(model, "out/")               # doctest: +SKIP
        >>> model = dynconvert.load("out/")              # doctest: +SKIP
    """
    out = Path(directory)
    record = build_record(model, flops_ratio_per_t, extra)
    tensors, aliases = _dedupe(base_state_dict(model))  # LoRA layers: their own files (lora.py)
    record["aliases"] = aliases
    lora = save_adapters(model, out)
    if lora is not None:
        record["lora"] = lora
    # A diffusers model's folder is also a from_pretrained folder (its static weights).
    weights = DIFFUSERS_WEIGHTS if is_diffusers_model(model) else WEIGHTS
    meta = {"format": "pt", "producer": "dynconvert"}
    files: dict[str, Writer] = {weights: lambda f: write_safetensors(f, tensors, meta)}
    if is_diffusers_model(model):
        config = diffusers_config(model)
        files["config.json"] = lambda f: f.write(config)
    commit_save(out, record, files, weights)
    return out


CONFIG_NOTE_KEY = "_dynconvert"
"""Key of the note in a converted model's config.json (diffusers ignores keys starting with _)."""


def is_diffusers_model(model: nn.Module) -> bool:
    """True for a diffusers ``ModelMixin`` (it has ``save_pretrained`` and a config)."""
    return any(
        c.__name__ == "ModelMixin" and c.__module__.startswith("diffusers")
        for c in type(model).__mro__
    )


def config_note() -> str:
    """What a converted model's config.json says to whoever opens it with ``from_pretrained``."""
    return (
        f"converted by dynconvert {__version__}: from_pretrained gives back the static weights "
        f"(the routers under dynconvert.* are not used); dynconvert.load(folder) rebuilds the "
        f"converted model from {RECORD}"
    )


def diffusers_config(model: nn.Module) -> bytes:
    """The model's diffusers config.json, with :func:`config_note` under ``_dynconvert``."""
    config = json.loads(model.to_json_string())  # what save_config writes
    config[CONFIG_NOTE_KEY] = config_note()
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def write_diffusers_config(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write the model's diffusers config.json (:func:`diffusers_config`), atomically."""
    atomic_write_bytes(Path(directory) / "config.json", diffusers_config(model), root=directory)


def write_pretrained_record(
    model: nn.Module, directory: str | os.PathLike, files: list[str]
) -> Path:
    """Write ``dynconvert.json`` beside the weights diffusers ``save_pretrained`` wrote.

    Args:
        model: the converted model that was saved.
        directory: the save_pretrained folder.
        files: the weights file, or a shard index followed by its shards.

    Example:
        >>> files = ["diffusion_pytorch_model.safetensors"]
        >>> write_pretrained_record(model, "out/", files)  # doctest: +SKIP
    """
    out = Path(directory)
    record = build_record(model, extra={"saved_by": "save_pretrained"})
    record["aliases"] = {}
    digests = {name: file_digest(out / name, root=out) for name in files}
    record["weights"] = {
        "file": files[0],
        "bytes": digests[files[0]][0],
        "sha256": {name: digest for name, (_, digest) in digests.items()},
        "shards": list(files[1:]),
    }
    atomic_write_bytes(out / RECORD, json.dumps(record, indent=1).encode(), root=out)
    return out


def load(
    directory: str | os.PathLike,
    base_model: nn.Module | None = None,
    *,
    device: str | torch.device | None = None,
    timestep_scale: float | None = None,
    timestep_reverse: bool | None = None,
) -> nn.Module:
    """Rebuild a converted model: original model + record + weights.

    Args:
        directory: a folder written by :func:`save` or by a converted diffusers model's
            ``save_pretrained``, or a pipeline folder (``pipe.save_pretrained``) whose one
            converted component is then loaded (e.g. its ``transformer/``).
        base_model: a freshly built original (e.g. from diffusers ``from_pretrained``); for
            built-in presets and diffusers models it can be omitted: it is rebuilt from the
            record, or from the folder's config.json in the dtype of the saved weights.
        device: where to put the model (default: where ``base_model`` is, else CPU).
        timestep_scale, timestep_reverse: the timestep convention set on purpose at convert
            (``ConvertConfig``), for a model whose class has another or no known one; the
            record's is checked against the model's otherwise (``io/convention.py``).

    Returns:
        The converted model in eval mode (fast path), like ``from_pretrained``.

    Raises:
        RecordError: the folder is missing, corrupt, truncated, from a newer format, or from
            another model. The base model is left unconverted.

    Example:
        >>> model = dynconvert.load("runs/digits")                       # doctest: +SKIP
        >>> pipe.transformer = dynconvert.load("out/", pipe.transformer)  # doctest: +SKIP
    """
    directory = record_folder(Path(directory))
    record = read_record(directory)
    built = base_model is None
    if base_model is None:
        base_model = rebuild_base(record, directory)
    check_base(base_model, record, directory)
    plan, config = plan_and_config(record, directory)  # Plan.from_dict: older plans migrated
    check_record_units(record, plan, directory)
    check_plan_matches(plan, base_model)
    check_timestep_convention(
        plan, config, base_model, directory, (timestep_scale, timestep_reverse)
    )
    state = read_weights(Path(directory), record)
    gates = pop_gates(state, record, directory)  # TD-LoRA gates: checked against the record
    if built:  # a model rebuilt here takes the dtype it was saved in
        _to_saved_dtype(base_model, record, state)
    check_weights_fit(state, base_model, plan, config, directory, record)
    apply_plan(
        base_model, plan, config, float(record["budget"]), always_on=list(record["always_on"])
    )
    try:
        restore_gates(base_model, record)  # TD-LoRA gates, before their weights
        base_model.load_state_dict({**state, **gates}, strict=True)
    except Exception as e:
        revert(base_model)
        raise RecordError(f"could not load the weights of {directory}: {e}") from e
    try:
        check_record_tables(base_model, record, directory)
        load_adapters(base_model, Path(directory), record)  # unmerged LoRA adapters (peft)
    except RecordError:
        revert(base_model)
        raise
    # Inference as deployed: on CUDA the planned path (static shapes) under CUDA graphs, on
    # other devices the fast path; the user does nothing for either (planner.py, graphs.py).
    load_capacity_record(base_model, record.get("token_capacity"))
    get_state(base_model).execution = "auto"
    enable_cuda_graphs(base_model)
    if device is not None:
        base_model.to(device)
    return base_model.eval()


def _to_saved_dtype(model: nn.Module, record: dict, state: dict[str, torch.Tensor]) -> None:
    """Cast a rebuilt base model to the dtype of the saved model's weights (a format 1 record:
    the one floating dtype of the weights outside the routers, if there is one)."""
    name = record.get("dtypes", {}).get("model")
    if name is None:
        found = {
            v.dtype
            for k, v in state.items()
            if v.is_floating_point() and not k.startswith("dynconvert.")
        }
        dtype = found.pop() if len(found) == 1 else None
    else:
        dtype = getattr(torch, name) if name != "mixed" else None
    if dtype is not None:
        model.to(dtype)


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tied weights are stored once; the others become aliases (safetensors refuses shared
    memory)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    same: dict[tuple, str] = {}
    storages: set[int] = set()
    for k, v in state.items():
        v = v.detach()
        key = (
            v.untyped_storage().data_ptr(),
            v.storage_offset(),
            tuple(v.shape),
            tuple(v.stride()),
            v.dtype,
        )
        if v.numel() and key in same:
            aliases[k] = same[key]
            continue
        same[key] = k
        ptr = v.untyped_storage().data_ptr()
        t = v.contiguous().cpu()
        if v.numel() and (ptr in storages or t.untyped_storage().data_ptr() in storages):
            t = t.clone()  # a view into memory another tensor already uses
        storages.add(ptr)
        storages.add(t.untyped_storage().data_ptr())
        tensors[k] = t
    return tensors, aliases
