"""save / load: weights as safetensors plus a small JSON record of what convert did.

A saved folder holds two files, each written to a temporary name and renamed into place:

- ``model.safetensors``: every weight of the converted model (original names, plus routers
  under ``dynconvert.``);
- ``dynconvert.json``: the record (format and library version, the plan, router settings, the
  budget, the always-on units, the per-timestep width masks for t = 0..999 and the FLOPs ratio
  they give, and for built-in models the preset that rebuilds the base).

``load`` replays the record onto a freshly built original model (modelopt's save/restore
pattern): analysis does not run again, so loading needs no example inputs.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynconvert.analysis.convmlp import routable_conv
from dynconvert.analysis.graph import linear_like, routable_linear
from dynconvert.config import ConvertConfig
from dynconvert.convert import apply_plan, revert
from dynconvert.errors import RecordError
from dynconvert.flops import routed_ratio
from dynconvert.plan import PLAN_VERSION, ROUTER_TIMESTEPS, Plan
from dynconvert.runtime.bank import RouterBank
from dynconvert.runtime.planned.controls import capacity_record, load_capacity_record
from dynconvert.runtime.planned.graphs import enable_cuda_graphs
from dynconvert.runtime.state import get_state, is_converted
from dynconvert.version import __version__

FORMAT = "dynconvert"
FORMAT_VERSION = 1
RECORD = "dynconvert.json"
WEIGHTS = "model.safetensors"


def _library_version() -> str:
    return __version__


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_tensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None
) -> Path:
    """Write a safetensors file through a temporary file in the same folder, then rename.

    Example:
        >>> atomic_save_tensors({"w": torch.zeros(2)}, "/tmp/w.safetensors")  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:  # on disk before the rename: a crash leaves old or new
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _file_mode() -> int:
    """The mode a plainly created file would get (0o666 minus the umask); mkstemp gives 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fingerprint(path: Path) -> str:
    """sha256 of a file's size, first and last MiB (cheap check against truncation and swaps)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(2**20))
        if size > 2**20:
            f.seek(max(size - 2**20, 2**20))
            h.update(f.read(2**20))
    return h.hexdigest()


def encode_masks(table: torch.Tensor) -> list[list[Any]]:
    """(T, U) bool -> run-length segments ``[t_first, t_last, "0110..."]``."""
    rows = ["".join("1" if v else "0" for v in r) for r in table.cpu().tolist()]
    out: list[list[Any]] = []
    for t, bits in enumerate(rows):
        if out and out[-1][2] == bits:
            out[-1][1] = t
        else:
            out.append([t, t, bits])
    return out


def decode_masks(segments: list[list[Any]], steps: int = ROUTER_TIMESTEPS) -> torch.Tensor:
    """Inverse of :func:`encode_masks`."""
    units = len(segments[0][2])
    table = torch.zeros(steps, units, dtype=torch.bool)
    for first, last, bits in segments:
        table[first : last + 1] = torch.tensor([c == "1" for c in bits])
    return table


def width_ratio_per_t(
    bank: RouterBank, tables: dict[int, torch.Tensor], token_keep: torch.Tensor | None = None
) -> list[float]:
    """Whole-model FLOPs ratio at each t from the width masks (and a token keep rate per t)."""
    width = {i: t.double().mean(1) for i, t in tables.items()}  # {site: (T,) fraction on}
    per_t = routed_ratio(bank.plan, bank.config.token_reduction, width, token_keep)
    if not isinstance(per_t, torch.Tensor):  # no width router and no token keep: constant
        per_t = torch.full((ROUTER_TIMESTEPS,), float(per_t), dtype=torch.float64)
    return per_t.tolist()


def build_record(
    model: nn.Module, flops_ratio_per_t: list[float] | None = None, extra: dict | None = None
) -> dict[str, Any]:
    """The JSON record of a converted model."""
    bank = get_state(model)
    tables = bank.width_table()
    ratio = flops_ratio_per_t if flops_ratio_per_t is not None else width_ratio_per_t(bank, tables)
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": _library_version(),
        "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model_class": bank.plan.model_class,
        "preset": getattr(model, "preset", None),
        "preset_kwargs": dict(getattr(model, "preset_kwargs", {}) or {}),
        "budget": bank.budget,
        "config": bank.config.to_dict(),
        "plan": bank.plan.to_dict(),
        "always_on": [int(v) for v in bank.always_on.tolist()],
        "width_masks": {str(i): encode_masks(t) for i, t in tables.items()},
        "flops_ratio_per_t": [round(r, 6) for r in ratio],
        "flops_ratio_note": (
            "whole-model MACs ratio at each DDPM timestep 0..999 from the width masks"
            + (
                "; token keep rates as measured"
                if flops_ratio_per_t is not None
                else "; all tokens kept"
            )
        ),
        "mean_flops_ratio": sum(ratio) / len(ratio),
    }
    capacity = capacity_record(model)  # token capacities per t for the planned path (GPU)
    if capacity is not None:
        record["token_capacity"] = capacity
    if extra:
        record.update(extra)
    return record


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
    out.mkdir(parents=True, exist_ok=True)
    record = build_record(model, flops_ratio_per_t, extra)
    tensors, aliases = _dedupe(model.state_dict())
    record["aliases"] = aliases
    # A diffusers model's folder is also a from_pretrained folder (its static weights).
    weights = DIFFUSERS_WEIGHTS if is_diffusers_model(model) else WEIGHTS
    atomic_save_tensors(tensors, out / weights, metadata={"format": "pt", "producer": "dynconvert"})
    record["weights"] = {
        "file": weights,
        "fingerprint": _fingerprint(out / weights),
        "bytes": (out / weights).stat().st_size,
    }
    if is_diffusers_model(model):
        write_diffusers_config(model, out)
    atomic_write_bytes(out / RECORD, json.dumps(record, indent=1).encode())
    return out


DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
"""The weights file diffusers ``from_pretrained`` reads; ``save`` names a diffusers model's so."""
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


def write_diffusers_config(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write the model's diffusers config.json, with :func:`config_note` under ``_dynconvert``."""
    config = json.loads(model.to_json_string())  # what save_config writes
    config[CONFIG_NOTE_KEY] = config_note()
    atomic_write_bytes(
        Path(directory) / "config.json",
        (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
    )


def write_pretrained_record(
    model: nn.Module, directory: str | os.PathLike, files: list[str]
) -> Path:
    """Write ``dynconvert.json`` beside the weights diffusers ``save_pretrained`` wrote.

    Args:
        model: the converted model that was saved.
        directory: the save_pretrained folder.
        files: the weights file, or a shard index followed by its shards.

    Example:
        >>> write_pretrained_record(model, "out/", ["diffusion_pytorch_model.safetensors"])  # doctest: +SKIP
    """
    out = Path(directory)
    record = build_record(model, extra={"saved_by": "save_pretrained"})
    record["aliases"] = {}
    first = out / files[0]
    record["weights"] = {
        "file": files[0],
        "fingerprint": _fingerprint(first),
        "bytes": first.stat().st_size,
        "shards": list(files[1:]),
    }
    atomic_write_bytes(out / RECORD, json.dumps(record, indent=1).encode())
    return out


def read_record(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``dynconvert.json`` (format, version, weights file present and intact)."""
    path = Path(directory)
    rec_path = path / RECORD
    if not rec_path.is_file():
        raise RecordError(
            f"no {RECORD} in {path}; point to a folder written by dynconvert.io.save or by the "
            "save_pretrained of a converted model (a folder saved before conversion, or by "
            "ModelMixin.save_pretrained called on the class, has no record: save it again)"
        )
    try:
        record = json.loads(rec_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecordError(f"{rec_path} is corrupt ({e}); save the model again") from e
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise RecordError(f"{rec_path} is not a dynconvert record")
    version = record.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RecordError(
            f"{rec_path} has no valid format_version ({version!r}); save the model again"
        )
    if version > FORMAT_VERSION:
        raise RecordError(
            f"{rec_path} has format version {version}, newer than this dynconvert supports "
            f"({FORMAT_VERSION}); upgrade dynconvert (pip install -U dynconvert)"
        )
    check_record(record, rec_path)
    weights = path / record["weights"]["file"]
    if not weights.is_file():
        raise RecordError(
            f"{weights} is missing; copy the whole folder written by dynconvert.io.save"
        )
    if (
        weights.stat().st_size != record["weights"]["bytes"]
        or _fingerprint(weights) != record["weights"]["fingerprint"]
    ):
        raise RecordError(
            f"{weights} does not match its record (truncated, corrupt or from another save); "
            "copy the folder again or save the model again"
        )
    return record


_RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "plan": (dict,),
    "config": (dict,),
    "budget": (int, float),
    "always_on": (list,),
    "model_class": (str,),
    "weights": (dict,),
}


def check_record(record: dict[str, Any], rec_path: Path) -> None:
    """Check the fields of a record by type and range, and that its weights file is inside its
    folder (a plain file name: no folder part, not absolute).

    Raises:
        RecordError: The first bad field, named; the fix is to save the model again.
    """

    def bad(what: str) -> RecordError:
        return RecordError(f"{rec_path} is corrupt: {what}; save the model again")

    for key, kinds in _RECORD_FIELDS.items():
        if key not in record:
            raise RecordError(
                f"{rec_path} lacks {key!r}; it is truncated or corrupt, save the model again"
            )
        if not isinstance(record[key], kinds) or isinstance(record[key], bool):
            raise bad(f"{key} is {record[key]!r:.40}, not {' or '.join(k.__name__ for k in kinds)}")
    plan_version = record["plan"].get("version", 1)
    if isinstance(plan_version, bool) or not isinstance(plan_version, int) or plan_version < 1:
        raise bad(f"plan.version {plan_version!r} is not a version number")
    if plan_version > PLAN_VERSION:
        raise RecordError(
            f"{rec_path} has plan version {plan_version}, newer than this dynconvert supports "
            f"({PLAN_VERSION}); upgrade dynconvert (pip install -U dynconvert)"
        )
    if not 0.0 < record["budget"] <= 1.0:
        raise bad(f"budget {record['budget']} is outside (0, 1]")
    if not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in record["always_on"]
    ):
        raise bad("always_on must be a list of unit indices (integers >= 0)")
    w = record["weights"]
    name, size, fingerprint = w.get("file"), w.get("bytes"), w.get("fingerprint")
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise bad(f"weights.file {name!r} is not a file name inside the folder")
    if (
        isinstance(size, bool)
        or not isinstance(size, int)
        or size < 0
        or not isinstance(fingerprint, str)
    ):
        raise bad("weights.bytes or weights.fingerprint is missing or of the wrong type")
    shards = w.get("shards", [])  # a sharded save_pretrained: its shard files
    if not isinstance(shards, list) or not all(
        isinstance(n, str) and n and Path(n).name == n and n not in (".", "..") for n in shards
    ):
        raise bad("weights.shards must be a list of file names inside the folder")
    if not isinstance(record.get("aliases", {}), dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in record.get("aliases", {}).items()
    ):
        raise bad("aliases must map weight names to weight names")
    for key in ("preset_kwargs", "width_masks"):
        if key in record and not isinstance(record[key], dict):
            raise bad(f"{key} must be a mapping")
    if (
        "preset" in record
        and record["preset"] is not None
        and not isinstance(record["preset"], str)
    ):
        raise bad("preset must be a name or null")


def check_record_units(record: dict[str, Any], plan: Plan, directory: str | os.PathLike) -> None:
    """Refuse a record whose always-on units do not fit its plan (one per site, in range)."""
    always_on = record["always_on"]
    if len(always_on) != len(plan.sites):
        raise RecordError(
            f"the record in {directory} has {len(always_on)} always-on units for "
            f"{len(plan.sites)} sites; it is corrupt, save the model again"
        )
    for site, unit in zip(plan.sites, always_on):
        if unit >= max(site.units, 1):
            raise RecordError(
                f"the record in {directory} names always-on unit {unit} of site {site.name or site.index}, "
                f"which has {site.units}; it is corrupt, save the model again"
            )


def load(
    directory: str | os.PathLike,
    base_model: nn.Module | None = None,
    *,
    device: str | torch.device | None = None,
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

    Returns:
        The converted model in eval mode (fast path), like ``from_pretrained``.

    Raises:
        RecordError: the folder is missing, corrupt, truncated, from a newer format, or from
            another model. The base model is left unconverted.

    Example:
        >>> model = dynconvert.load("runs/digits")                       # doctest: +SKIP
        >>> pipe.transformer = dynconvert.load("out/", pipe.transformer)  # doctest: +SKIP
    """
    directory = _record_folder(Path(directory))
    record = read_record(directory)
    built = base_model is None
    if base_model is None:
        if record.get("preset"):
            from dynconvert.models import build_model

            try:
                base_model = build_model(record["preset"], **record.get("preset_kwargs", {}))
            except (TypeError, ValueError) as e:  # preset_kwargs the preset does not take
                raise RecordError(
                    f"the record in {directory} cannot rebuild its model ({e}); save the model again"
                ) from e
        elif (directory / "config.json").is_file():
            base_model = _base_from_config(directory, record["model_class"])
        else:
            raise RecordError(
                f"the record in {directory} is for {record['model_class']}, which is not a built-in "
                "preset; pass base_model= a freshly built original (e.g. from_pretrained)"
            )
    if is_converted(base_model):
        raise RecordError("base_model is already converted; pass a freshly built original model")
    model_class = f"{type(base_model).__module__}.{type(base_model).__qualname__}"
    if model_class != record["model_class"]:
        raise RecordError(
            f"the record in {directory} is for {record['model_class']}, but base_model is "
            f"{model_class}; pass the model it was saved from"
        )
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
    check_record_units(record, plan, directory)
    _check_plan_matches(plan, base_model)
    state = _read_weights(Path(directory), record)
    expected = _expected_shapes(base_model, plan, config)
    # diffusers fuse_qkv_projections() adds copies of the q/k/v weights (to_qkv, to_kv); a model
    # saved fused carries them, a freshly built one has none: they are dropped (no information).
    for k in [
        k
        for k in state
        if k not in expected and re.search(r"\.(to_qkv|to_kv|to_added_qkv)\.(weight|bias)$", k)
    ]:
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
                f"weight {k} has shape {tuple(state[k].shape)} in {directory}, model expects {shape}"
            )
    if built:  # a model rebuilt here takes the dtype the weights were saved in
        dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
        if len(dtypes) == 1:
            base_model.to(dtypes.pop())
    apply_plan(
        base_model, plan, config, float(record["budget"]), always_on=list(record["always_on"])
    )
    try:
        base_model.load_state_dict(state, strict=True)
    except Exception as e:
        revert(base_model)
        raise RecordError(f"could not load the weights of {directory}: {e}") from e
    # Inference as deployed: on CUDA the planned path (static shapes) under CUDA graphs, on
    # other devices the fast path; the user does nothing for either (planner.py, graphs.py).
    load_capacity_record(base_model, record.get("token_capacity"))
    get_state(base_model).execution = "auto"
    enable_cuda_graphs(base_model)
    if device is not None:
        base_model.to(device)
    return base_model.eval()


def _record_folder(path: Path) -> Path:
    """The folder holding the record: ``path``, or the one component of a pipeline folder that
    has one (``pipe.save_pretrained`` writes each component into its own subfolder)."""
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
        f"the pipeline folder {path} holds several converted components ({names}); pass one subfolder"
    )


def _base_from_config(directory: Path, model_class: str) -> nn.Module:
    """A fresh diffusers model of ``model_class`` built from the folder's config.json."""
    import importlib

    module, _, name = model_class.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        return cls.from_config(cls.load_config(str(directory)))
    except (ImportError, AttributeError, OSError, ValueError, TypeError) as e:
        raise RecordError(
            f"cannot build {model_class} from {directory / 'config.json'} ({e}); pass base_model= "
            "a freshly built original (e.g. from_pretrained)"
        ) from e


def _check_plan_matches(plan: Plan, model: nn.Module) -> None:
    modules = dict(model.named_modules())
    for s in plan.sites:
        for m in s.maps():
            lin = modules.get(m.linear)
            if lin is None or not (routable_linear(lin) or linear_like(lin) or routable_conv(lin)):
                raise RecordError(
                    f"the record refers to {m.linear}, which this model does not have as an nn.Linear; "
                    "the record is from another model"
                )
            idx = max(max(m.indices(u)) for u in range(m.units))
            size = lin.weight.shape[0 if m.axis == "rows" else 1]
            if idx >= size:
                raise RecordError(
                    f"{m.linear} is smaller than in the record; the record is from another model"
                )
        if s.name and s.name not in modules:
            raise RecordError(
                f"the record refers to module {s.name}, missing here; the record is from another model"
            )


def _read_weights(directory: Path, record: dict) -> dict[str, torch.Tensor]:
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
                f"the record in {directory} aliases {alias} to {kept}, which its weights lack; save the model again"
            )
        state[alias] = state[kept]
    return state


def _expected_shapes(
    model: nn.Module, plan: Plan, config: ConvertConfig
) -> dict[str, tuple[int, ...]]:
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with torch.device("meta"):
        bank = RouterBank(plan, config, 1.0)
    shapes.update({f"dynconvert.{k}": tuple(v.shape) for k, v in bank.state_dict().items()})
    return shapes


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tied weights are stored once; the others become aliases (safetensors refuses shared memory)."""
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
