"""The record of a converted model, ``dynconvert.json``: what it holds, and its checks.

It says what convert did, so that ``load`` can replay it onto a freshly built original model
(modelopt's save/restore pattern) without running the analysis again: the format and library
version, the plan, the router settings, the budget, the always-on units, the per-timestep width
masks for t = 0..999 (run-length encoded) and the FLOPs ratio they give, the token capacities
of the planned path, the dtypes of the model and of its routers, the weights file with its size
and the sha256 of every weights file (format 2; format 1 records kept a fingerprint of the
first and last MiB of one file, still read), and for built-in models the preset that rebuilds
the base. It is read by the bounded reader (``limits.py``), no link followed.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynconvert.errors import BudgetError, RecordError
from dynconvert.fields import shown
from dynconvert.flops import routed_ratio
from dynconvert.io.files import FileError, open_file
from dynconvert.io.limits import read_json
from dynconvert.plan import PLAN_VERSION, ROUTER_TIMESTEPS, Plan
from dynconvert.runtime.bank import RouterBank
from dynconvert.runtime.budgets import budget_range_of
from dynconvert.runtime.planned.controls import capacity_record
from dynconvert.runtime.state import get_state
from dynconvert.version import __version__

FORMAT = "dynconvert"
FORMAT_VERSION = 2
"""2: a sha256 of every weights file, the dtypes, and the staged files of a re-save."""
RECORD = "dynconvert.json"
WEIGHTS = "model.safetensors"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
"""The weights file diffusers ``from_pretrained`` reads; ``save`` names a diffusers model's so."""


def _library_version() -> str:
    return __version__


def encode_masks(table: torch.Tensor) -> list[list[Any]]:
    """(T, U) bool -> run-length segments ``[t_first, t_last, "0110..."]``.

    Example:
        >>> table = torch.zeros(1000, 2, dtype=torch.bool); table[500:, 1] = True
        >>> encode_masks(table)
        [[0, 499, '00'], [500, 999, '01']]
    """
    rows = ["".join("1" if v else "0" for v in r) for r in table.cpu().tolist()]
    out: list[list[Any]] = []
    for t, bits in enumerate(rows):
        if out and out[-1][2] == bits:
            out[-1][1] = t
        else:
            out.append([t, t, bits])
    return out


def decode_masks(segments: list[list[Any]], steps: int = ROUTER_TIMESTEPS) -> torch.Tensor:
    """Inverse of :func:`encode_masks`.

    Example:
        >>> decode_masks([[0, 499, "00"], [500, 999, "01"]]).sum(0).tolist()
        [0, 500]
    """
    units = len(segments[0][2])
    table = torch.zeros(steps, units, dtype=torch.bool)
    for first, last, bits in segments:
        table[first : last + 1] = torch.tensor([c == "1" for c in bits])
    return table


def width_ratio_per_t(
    bank: RouterBank, tables: dict[int, torch.Tensor], token_keep: torch.Tensor | None = None
) -> list[float]:
    """Whole-model FLOPs ratio at each t from the width masks (and a token keep rate per t).

    Example:
        >>> bank = get_state(model)  # doctest: +SKIP
        >>> ratios = width_ratio_per_t(bank, bank.width_table())  # doctest: +SKIP
    """
    width = {i: t.double().mean(1) for i, t in tables.items()}  # {site: (T,) fraction on}
    per_t = routed_ratio(bank.plan, bank.config.token_reduction, width, token_keep)
    if not isinstance(per_t, torch.Tensor):  # no width router and no token keep: constant
        per_t = torch.full((ROUTER_TIMESTEPS,), float(per_t), dtype=torch.float64)
    return per_t.tolist()


def build_record(
    model: nn.Module, flops_ratio_per_t: list[float] | None = None, extra: dict | None = None
) -> dict[str, Any]:
    """The JSON record of a converted model (the module docstring says what it holds).

    Example:
        >>> record = build_record(model, extra={"calibration": {"steps": 100}})  # doctest: +SKIP
    """
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
        # A budget-conditioned model's range (runtime/budgets.py); null: a single budget.
        "budget_range": list(bank.budget_range) if bank.budget_range else None,
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
    record["dtypes"] = saved_dtypes(model)
    capacity = capacity_record(model)  # token capacities per t for the planned path (GPU)
    if capacity is not None:
        record["token_capacity"] = capacity
    if extra:
        record.update(extra)
    return record


def saved_dtypes(model: nn.Module) -> dict[str, str]:
    """The dtype of the model's floating weights and of its routers (``"mixed"`` for several).

    Example:
        >>> saved_dtypes(dynconvert.convert(tiny_dit().half(), 0.5))  # doctest: +SKIP
        {'model': 'float16', 'routers': 'float32'}
    """
    found: dict[str, set[str]] = {"model": set(), "routers": set()}
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            part = "routers" if key.startswith("dynconvert.") else "model"
            found[part].add(str(value.dtype).removeprefix("torch."))
    return {
        part: names.pop() if len(names) == 1 and next(iter(names)) in DTYPES else "mixed"
        for part, names in found.items()
        if names
    }


def read_record(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``dynconvert.json``: format, version, fields, and its weights file present
    with the recorded size (its sha256 is checked as the weights are read: ``weights.py``).

    Raises:
        RecordError: What is wrong with the folder, and what to do.

    Example:
        >>> read_record("runs/digits")["preset"]  # doctest: +SKIP
        'digits'
    """
    path = Path(directory)
    rec_path = path / RECORD
    if not os.path.lexists(rec_path):
        raise RecordError(
            f"no {RECORD} in {path}; point to a folder written by dynconvert.io.save or by the "
            "save_pretrained of a converted model (a folder saved before conversion, or by "
            "ModelMixin.save_pretrained called on the class, has no record: save it again)"
        )
    record = read_json(rec_path, RecordError, root=path)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise RecordError(f"{rec_path} is not a dynconvert record")
    version = record.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RecordError(
            f"{rec_path} has no valid format_version ({shown(version)}); save the model again"
        )
    if version > FORMAT_VERSION:
        raise RecordError(
            f"{rec_path} has format version {version}, newer than this dynconvert supports "
            f"({FORMAT_VERSION}); upgrade dynconvert (pip install -U dynconvert)"
        )
    check_record(record, rec_path)
    info = record["weights"]
    weights = path / current_file(path, info, info["file"])
    try:
        fd = open_file(weights, root=path)
    except FileError as e:
        hint = "copy the whole folder written by dynconvert.io.save"
        missing = e.errno == errno.ENOENT
        raise RecordError(f"{weights} is missing; {hint}" if missing else f"{e}; {hint}") from None
    size = os.fstat(fd).st_size
    os.close(fd)
    if size != info["bytes"]:
        raise RecordError(
            f"{weights} does not match its record (truncated, corrupt or from another save); "
            "copy the folder again or save the model again"
        )
    return record


def current_file(directory: Path, info: dict[str, Any], name: str) -> str:
    """The file that holds ``name`` now: its staged copy while a re-save is between writing
    its record and renaming its files into place (``save.py``), else ``name`` itself.

    Example:
        >>> current_file(Path("out"), {"staged": {}}, "model.safetensors")
        'model.safetensors'
    """
    staged = info.get("staged", {}).get(name)
    return staged if staged and os.path.lexists(directory / staged) else name


def legacy_fingerprint(fd: int) -> str:
    """A format 1 record's fingerprint: sha256 of the size, first and last MiB of the file."""
    h = hashlib.sha256()
    size = os.fstat(fd).st_size
    h.update(str(size).encode())
    h.update(os.pread(fd, 2**20, 0))
    if size > 2**20:
        h.update(os.pread(fd, 2**20, max(size - 2**20, 2**20)))
    return h.hexdigest()


_RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "plan": (dict,),
    "config": (dict,),
    "budget": (int, float),
    "always_on": (list,),
    "model_class": (str,),
    "weights": (dict,),
}


def check_record(record: dict[str, Any], rec_path: Path) -> None:
    """Check the fields of a record by type and range, and that every file it names is a plain
    file name inside its folder (no folder part, not absolute).

    Raises:
        RecordError: The first bad field, named; the fix is to save the model again.

    Example:
        >>> check_record({"plan": {}}, Path("out/dynconvert.json"))  # doctest: +SKIP
        Traceback (most recent call last):
        ...
        dynconvert.errors.RecordError: out/dynconvert.json lacks 'config'; it is truncated ...
    """

    def bad(what: str) -> RecordError:
        return RecordError(f"{rec_path} is corrupt: {what}; save the model again")

    for key, kinds in _RECORD_FIELDS.items():
        if key not in record:
            raise RecordError(
                f"{rec_path} lacks {key!r}; it is truncated or corrupt, save the model again"
            )
        if not isinstance(record[key], kinds) or isinstance(record[key], bool):
            kind = " or ".join(k.__name__ for k in kinds)
            raise bad(f"{key} is {shown(record[key], 40)}, not {kind}")
    plan_version = record["plan"].get("version", 1)
    if isinstance(plan_version, bool) or not isinstance(plan_version, int) or plan_version < 1:
        raise bad(f"plan.version {shown(plan_version)} is not a version number")
    if plan_version > PLAN_VERSION:
        raise RecordError(
            f"{rec_path} has plan version {plan_version}, newer than this dynconvert supports "
            f"({PLAN_VERSION}); upgrade dynconvert (pip install -U dynconvert)"
        )
    if not 0.0 < record["budget"] <= 1.0:
        raise bad(f"budget {shown(record['budget'])} is outside (0, 1]")
    try:
        budget_range_of(record)
    except BudgetError as e:
        raise bad(f"budget_range {shown(record.get('budget_range'))}: {e}") from None
    if not all(_is_int(v) and 0 <= v < 2**31 for v in record["always_on"]):
        raise bad("always_on must be a list of unit indices (integers >= 0)")
    _check_weights_info(record["weights"], record["format_version"], bad)
    aliases = record.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise bad("aliases must map weight names to weight names")
    for key in ("preset_kwargs", "width_masks"):
        if key in record and not isinstance(record[key], dict):
            raise bad(f"{key} must be a mapping")
    if record.get("preset") is not None and not isinstance(record["preset"], str):
        raise bad("preset must be a name or null")
    dtypes = record.get("dtypes", {})
    if not isinstance(dtypes, dict) or not all(v in DTYPES for v in dtypes.values()):
        raise bad(f"dtypes must map model and routers to one of {', '.join(DTYPES)}")
    for index, segments in record.get("width_masks", {}).items():
        if not _masks_fit(segments):
            raise bad(f"width_masks[{shown(index)}] is not a list of [t_first, t_last, bits]")


DTYPES = ("float16", "bfloat16", "float32", "float64", "mixed")
"""The dtypes a record may name for the model's weights and for its routers."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _plain_name(name: Any) -> bool:
    """A file name inside the folder: no folder part, not . or .., no NUL, at most 255 bytes."""
    return (
        isinstance(name, str)
        and bool(name)
        and name not in (".", "..")
        and Path(name).name == name
        and "\0" not in name
        and len(name.encode("utf-8", "surrogateescape")) <= 255
    )


def _check_weights_info(w: dict[str, Any], version: int, bad: Any) -> None:
    """The weights entry: file names inside the folder, the size, the sha256 of each file
    (format 2) or the fingerprint (format 1), and the staged copies of a re-save."""
    name, size = w.get("file"), w.get("bytes")
    if not _plain_name(name):
        raise bad(f"weights.file {shown(name)} is not a file name inside the folder")
    if not _is_int(size) or size < 0:
        raise bad("weights.bytes is missing or of the wrong type")
    shards = w.get("shards", [])  # a sharded save_pretrained: its shard files
    if not isinstance(shards, list) or not all(_plain_name(n) for n in shards):
        raise bad("weights.shards must be a list of file names inside the folder")
    if version < 2:
        if not isinstance(w.get("fingerprint"), str):
            raise bad("weights.fingerprint is missing or of the wrong type")
        return
    sha = w.get("sha256")
    if not isinstance(sha, dict) or any(n not in sha for n in [name, *shards]):
        raise bad("weights.sha256 must give the sha256 of every weights file")
    if not all(isinstance(h, str) and _SHA256.fullmatch(h) for h in sha.values()):
        raise bad("weights.sha256 values must be sha256 hex digests")
    staged = w.get("staged", {})
    if not isinstance(staged, dict) or not all(
        _saved_name(k) and _saved_name(v) for k, v in staged.items()
    ):
        raise bad("weights.staged must map file names to file names inside the folder")


def _saved_name(name: Any) -> bool:
    """A file of a saved folder: a plain name, or one in a subfolder (a LoRA adapter's)."""
    parts = name.split("/") if isinstance(name, str) else [None]
    return len(parts) <= 2 and all(_plain_name(p) for p in parts)


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _masks_fit(segments: Any) -> bool:
    """Width-mask segments: ``[t_first, t_last, "0110..."]`` within 0..999, all of one width."""
    if not isinstance(segments, list) or not segments:
        return False
    width = None
    for seg in segments:
        if not (isinstance(seg, list) and len(seg) == 3 and isinstance(seg[2], str)):
            return False
        first, last, bits = seg
        if not (_is_int(first) and _is_int(last) and 0 <= first <= last < ROUTER_TIMESTEPS):
            return False
        if (width is not None and len(bits) != width) or bits.strip("01"):
            return False
        width = len(bits)
    return True


def check_record_units(record: dict[str, Any], plan: Plan, directory: str | os.PathLike) -> None:
    """Refuse a record whose always-on units do not fit its plan (one per site, in range).

    Example:
        >>> check_record_units(record, Plan.from_dict(record["plan"]), "out")  # doctest: +SKIP
    """
    always_on = record["always_on"]
    if len(always_on) != len(plan.sites):
        raise RecordError(
            f"the record in {directory} has {len(always_on)} always-on units for "
            f"{len(plan.sites)} sites; it is corrupt, save the model again"
        )
    for site, unit in zip(plan.sites, always_on):
        if unit >= max(site.units, 1):
            raise RecordError(
                f"the record in {directory} names always-on unit {unit} of site "
                f"{site.name or site.index}, which has {site.units}; it is corrupt, save the model "
                "again"
            )
