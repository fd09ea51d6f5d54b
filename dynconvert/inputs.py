"""Example inputs: normalising what users pass, and making them for models that can."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch

from dynconvert.config import TIMESTEP_NAMES
from dynconvert.errors import ExampleInputsError, TimestepError

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


def split_inputs(example_inputs: Any) -> Inputs:
    """Turn a tuple of positional args or a dict of keyword args into ``(args, kwargs)``."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if (
        isinstance(example_inputs, tuple)
        and len(example_inputs) == 2
        and isinstance(example_inputs[1], dict)
        and isinstance(example_inputs[0], tuple)
    ):
        return tuple(example_inputs[0]), dict(example_inputs[1])
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    raise ExampleInputsError(
        f"example_inputs must be a tuple of positional arguments or a dict of keyword arguments, "
        f"got {type(example_inputs).__name__}"
    )


def default_inputs(model: torch.nn.Module, batch_size: int = 1) -> Inputs:
    """Example inputs a model can make itself, or a clear error saying to pass them.

    Built-in models have ``example_inputs()``; diffusers DiT and PixArt transformers are built
    from their config. Floating inputs take the model's compute dtype (a model loaded in fp16 or
    bf16 gets fp16 or bf16 inputs) and every tensor goes to the model's device.
    """
    dtype, device = model_dtype_device(model)
    if device.type == "meta":  # a model built without weights (inspect): real inputs, on the CPU
        device = torch.device("cpu")
    args, kwargs = _default_inputs(model, batch_size)
    return _to(args, dtype, device), _to(kwargs, dtype, device)


_COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def model_dtype_device(model: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype the model computes in and the device it sits on.

    The dtype is that of its first floating parameter in a compute dtype (fp16, bf16, fp32,
    fp64): parameters stored in a storage-only dtype (float8 under layerwise casting) are
    skipped, and a model with none gives float32. The device is its first parameter's (CPU if
    it has none).

    Example:
        >>> model_dtype_device(torch.nn.Linear(2, 2).to(torch.bfloat16))
        (torch.bfloat16, device(type='cpu'))
    """
    dtype, device = None, None
    for p in model.parameters():
        device = p.device if device is None else device
        if p.is_floating_point() and p.dtype in _COMPUTE_DTYPES:
            dtype = p.dtype
            break
    return dtype or torch.float32, device or torch.device("cpu")


def _to(value: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """Floating tensors to ``dtype`` and every tensor to ``device``, through tuples and dicts."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":  # made without data (inspect's weightless model): as is
            return value
        return value.to(device=device, dtype=dtype if value.is_floating_point() else None)
    if isinstance(value, dict):
        return {k: _to(v, dtype, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, dtype, device) for v in value)
    return value


def _default_inputs(model: torch.nn.Module, batch_size: int) -> Inputs:
    """The example inputs of :func:`default_inputs`, in float32 on the CPU."""
    if hasattr(model, "example_inputs") and callable(model.example_inputs):
        return split_inputs(model.example_inputs(batch_size=batch_size))
    name = type(model).__name__
    cfg = getattr(model, "config", None)
    gen = torch.Generator().manual_seed(0)
    if name == "DiTTransformer2DModel" and cfg is not None:
        s, c = cfg.sample_size, cfg.in_channels
        classes = cfg.num_embeds_ada_norm or 1000
        return (), {
            "hidden_states": torch.randn(batch_size, c, s, s, generator=gen),
            "timestep": torch.linspace(999, 0, batch_size).round().long(),
            "class_labels": torch.arange(batch_size) % classes,
        }
    if (
        name in ("PixArtTransformer2DModel", "Transformer2DModel")
        and cfg is not None
        and cfg.sample_size
    ):
        s, c = cfg.sample_size, cfg.in_channels
        text_dim = cfg.caption_channels or cfg.cross_attention_dim
        kwargs: dict[str, Any] = {
            "hidden_states": torch.randn(batch_size, c, s, s, generator=gen),
            "timestep": torch.linspace(999, 0, batch_size).round().long(),
        }
        if text_dim:
            kwargs["encoder_hidden_states"] = torch.randn(batch_size, 8, text_dim, generator=gen)
        if name == "PixArtTransformer2DModel":
            extra = getattr(model, "use_additional_conditions", False)
            kwargs["added_cond_kwargs"] = (
                {
                    "resolution": torch.tensor([[s * 8.0, s * 8.0]] * batch_size),
                    "aspect_ratio": torch.ones(batch_size, 1),
                }
                if extra
                else {"resolution": None, "aspect_ratio": None}
            )
        return (), kwargs
    raise ExampleInputsError(
        f"{name} cannot make its own example inputs; pass example_inputs=(x, t, ...) or a dict of "
        "keyword arguments, exactly as you would call the model"
    )


def batch_of(args: tuple, kwargs: dict) -> int:
    """The batch size: the leading dim of the first tensor with at least 2 dims."""
    for v in [*args, *kwargs.values()]:
        if isinstance(v, torch.Tensor) and v.dim() >= 2:
            return int(v.shape[0])
    return 1


def shapes_of(args: tuple, kwargs: dict) -> dict[str, list[int]]:
    """Shapes of the tensor inputs, by position (``"0"``) or keyword."""
    out = {str(i): list(v.shape) for i, v in enumerate(args) if isinstance(v, torch.Tensor)}
    out.update({k: list(v.shape) for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
    return out


def find_timestep_arg(model: torch.nn.Module, name: str | None = None) -> str:
    """The forward parameter that carries the timestep: ``name`` when given, else the first of
    ``TIMESTEP_NAMES`` in the signature, else the only one ending in ``_`` + one of them
    (``_t`` aside).

    Example:
        >>> from dynconvert.testing import tiny_dit
        >>> find_timestep_arg(tiny_dit())
        't'
    """
    params = list(inspect.signature(model.forward).parameters)
    if name is not None:
        if name not in params:
            raise TimestepError(
                f"{type(model).__name__}.forward has no argument {name!r}; "
                f"its arguments are {params}"
            )
        return name
    for cand in TIMESTEP_NAMES:
        if cand in params:
            return cand
    # A prefixed name (T5FilmDecoder's ``decoder_noise_time``, ``noise_sigma``), when only one;
    # not ``_t``: ``x_t`` is the noisy input in many codebases.
    prefixed = [p for p in params if any(p.endswith("_" + c) for c in TIMESTEP_NAMES if len(c) > 1)]
    if len(prefixed) == 1:
        return prefixed[0]
    raise TimestepError(
        f"cannot find the timestep argument of {type(model).__name__}.forward "
        f"(arguments: {params}); "
        "set ConvertConfig(timestep_arg=...) to the name of the argument that carries t"
    )


def timestep_slot(model: torch.nn.Module, name: str) -> tuple[int | None, Any]:
    """Where the timestep argument ``name`` sits in ``model.forward``: (position, default).

    The position is None for a keyword-only argument; the default is None when there is none.
    """
    params = inspect.signature(model.forward).parameters
    p = params.get(name)
    position = list(params).index(name) if p is not None and p.kind != p.KEYWORD_ONLY else None
    default = None if p is None or p.default is inspect.Parameter.empty else p.default
    return position, default


def with_timestep(
    model: torch.nn.Module, inputs: Any, value: Any, name: str | None = None
) -> Inputs:
    """The inputs with the timestep replaced: ``value`` is one number for every sample, or one
    value per sample.

    Example:
        >>> args, kwargs = with_timestep(model, model.example_inputs(2), 500.0)  # doctest: +SKIP
    """
    args, kwargs = split_inputs(inputs)
    name = name or find_timestep_arg(model)
    position, _ = timestep_slot(model, name)
    old = (
        kwargs[name]
        if name in kwargs or position is None or position >= len(args)
        else args[position]
    )
    old = torch.as_tensor(old)
    new = (
        torch.full_like(old, value)
        if isinstance(value, (int, float))
        else torch.as_tensor(value, dtype=old.dtype)
    )
    if name in kwargs or position is None or position >= len(args):
        return tuple(args), {**kwargs, name: new}
    args = list(args)
    args[position] = new
    return tuple(args), kwargs


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run the model in eval mode (no dropout, no label dropout), then restore its mode."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def check_inputs_run(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Run the model once; raise ExampleInputsError (with the model's own message) if it fails."""
    try:
        with torch.no_grad(), eval_mode(model):
            model(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - any failure of the user's model is reported as is
        raise ExampleInputsError(
            f"the example inputs do not run {type(model).__name__}: {type(e).__name__}: {e}. "
            "Pass example_inputs exactly as you would call the model (a tuple of positional "
            "arguments or a dict of keyword arguments)"
        ) from e
