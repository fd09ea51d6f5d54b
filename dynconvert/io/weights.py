"""The weights of a saved folder: written as safetensors one tensor at a time into the file
``files.atomic_write`` opened (:func:`write_safetensors`); read each file once through a
descriptor opened without following a link, its sha256 checked against the record; and weights
refused that do not fit the model or would give wrong answers (non-finite routers, routers of
another dtype, integers where the model has floats, always-on units other than the record's).

``save.load`` calls :func:`read_weights` then :func:`check_weights_fit`; nothing here changes
the model, so a refused folder leaves it unconverted.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from dynconvert.config import ConvertConfig
from dynconvert.errors import FileError, RecordError
from dynconvert.io.files import atomic_write, fd_path, open_file, sha256_of
from dynconvert.io.limits import read_json
from dynconvert.io.record import current_file, legacy_fingerprint
from dynconvert.plan import Plan
from dynconvert.runtime.bank import RouterBank
from dynconvert.runtime.budgets import budget_range_of

_FUSED = re.compile(r"\.(to_qkv|to_kv|to_added_qkv)\.(weight|bias)$")
"""Weights diffusers ``fuse_qkv_projections()`` adds (copies of the q/k/v weights)."""


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip
"""torch dtype -> its name in a safetensors header."""


def write_safetensors(
    f: BinaryIO, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` to the open file ``f`` in the safetensors format, one tensor at a time
    (no second copy of the model in memory): an 8-byte little-endian header size, the JSON
    header (dtype, shape and byte range of each tensor) padded with spaces to 8 bytes, then
    the raw little-endian bytes of each tensor in the header's order.

    Example:
        >>> import io
        >>> buffer = io.BytesIO(); write_safetensors(buffer, {"w": torch.ones(2)})
        >>> from safetensors.torch import load
        >>> load(buffer.getvalue())["w"].tolist()
        [1.0, 1.0]
    """
    if sys.byteorder != "little" or any(
        v.dtype not in _SAFETENSORS_DTYPES for v in tensors.values()
    ):
        from safetensors.torch import save

        f.write(save(tensors, metadata=metadata))
        return
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    f.write(struct.pack("<Q", len(text)) + text)
    for t in tensors.values():
        if t.numel():
            flat = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            f.write(memoryview(flat.numpy()))


def atomic_save_tensors(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict | None = None,
    root: str | os.PathLike | None = None,
) -> Path:
    """Write a safetensors file whole or not at all (``files.atomic_write``).

    Example:
        >>> atomic_save_tensors({"w": torch.zeros(2)}, "/tmp/w.safetensors")  # doctest: +SKIP
    """
    return atomic_write(path, lambda f: write_safetensors(f, tensors, metadata), root)


def _check_file(fd: int, path: Path, name: str, info: dict[str, Any], version: int) -> None:
    """Refuse a weights file whose sha256 (format 2) or fingerprint (format 1) is not the
    record's."""
    if version >= 2:
        same = sha256_of(fd) == info["sha256"][name]
    else:
        same = name != info["file"] or legacy_fingerprint(fd) == info["fingerprint"]
    if not same:
        raise RecordError(
            f"{path} does not match its record (truncated, corrupt or from another save); "
            "copy the folder again or save the model again"
        )


def _load_file(fd: int, path: Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of one open weights file recorded as ``name`` (safetensors, or a torch
    pickle of tensors only); ``path`` may be its staged copy."""
    if name.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(fd_path(fd, path))
    with os.fdopen(os.dup(fd), "rb") as f:  # save_pretrained(safe_serialization=False)
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a file it cannot unpickle
            raise ValueError(
                f"{path} is not a weights-only torch file ({type(e).__name__})"
            ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no mapping of tensors")
    return state


def read_weights(directory: Path, record: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every weight of the folder (its file or shards), each file checked against the record,
    tied weights restored from the aliases.

    Raises:
        RecordError: A file is missing, a link, not the one recorded, or unreadable.

    Example:
        >>> state = read_weights(Path("runs/digits"), record)  # doctest: +SKIP
    """
    from safetensors import SafetensorError

    info, version = record["weights"], record["format_version"]
    names = [info["file"], *info.get("shards", [])]
    state: dict[str, torch.Tensor] = {}
    for name in names:
        path = directory / current_file(directory, info, name)
        try:
            fd = open_file(path, root=directory)
        except FileError as e:
            raise RecordError(f"cannot read the weights in {directory}: {e}") from None
        try:
            _check_file(fd, path, name, info, version)
            if name == info["file"] and info.get("shards"):
                read_json(path, RecordError, root=directory)  # the shard index: checked, unused
                continue
            state.update(_load_file(fd, path, name))
        except (SafetensorError, OSError, ValueError, RuntimeError, EOFError) as e:
            raise RecordError(
                f"cannot read the weights in {directory}: {str(e)[:200]}; save the model again"
            ) from None
        finally:
            os.close(fd)
    for alias, kept in record.get("aliases", {}).items():
        if kept not in state:
            raise RecordError(
                f"the record in {directory} aliases {alias[:100]} to {kept[:100]}, which its "
                "weights lack; save the model again"
            )
        state[alias] = state[kept]
    return state


def check_weights_fit(
    state: dict[str, torch.Tensor],
    model: nn.Module,
    plan: Plan,
    config: ConvertConfig,
    directory: Path,
    record: dict[str, Any] | None = None,
) -> None:
    """Refuse weights whose names, shapes or kinds differ from those of ``model`` converted by
    ``plan`` (its own weights plus the routers under ``dynconvert.``), and routers that would
    route wrongly: non-finite, of another dtype than the record's, or always-on units other
    than the record's.

    diffusers' ``fuse_qkv_projections()`` adds copies of the q/k/v weights (to_qkv, to_kv); a
    model saved fused carries them, a freshly built one has none: they are dropped from
    ``state`` here (they hold no information of their own).

    Example:
        >>> check_weights_fit(state, base_model, plan, config, Path("out"))  # doctest: +SKIP
    """
    expected = dict(model.state_dict())
    with torch.device("meta"):
        bank = RouterBank(
            plan, config, 1.0, budget_range_of(record or {})
        )  # with a range.s routers
    expected.update({f"dynconvert.{k}": v for k, v in bank.state_dict().items()})
    for k in [k for k in state if k not in expected and _FUSED.search(k)]:
        del state[k]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise RecordError(
            f"the weights in {directory} do not fit this model: {len(missing)} missing "
            f"(e.g. {[k[:80] for k in missing[:3]]}), {len(unexpected)} unexpected "
            f"(e.g. {[k[:80] for k in unexpected[:3]]})"
        )
    for k, want in expected.items():
        got = state[k]
        if tuple(got.shape) != tuple(want.shape):
            raise RecordError(
                f"weight {k} has shape {tuple(got.shape)} in {directory}, "
                f"model expects {tuple(want.shape)}"
            )
        if got.is_floating_point() != want.is_floating_point() or (
            not want.is_floating_point() and got.dtype != want.dtype
        ):
            raise RecordError(
                f"weight {k} is {got.dtype} in {directory}, the model holds {want.dtype}; the "
                "weights are corrupt, save the model again"
            )
    _check_routers(state, record or {}, directory)


def _check_routers(state: dict[str, torch.Tensor], record: dict[str, Any], directory: Path) -> None:
    """Routers finite and of the record's dtype; the always-on units those of the record."""
    want = record.get("dtypes", {}).get("routers")
    for k, v in state.items():
        if not k.startswith("dynconvert.") or not v.is_floating_point():
            continue
        if want not in (None, "mixed") and str(v.dtype) != f"torch.{want}":
            raise RecordError(
                f"router weight {k} is {v.dtype} in {directory}, but the record says {want}; "
                "the weights are corrupt, save the model again"
            )
        if not bool(torch.isfinite(v).all()):
            raise RecordError(
                f"router weight {k} in {directory} holds NaN or infinite values; its routing "
                "would be meaningless: calibrate and save the model again"
            )
    on = state.get("dynconvert.always_on")
    if on is not None and "always_on" in record and on.tolist() != record["always_on"]:
        raise RecordError(
            f"the always-on units in the weights of {directory} differ from its record's; "
            "the folder is corrupt, save the model again"
        )


def check_record_tables(model: nn.Module, record: dict[str, Any], directory: Path) -> None:
    """Refuse a record whose width masks are not those the loaded routers give, or whose FLOPs
    ratios are not finite numbers that agree with each other (a record edited, or weights
    swapped with their sha256 updated: what ``inspect`` shows would not be what runs).

    A mask bit may differ only where its router's logit is within rounding of 0 (a model
    saved on another device or in another dtype).

    Raises:
        RecordError: The first site or field that disagrees.

    Example:
        >>> check_record_tables(model, record, Path("runs/digits"))  # doctest: +SKIP
    """
    from dynconvert.io.record import decode_masks
    from dynconvert.plan import ROUTER_TIMESTEPS
    from dynconvert.runtime.state import get_state

    def bad(what: str) -> RecordError:
        return RecordError(
            f"the record in {directory} {what}; the record or the weights were changed after "
            "the save: save the model again"
        )

    bank = get_state(model)
    masks = record.get("width_masks", {})
    if set(masks) != {str(key) for key in bank.width}:
        raise bad("has width masks for other sites than its routers")
    with torch.no_grad():
        grid = torch.arange(ROUTER_TIMESTEPS, dtype=torch.float32)
        emb = bank.width_embedding(grid.to(bank.always_on.device), None)  # t's (and budget's)
        for key, router in bank.width.items():
            logits = router(emb).float().cpu()  # (T, units)
            on = (logits > 0) | bank.runs_full(bank.budget)  # a range's 1.0: every unit
            on[:, int(bank.always_on[int(key)])] = True
            tol = max(1e-3, 8 * torch.finfo(logits.dtype).eps) * float(logits.abs().amax())
            differ = decode_masks(masks[str(key)]) != on
            if bool((differ & (logits.abs() > tol)).any()):
                raise bad(f"has width masks for site {key} that its routers do not give")
    ratio, mean = record.get("flops_ratio_per_t"), record.get("mean_flops_ratio")
    if ratio is None and mean is None:
        return

    def number(v: Any) -> bool:  # NaN fails both comparisons
        return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 2

    if not (isinstance(ratio, list) and len(ratio) == ROUTER_TIMESTEPS and all(map(number, ratio))):
        raise bad(f"has flops_ratio_per_t that is not {ROUTER_TIMESTEPS} ratios in [0, 2]")
    if not number(mean) or abs(mean - sum(ratio) / len(ratio)) > 1e-5:
        raise bad("has a mean_flops_ratio that is not the mean of its flops_ratio_per_t")
