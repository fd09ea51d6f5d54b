"""Load official checkpoints (``.pt``, ``.pth``, ``.safetensors``) into the reference models.

Everything is checked before a single tensor is copied, so a failed load leaves the model as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.nn as nn

from dynconvert.errors import CheckpointError

SUFFIXES = (".pt", ".pth", ".safetensors")
"""File extensions ``load_checkpoint`` reads."""

WRAPPER_KEYS = ("ema", "model", "state_dict")
"""Keys of a training-checkpoint dict that hold a state dict, in order of preference."""

_STRIP_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
_SHOW = 5  # how many keys an error message lists


def read_state_dict(path: str | os.PathLike, *, key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict from a checkpoint file onto the CPU, without touching any model.

    A ``.pt``/``.pth`` file may hold a raw state dict (like the official DiT weights) or a training
    checkpoint dict; from the latter the entry ``key`` is taken, else the first of "ema", "model",
    "state_dict" present. A ``module.`` prefix (DDP) is stripped.

    Args:
        path: The checkpoint file.
        key: Which entry of a training-checkpoint dict to read, e.g. ``"model"`` for the non-EMA
            weights. ``None`` prefers "ema".

    Returns:
        Parameter name -> tensor.

    Raises:
        CheckpointError: The file is missing, of an unknown type, unreadable, or holds no
            state dict.

    Example:
        >>> from dynconvert.models.loading import read_state_dict
        >>> state = read_state_dict("DiT-XL-2-256x256.pt")  # doctest: +SKIP
        >>> state["pos_embed"].shape  # doctest: +SKIP
        torch.Size([1, 256, 1152])
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"No checkpoint file at {path}. Check the path, or download the weights first "
            "(for example DiT-XL-2-256x256.pt from the DiT repository)."
        )
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.suffix.lower() in SUFFIXES)
        inside = f" It holds: {', '.join(found[:_SHOW])}." if found else ""
        raise CheckpointError(f"{path} is a folder; pass the checkpoint file inside it.{inside}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise CheckpointError(
            f"Cannot load {path.name!r}: unknown extension {suffix or '(none)'!r}. Supported: "
            f"{', '.join(SUFFIXES)}. Rename a torch.save file to .pt, or save the weights with "
            "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')."
        )
    obj = _read_safetensors(path) if suffix == ".safetensors" else _read_torch(path)
    return _strip_prefixes(_select_state_dict(obj, path, key))


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    strict: bool = True,
    key: str | None = None,
) -> nn.Module:
    """Load a checkpoint file into ``model`` in place, after checking every name and shape.

    Args:
        model: The model to fill, e.g. from ``build_model``.
        path: A ``.pt``/``.pth`` file (raw state dict or training dict with "ema"/"model"/
            "state_dict") or a ``.safetensors`` file.
        strict: Require the checkpoint's keys to match the model's exactly. With ``False``,
            missing and unexpected keys are allowed, but at least one key must match and shapes
            must always agree.
        key: Entry of a training-checkpoint dict to load; ``None`` prefers "ema".

    Returns:
        The same ``model``, now holding the checkpoint's weights.

    Raises:
        CheckpointError: Missing, unreadable or unknown file, key mismatch or shape mismatch. The
            model is unchanged when this is raised.

    Example:
        >>> from dynconvert.models import build_model, load_checkpoint
        >>> model = build_model("DiT-XL/2")  # doctest: +SKIP
        >>> load_checkpoint(model, "DiT-XL-2-256x256.pt").eval()  # doctest: +SKIP
    """
    state = read_state_dict(path, key=key)
    _check_compatible(model, state, strict=strict, path=Path(path))
    model.load_state_dict(state, strict=strict)
    return model


#################################################################################
#                                 Reading files                                 #
#################################################################################


@contextlib.contextmanager
def _allow_training_args() -> Iterator[None]:
    """Let ``weights_only`` unpickle ``argparse.Namespace`` (DiT's train.py stores its args)."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:
        yield
        return
    with safe_globals([argparse.Namespace]):
        yield


def _read_torch(path: Path) -> object:
    """``torch.load`` with ``weights_only=True``, turning every failure into a CheckpointError."""
    try:
        with _allow_training_args():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err).lower():
            raise CheckpointError(
                f"{path} holds Python objects other than tensors and plain containers, which "
                "dynconvert does not unpickle (it loads with weights_only=True for safety). If you "
                "trust the file, re-save only its weights, e.g. torch.save(ckpt['ema'], "
                "'weights.pt') after torch.load(..., weights_only=False)."
            ) from err
        raise _corrupt(path, err) from err
    except Exception as err:  # torch raises RuntimeError, EOFError, ValueError... for bad files
        raise _corrupt(path, err) from err


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` onto the CPU, turning failures into a CheckpointError."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # SafetensorError, OSError, ... for bad files
        raise _corrupt(path, err) from err


def _corrupt(path: Path, err: BaseException) -> CheckpointError:
    """The error for a file that exists but cannot be read."""
    return CheckpointError(
        f"Cannot read {path} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        f"). The file is corrupt, truncated or not a {path.suffix} checkpoint: download or save "
        "it again."
    )


def _is_state_dict(obj: object) -> bool:
    """Whether ``obj`` is a non-empty mapping of string names to tensors."""
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _select_state_dict(obj: object, path: Path, key: str | None) -> Mapping[str, torch.Tensor]:
    """Pick the state dict out of what the file held (raw, or an entry of a training dict)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state dict. Save the weights with "
            "torch.save(model.state_dict(), path)."
        )
    top = ", ".join(repr(k) for k in list(obj)[:10])
    if key is not None:
        if key not in obj:
            raise CheckpointError(
                f"{path} has no entry {key!r}; its top-level keys are: {top}. Pass one of those "
                "as key=..., or key=None for the default choice."
            )
        chosen, where = obj[key], f"entry {key!r} of {path}"
    elif _is_state_dict(obj):
        return obj
    else:
        found = [k for k in WRAPPER_KEYS if k in obj]
        if not found:
            raise CheckpointError(
                f"{path} holds neither a state dict nor an entry named "
                f"{' / '.join(repr(k) for k in WRAPPER_KEYS)} (top-level keys: {top}). "
                "Pass key=... naming the entry that holds the weights."
            )
        chosen, where = obj[found[0]], f"entry {found[0]!r} of {path}"
    if not _is_state_dict(chosen):
        raise CheckpointError(
            f"The {where} is not a mapping of parameter names to tensors. Pass key=... naming "
            f"the entry that holds the weights (top-level keys: {top})."
        )
    return chosen


def _strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (``module.`` of DDP, ``_orig_mod.`` of torch.compile) every key has."""
    state = dict(state)
    stripped = True
    while stripped:
        stripped = False
        for prefix in _STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    return state


#################################################################################
#                              Checking against a model                         #
#################################################################################


def _check_compatible(
    model: nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool, path: Path
) -> None:
    """Raise a CheckpointError naming the fix if ``state`` does not fit ``model``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if (strict and (missing or unexpected)) or len(missing) == len(expected):
        raise CheckpointError(_key_mismatch_message(model, state, missing, unexpected, path))
    mismatched = [
        (k, tuple(state[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if mismatched:
        name, got, want = mismatched[0]
        more = f" ({len(mismatched) - 1} more keys differ in shape.)" if len(mismatched) > 1 else ""
        raise CheckpointError(
            f"Shape mismatch for {name!r}: the checkpoint {path.name} has {got}, the model has "
            f"{want}.{more} {_shape_hint(model, name)}"
        )


def _describe(model: nn.Module) -> str:
    """How the model was built, for error messages."""
    preset = getattr(model, "preset", None)
    kind = type(model).__name__
    return (
        f"the {kind} was built from preset {preset!r}"
        if preset
        else f"the {kind} was built directly"
    )


def _key_mismatch_message(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    missing: list[str],
    unexpected: list[str],
    path: Path,
) -> str:
    """Counts and first few names of missing and unexpected keys, and a likely fix."""
    parts = [f"The checkpoint {path.name} does not match the model ({_describe(model)}):"]
    if missing:
        parts.append(f"{len(missing)} missing key(s), e.g. {', '.join(missing[:_SHOW])};")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:_SHOW])}.")
    prefix = _common_prefix(state)
    expected = set(model.state_dict())
    if prefix and {k[len(prefix) :] for k in state} & expected:
        parts.append(
            f"Every checkpoint key starts with {prefix!r}: load the sub-dict without it, e.g. "
            f"{{k[len({prefix!r}):]: v for k, v in state.items()}}."
        )
    elif missing and unexpected:
        parts.append(
            "The checkpoint is probably of another architecture or depth: build the preset it was "
            "trained with (dynconvert.models.list_presets() lists them)."
        )
    elif missing:
        parts.append(
            "The checkpoint lacks some of the model's weights (a shallower model, or a converted "
            "model's extra parameters): use the matching preset, or strict=False to keep the "
            "missing ones as they are."
        )
    else:
        parts.append(
            "The checkpoint has weights the model lacks (a deeper model, or extra modules): use "
            "the matching preset, or strict=False to ignore them."
        )
    return " ".join(parts)


def _common_prefix(state: Mapping[str, torch.Tensor]) -> str:
    """The first dotted component shared by every key (``"model."``), or ``""``."""
    heads = {k.split(".", 1)[0] for k in state if "." in k}
    if len(heads) == 1 and all("." in k for k in state):
        return heads.pop() + "."
    return ""


def _shape_hint(model: nn.Module, name: str) -> str:
    """A likely cause of a shape mismatch at parameter ``name``, and the fix."""
    leaf = name.split(".")[-2] if "." in name else name
    if name == "pos_embed":
        cause = (
            "The token count differs: the checkpoint was trained at another image size or patch "
            "size (a 512 px DiT needs a '-512' preset such as 'DiT-XL/2-512'; a U-ViT-H/4 512 px "
            "checkpoint needs 'U-ViT-H/4-512')."
        )
    elif leaf == "proj" and name.startswith(("x_embedder", "patch_embed")):
        cause = (
            "The patch size or input channels differ: pick the preset with the checkpoint's "
            "patch size (/2, /4, /8)."
        )
    elif name.startswith(("y_embedder", "label_emb")):
        cause = "The number of classes differs: pass num_classes=... to build_model."
    elif name.startswith(("final_layer", "decoder_pred")):
        cause = "The output differs: another patch size, channel count or learn_sigma setting."
    else:
        cause = "The width differs: the checkpoint is of another model size (S/B/L/XL, or M/L/H)."
    return f"{cause} Here {_describe(model)}; build the preset the checkpoint was trained with."
