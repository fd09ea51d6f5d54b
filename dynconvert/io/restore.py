"""The steps of ``load``: find the record, rebuild or check the base model, read the plan and the
weights, and refuse whatever does not fit, each with a ``RecordError`` that says what to do.

``save.load`` calls them in order; nothing here changes the base model, so a refused folder
leaves it unconverted.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynconvert.analysis.convmlp import routable_conv
from dynconvert.analysis.graph import linear_like, routable_linear
from dynconvert.config import ConvertConfig
from dynconvert.errors import RecordError
from dynconvert.io.record import RECORD
from dynconvert.plan import Plan
from dynconvert.runtime.bank import RouterBank
from dynconvert.runtime.state import is_converted

_FUSED = re.compile(r"\.(to_qkv|to_kv|to_added_qkv)\.(weight|bias)$")
"""Weights diffusers ``fuse_qkv_projections()`` adds (copies of the q/k/v weights)."""


def record_folder(path: Path) -> Path:
    """The folder holding the record: ``path``, or the one component of a pipeline folder that
    has one (``pipe.save_pretrained`` writes each component into its own subfolder).

    Example:
        >>> record_folder(Path("out/pipeline"))  # doctest: +SKIP
        PosixPath('out/pipeline/transformer')
    """
    if (path / RECORD).is_file() or not (path / "model_index.json").is_file():
        return path
    found = [sub for sub in sorted(path.iterdir()) if (sub / RECORD).is_file()]
    if len(found) == 1:
        return found[0]
    if not found:
        raise RecordError(
            f"the pipeline folder {path} holds no converted component ({RECORD} in a subfolder)"
        )
    names = ", ".join(sub.name for sub in found)
    raise RecordError(
        f"the pipeline folder {path} holds several converted components ({names}); "
        "pass one subfolder"
    )


def rebuild_base(record: dict[str, Any], directory: Path) -> nn.Module:
    """A fresh original model from the record alone: its built-in preset, or a diffusers model
    from the folder's config.json.

    Raises:
        RecordError: Neither is possible; the message asks for ``base_model=``.

    Example:
        >>> base = rebuild_base(read_record("runs/digits"), Path("runs/digits"))  # doctest: +SKIP
    """
    if record.get("preset"):
        from dynconvert.models import build_model

        try:
            return build_model(record["preset"], **record.get("preset_kwargs", {}))
        except (TypeError, ValueError) as e:  # preset_kwargs the preset does not take
            raise RecordError(
                f"the record in {directory} cannot rebuild its model ({e}); save the model again"
            ) from e
    if (directory / "config.json").is_file():
        return _base_from_config(directory, record["model_class"])
    raise RecordError(
        f"the record in {directory} is for {record['model_class']}, which is not a built-in "
        "preset; pass base_model= a freshly built original (e.g. from_pretrained)"
    )


def _base_from_config(directory: Path, model_class: str) -> nn.Module:
    """A fresh diffusers model of ``model_class`` built from the folder's config.json."""
    module, _, name = model_class.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        return cls.from_config(cls.load_config(str(directory)))
    except (ImportError, AttributeError, OSError, ValueError, TypeError) as e:
        raise RecordError(
            f"cannot build {model_class} from {directory / 'config.json'} ({e}); pass base_model= "
            "a freshly built original (e.g. from_pretrained)"
        ) from e


def check_base(base_model: nn.Module, record: dict[str, Any], directory: Path) -> None:
    """Refuse a base model that is converted already or of another class than the record's.

    The record's class path may be an older name of the same class: a module that moved still
    imports under its old name (``dynconvert.MOVED``) or re-exports the class, so the path is
    resolved, within the base model's own top-level package, before the two are compared.

    Example:
        >>> folder = Path("runs/digits")
        >>> check_base(tiny_dit(), read_record(folder), folder)  # doctest: +SKIP
        Traceback (most recent call last):
        ...
        dynconvert.errors.RecordError: the record in runs/digits is for ..., but base_model is ...
    """
    if is_converted(base_model):
        raise RecordError("base_model is already converted; pass a freshly built original model")
    cls = type(base_model)
    model_class = f"{cls.__module__}.{cls.__qualname__}"
    if model_class != record["model_class"] and _resolve(record["model_class"], cls) is not cls:
        raise RecordError(
            f"the record in {directory} is for {record['model_class']}, but base_model is "
            f"{model_class}; pass the model it was saved from"
        )


def _resolve(path: str, cls: type) -> Any:
    """The object ``path`` ("package.module.Class") names, or None; only modules of ``cls``'s
    own top-level package are imported (they are installed, and the record names them)."""
    module, _, name = path.rpartition(".")
    if module.split(".")[0] != cls.__module__.split(".")[0]:
        return None
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def plan_and_config(record: dict[str, Any], directory: Path) -> tuple[Plan, ConvertConfig]:
    """The record's plan (an older plan version is migrated by ``Plan.from_dict``) and its
    convert settings.

    Raises:
        RecordError: Either does not parse.

    Example:
        >>> plan, config = plan_and_config(record, Path("runs/digits"))  # doctest: +SKIP
    """
    try:
        plan = Plan.from_dict(record["plan"])
        cfg = dict(record["config"])
        from dynconvert.analysis.importance import IMPORTANCE

        if cfg.get("importance") not in IMPORTANCE:
            cfg["importance"] = "magnitude"  # the chosen units are in the record
        config = ConvertConfig.from_dict(cfg)
    except (TypeError, KeyError, ValueError) as e:
        raise RecordError(
            f"the record in {directory} is corrupt ({e}); save the model again"
        ) from e
    return plan, config


def check_plan_matches(plan: Plan, model: nn.Module) -> None:
    """Refuse a plan whose sites name Linears (or modules) this model lacks or has smaller.

    Example:
        >>> check_plan_matches(plan, base_model)  # doctest: +SKIP
    """
    modules = dict(model.named_modules())
    for s in plan.sites:
        for m in s.maps():
            lin = modules.get(m.linear)
            if lin is None or not (routable_linear(lin) or linear_like(lin) or routable_conv(lin)):
                raise RecordError(
                    f"the record refers to {m.linear}, which this model does not have as an "
                    "nn.Linear; the record is from another model"
                )
            idx = max(max(m.indices(u)) for u in range(m.units))
            size = lin.weight.shape[0 if m.axis == "rows" else 1]
            if idx >= size:
                raise RecordError(
                    f"{m.linear} is smaller than in the record; the record is from another model"
                )
        if s.name and s.name not in modules:
            raise RecordError(
                f"the record refers to module {s.name}, missing here; the record is from "
                "another model"
            )


def read_weights(directory: Path, record: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every weight of the folder (its file or shards), tied weights restored from the aliases.

    Example:
        >>> state = read_weights(Path("runs/digits"), record)  # doctest: +SKIP
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    info = record["weights"]
    files = info.get("shards") or [info["file"]]  # a sharded save_pretrained: its shards
    state: dict[str, torch.Tensor] = {}
    try:
        for name in files:
            path = directory / name
            if not path.is_file():
                raise OSError(f"{path} is missing")
            if name.endswith(".safetensors"):
                state.update(load_file(str(path)))
            else:  # save_pretrained(safe_serialization=False): a torch pickle of tensors only
                state.update(torch.load(path, map_location="cpu", weights_only=True))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise RecordError(
            f"cannot read the weights in {directory}: {e}; save the model again"
        ) from e
    for alias, kept in record.get("aliases", {}).items():
        if kept not in state:
            raise RecordError(
                f"the record in {directory} aliases {alias} to {kept}, which its weights lack; "
                "save the model again"
            )
        state[alias] = state[kept]
    return state


def check_weights_fit(
    state: dict[str, torch.Tensor],
    model: nn.Module,
    plan: Plan,
    config: ConvertConfig,
    directory: Path,
) -> None:
    """Refuse weights whose names or shapes differ from those of ``model`` converted by
    ``plan`` (its own weights plus the routers under ``dynconvert.``).

    diffusers' ``fuse_qkv_projections()`` adds copies of the q/k/v weights (to_qkv, to_kv); a
    model saved fused carries them, a freshly built one has none: they are dropped from
    ``state`` here (they hold no information of their own).

    Example:
        >>> check_weights_fit(state, base_model, plan, config, Path("out"))  # doctest: +SKIP
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with torch.device("meta"):
        bank = RouterBank(plan, config, 1.0)
    expected.update({f"dynconvert.{k}": tuple(v.shape) for k, v in bank.state_dict().items()})
    for k in [k for k in state if k not in expected and _FUSED.search(k)]:
        del state[k]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise RecordError(
            f"the weights in {directory} do not fit this model: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise RecordError(
                f"weight {k} has shape {tuple(state[k].shape)} in {directory}, "
                f"model expects {shape}"
            )
