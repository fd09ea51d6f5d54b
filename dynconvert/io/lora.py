"""LoRA adapters in a saved folder: written beside the model as standard peft/diffusers files,
read back (with peft) on load.

A converted model saved with unmerged LoRA layers (``calibration.lora_save=adapter``, or any
routed adapter left unmerged) keeps the base model's weights in its weights file, under their
usual names (the adapters lifted off while the state dict is read, ``runtime/lora.py``), and
each adapter as peft writes one: ``adapter_model.safetensors`` (keys ``<module>.lora_A.weight``,
...) with ``adapter_config.json`` beside it and the config also in the file's metadata under
``lora_adapter_metadata`` (what diffusers' ``load_lora_adapter`` reads). One adapter goes in the
folder itself, several each in a subfolder named after it. The record's ``lora`` entry lists
them (with fingerprints) and the TD-LoRA gates, if any; :func:`load_adapters` puts them back.

A model whose adapters were merged (the calibration default) has no ``lora`` entry and loads
without peft.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynconvert.errors import RecordError
from dynconvert.io.commit import Writer
from dynconvert.io.files import file_digest
from dynconvert.io.record import current_file
from dynconvert.io.weights import write_safetensors
from dynconvert.runtime.lora import is_lora, lifted
from dynconvert.runtime.lora_run import add_gates
from dynconvert.runtime.state import get_state

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
METADATA_KEY = "lora_adapter_metadata"
"""safetensors metadata key holding the LoRA config (diffusers reads the config from it)."""


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the LoRA adapters on ``model`` (in the order they were added).

    Example:
        >>> adapter_names(model)  # doctest: +SKIP
        ['dynconvert']
    """
    names: dict[str, None] = {}
    for m in model.modules():
        if is_lora(m):
            names.update(dict.fromkeys(m.lora_A.keys()))
    return list(names)


def adapter_files(model: nn.Module) -> tuple[dict[str, Any] | None, dict[str, Writer]]:
    """The record's ``lora`` entry for ``model`` (None without adapters and TD-LoRA gates) and a
    writer per adapter file, by its name in the folder: the save writes them with the weights,
    before its commit point (``commit.py``), so a save stopped anywhere leaves either the old
    adapters or the new ones loading.

    Example:
        >>> record["lora"], writers = adapter_files(model)  # doctest: +SKIP
    """
    names = adapter_names(model)
    gates = _gates_record(model)
    if not names:
        return ({"adapters": {}, **gates} if gates else None), {}
    from peft import get_peft_model_state_dict

    configs = getattr(model, "peft_config", {})
    entry: dict[str, Any] = {"adapters": {}, "active": _active(model), **gates}
    writers: dict[str, Writer] = {}
    for name in names:
        if name not in configs:
            raise RecordError(
                f"the LoRA adapter {name!r} has no config in model.peft_config, so it cannot be "
                "saved as a peft adapter; add adapters with peft or diffusers, or merge them first"
            )
        sub = "." if len(names) == 1 else name
        if not _folder_ok(sub):
            raise RecordError(
                f"the LoRA adapter name {name!r} cannot name a folder; rename the adapter "
                "(letters, digits, '-', '_')"
            )
        state = get_peft_model_state_dict(model, adapter_name=name)
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        text = json.dumps(configs[name].to_dict(), indent=2, sort_keys=True, default=_jsonable)
        meta = {"format": "pt", "producer": "dynconvert", METADATA_KEY: text}
        data = io.BytesIO()
        write_safetensors(data, tensors, meta)  # in memory: its fingerprint goes in the record
        blob = data.getvalue()
        weights, config = _in(sub, ADAPTER_WEIGHTS), _in(sub, ADAPTER_CONFIG)
        writers[weights] = lambda f, b=blob: f.write(b)
        writers[config] = lambda f, t=(text + "\n").encode(): f.write(t)
        fingerprint = [len(blob), hashlib.sha256(blob).hexdigest()]  # as file_digest gives it
        entry["adapters"][name] = {"folder": sub, "fingerprint": fingerprint}
    return entry, writers


def _folder_ok(sub: Any) -> bool:
    """An adapter's folder: the saved folder itself, or one plain subfolder name of it."""
    return sub == "." or (
        isinstance(sub, str) and sub not in ("", "..") and "/" not in sub and "\\" not in sub
        and "\0" not in sub and len(sub.encode("utf-8", "surrogateescape")) <= 255
    )  # fmt: skip


def _in(sub: str, name: str) -> str:
    """A file's name in the saved folder ("/"-separated; "." is the folder itself)."""
    return name if sub == "." else f"{sub}/{name}"


def _digest(path: Path, root: Path) -> list:
    """[size, sha256] of an adapter file (as the record keeps it)."""
    return list(file_digest(path, root=root))


def _jsonable(value: Any) -> Any:
    """JSON form of config values json does not know (sets of target modules, enums)."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)


def _active(model: nn.Module) -> list[str]:
    for m in model.modules():
        if is_lora(m):
            return list(m.active_adapters)
    return []


def _gates_record(model: nn.Module) -> dict[str, Any]:
    """The TD-LoRA gates of a converted model as the record keeps them ({} without any)."""
    gates = get_state(model).lora_gates
    if not len(gates):
        return {}
    first = next(iter(gates.values()))
    return {"gates": {"names": [k.replace(":", ".") for k in gates], "rank": first.out_features}}


GATES_PREFIX = "dynconvert.lora_gates."


def pop_gates(
    state: dict[str, torch.Tensor], record: dict[str, Any], directory: Path
) -> dict[str, torch.Tensor]:
    """Take the TD-LoRA gates' weights out of a saved ``state`` (the rest is checked against
    the converted model as usual), checked against the gates the record lists.

    Raises:
        RecordError: the weights hold other gates than the record lists.
    """
    gates = {k: state.pop(k) for k in [k for k in state if k.startswith(GATES_PREFIX)]}
    listed = ((record.get("lora") or {}).get("gates") or {}).get("names", [])
    expected = {
        f"{GATES_PREFIX}{n.replace('.', ':')}.{p}" for n in listed for p in ("weight", "bias")
    }
    if set(gates) != expected:
        raise RecordError(
            f"the TD-LoRA gates in the weights of {directory} differ from those its record lists; "
            "save the model again"
        )
    return gates


def restore_gates(model: nn.Module, record: dict[str, Any]) -> None:
    """Create the TD-LoRA gates a record lists (before its weights are loaded into them)."""
    gates = (record.get("lora") or {}).get("gates")
    if gates:
        add_gates(get_state(model), list(gates["names"]), int(gates["rank"]))


def load_adapters(model: nn.Module, directory: Path, record: dict[str, Any]) -> None:
    """Put back the LoRA adapters a record lists (needs peft). Each adapter's config is read
    from its weights file's metadata (which the fingerprint covers), and each file from its
    staged copy while a re-save is between its commit and its renames (``commit.py``).

    Raises:
        RecordError: peft is not installed, or an adapter file is missing, changed or does
            not fit the model.
    """
    adapters = (record.get("lora") or {}).get("adapters") or {}
    if not adapters:
        return
    try:
        from peft import inject_adapter_in_model, set_peft_model_state_dict
    except ImportError:
        raise RecordError(
            f"{directory} keeps LoRA adapters as peft files ({', '.join(adapters)}): install peft "
            "(pip install peft) to load it, or save it again with the adapters merged "
            "(calibration.lora_save=merge, or fuse_lora / merge_and_unload before saving)"
        ) from None
    from safetensors.torch import load_file

    for name, info in adapters.items():
        if not isinstance(info, dict) or not _folder_ok(info.get("folder")):
            raise RecordError(
                f"the record of {directory} names no folder inside it for the LoRA adapter "
                f"{name!r}; save the model again"
            )
        path = directory / current_file(
            directory, record.get("weights", {}), _in(info["folder"], ADAPTER_WEIGHTS)
        )
        if not path.is_file() or _digest(path, directory) != info["fingerprint"]:
            raise RecordError(
                f"the LoRA adapter {name!r} of {directory} ({path}) is missing or not the one "
                "saved; save the model again"
            )
        try:
            inject_adapter_in_model(_config(path), model, adapter_name=name)
            result = set_peft_model_state_dict(model, load_file(str(path)), adapter_name=name)
        except (ValueError, KeyError, RuntimeError, OSError) as e:
            raise RecordError(
                f"could not load the LoRA adapter {name!r} of {directory}: {e}"
            ) from e
        if getattr(result, "unexpected_keys", None):
            raise RecordError(
                f"the LoRA adapter {name!r} of {directory} holds weights this model lacks "
                f"({', '.join(result.unexpected_keys[:3])}); it is from another model"
            )
    active = [a for a in record["lora"].get("active", []) if a in adapters]
    for m in model.modules():
        if is_lora(m) and active:
            m.set_adapter(active)


def _config(path: Path) -> Any:
    """The peft LoraConfig kept in an adapter file's metadata (as peft reads adapter_config)."""
    from peft import LoraConfig
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        text = (f.metadata() or {}).get(METADATA_KEY)
    if text is None:
        raise ValueError(f"{path} has no {METADATA_KEY} metadata")
    return LoraConfig.from_peft_type(**LoraConfig.check_kwargs(**json.loads(text)))


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with the LoRA layers lifted off: the base model's keys only."""
    with lifted(model):
        return model.state_dict()
