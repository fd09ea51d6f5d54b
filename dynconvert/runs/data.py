"""A run's calibration data: what a recipe's ``data`` names, random latents shaped for the
model (``synthetic``), and the check that the data's samples fit the model's input."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynconvert.errors import DataError, ExampleInputsError


def _named_inputs(model: nn.Module, batch_size: int) -> dict[str, Any]:
    """The model's example inputs by forward-argument name."""
    from dynconvert.inputs import default_inputs

    args, kwargs = default_inputs(model, batch_size=batch_size)
    names = [p for p in inspect.signature(model.forward).parameters]
    named = dict(zip(names, args))
    named.update(kwargs)
    return named


def _pick(named: dict[str, Any], names: tuple[str, ...]) -> Any:
    return next((named[n] for n in names if isinstance(named.get(n), torch.Tensor)), None)


def model_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """(C, H, W) of one sample the model takes (None when it cannot tell)."""
    from dynconvert.calibration.adapters import X_NAMES

    x = _pick(_named_inputs(model, 1), X_NAMES)
    return tuple(x.shape[1:]) if x is not None else None


def synthetic_data(model: nn.Module, rows: int = 64, seed: int = 0) -> Any:
    """Random latents (and labels / caption embeddings) shaped for ``model``: to try the pipeline.

    Example:
        >>> from dynconvert.testing import tiny_dit
        >>> len(synthetic_data(tiny_dit(), rows=8))
        8
    """
    from dynconvert.calibration import TensorSource
    from dynconvert.calibration.adapters import X_NAMES, Y_NAMES

    with torch.random.fork_rng(devices=[]):  # labels from the seed, not the global RNG
        torch.manual_seed(seed)
        named = _named_inputs(model, rows)
    x = _pick(named, X_NAMES)
    if x is None:
        raise DataError(
            f"cannot tell the input shape of {type(model).__name__}; set `data` to a latents folder"
        )
    g = torch.Generator().manual_seed(seed)
    y = _pick(named, Y_NAMES)
    cond = named.get("encoder_hidden_states")
    cond = torch.randn(cond.shape, generator=g) if isinstance(cond, torch.Tensor) else None
    mask = torch.ones(cond.shape[:2], dtype=torch.long) if cond is not None else None
    y = y.long().cpu() if y is not None and not y.is_floating_point() else None
    return TensorSource(torch.randn(x.shape, generator=g), y, cond, mask)


def data_source(data: str) -> Any:
    """The calibration data a recipe names (None for ``synthetic``: made once the model exists)."""
    from dynconvert.calibration.data import NAMED_SOURCES, as_source

    if data == "synthetic":
        return None
    if data in NAMED_SOURCES:  # a named data set (the demo registers "digits")
        return as_source(data)
    path = Path(data).expanduser()
    if not path.exists():
        names = "".join(f", {n!r}" for n in sorted(NAMED_SOURCES))
        raise DataError(f"`data` {data}: no such folder; pass a latents folder, 'synthetic'{names}")
    return as_source(path)


def check_data_shape(model: nn.Module, data: Any) -> None:
    """Refuse data whose samples do not fit the model's input (before anything is written)."""
    get = getattr(data, "get_batch", None)
    if get is None or not len(data):
        return
    try:
        want = model_input_shape(model)
    except ExampleInputsError:
        return
    x = get([0]).get("x")
    if isinstance(x, torch.Tensor) and want is not None and tuple(x.shape[1:]) != tuple(want):
        raise DataError(
            f"the data's samples have shape {tuple(x.shape[1:])} but the model takes "
            f"{tuple(want)}; pass data made for this model (same channels and size)"
        )
