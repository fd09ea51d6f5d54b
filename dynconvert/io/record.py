"""The record of a converted model, ``dynconvert.json``: what it holds, and its checks.

It says what convert did, so that ``load`` can replay it onto a freshly built original model
(modelopt's save/restore pattern) without running the analysis again: the format and library
version, the plan, the router settings, the budget, the always-on units, the per-timestep width
masks for t = 0..999 (run-length encoded) and the FLOPs ratio they give, the token capacities
of the planned path, the weights file with its size and fingerprint, and for built-in models
the preset that rebuilds the base.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynconvert.errors import RecordError
from dynconvert.flops import routed_ratio
from dynconvert.io.files import fingerprint
from dynconvert.plan import PLAN_VERSION, ROUTER_TIMESTEPS, Plan
from dynconvert.runtime.bank import RouterBank
from dynconvert.runtime.planned.controls import capacity_record
from dynconvert.runtime.state import get_state
from dynconvert.version import __version__

FORMAT = "dynconvert"
FORMAT_VERSION = 1
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


def read_record(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``dynconvert.json`` (format, version, weights file present and intact).

    Raises:
        RecordError: What is wrong with the folder, and what to do.

    Example:
        >>> read_record("runs/digits")["preset"]  # doctest: +SKIP
        'digits'
    """
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
        or fingerprint(weights) != record["weights"]["fingerprint"]
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
