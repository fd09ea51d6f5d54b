"""The input signature of an exported program: which inputs are tensors, which are fixed values.

An exported program takes the model's tensor inputs as a flat list and has every other input
(None, a flag, a number) baked in. :class:`Signature` records both from the inputs the programs
were traced with, by *path*: the forward parameter's name, then dict keys or list positions
inside it (PixArt's ``added_cond_kwargs["resolution"]``). The manifest carries it
(:meth:`Signature.to_dict`), and the standalone loader (``run_exported.py``) reads a call's
tensors by the same paths.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dynconvert.errors import ExampleInputsError

CONSTANT_TYPES = (type(None), bool, int, float, str)


@dataclass
class Leaf:
    """Where a tensor input sits in the rebuilt call (its index in the flat tensor list)."""

    index: int


@dataclass
class Signature:
    """The call of a model as its exported programs take it.

    Attributes:
        arg_names: the forward's parameters in order (positional arguments bind to them).
        skeleton: ``{parameter: value}`` with every tensor replaced by a :class:`Leaf`.
        tensors: per tensor input, in the programs' order: ``{"path", "shape", "dtype"}``.
        constants: per fixed input: ``{"path", "value"}``.
        timestep: the path of the timestep input.
    """

    arg_names: list[str]
    skeleton: dict[str, Any]
    tensors: list[dict[str, Any]] = field(default_factory=list)
    constants: list[dict[str, Any]] = field(default_factory=list)
    timestep: list[Any] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``inputs`` entry (JSON)."""
        return {
            "arg_names": self.arg_names,
            "tensors": self.tensors,
            "constants": self.constants,
            "timestep": self.timestep,
        }

    def rebuild(self, leaves: tuple[torch.Tensor, ...]) -> dict[str, Any]:
        """The keyword arguments of the model's call, with ``leaves`` put back at their paths."""
        return _fill(self.skeleton, leaves)


def bind(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``(args, kwargs)`` as ``{parameter name: value}`` of ``model.forward`` (in its order).

    Raises:
        ExampleInputsError: the inputs do not fit the signature, or it takes ``*args``.

    Example:
        >>> from dynconvert.testing import tiny_dit
        >>> model = tiny_dit()
        >>> sorted(bind(model, model.example_inputs(2), {}))
        ['t', 'x', 'y']
    """
    sig = inspect.signature(model.forward)
    if any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values()):
        raise ExampleInputsError(
            f"{type(model).__name__}.forward takes *args, which an exported program cannot "
            "name; export a wrapper module whose forward names its inputs"
        )
    try:
        bound = sig.bind_partial(*args, **kwargs)
    except TypeError as e:
        raise ExampleInputsError(
            f"the example inputs do not fit {type(model).__name__}.forward: {e}"
        ) from e
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if sig.parameters[name].kind == inspect.Parameter.VAR_KEYWORD:
            named.update(value)  # **kwargs: its entries are keyword arguments of their own
        else:
            named[name] = value
    return named


def signature_of(model: nn.Module, named: dict[str, Any], timestep: str) -> Signature:
    """The :class:`Signature` of a call ``model(**named)`` whose timestep is ``named[timestep]``.

    Raises:
        ExampleInputsError: an input is neither a tensor, a nested dict/list/tuple of them, nor
            a plain value; or the timestep is not a tensor.

    Example:
        >>> from dynconvert.testing import tiny_dit
        >>> model = tiny_dit()
        >>> sig = signature_of(model, bind(model, model.example_inputs(2), {}), "t")
        >>> [t["path"] for t in sig.tensors], sig.timestep
        ([['x'], ['t'], ['y']], ['t'])
    """
    params = list(inspect.signature(model.forward).parameters)
    sig = Signature(arg_names=params, skeleton={})
    sig.skeleton = {k: _walk(v, [k], sig) for k, v in named.items()}
    if not isinstance(named.get(timestep), torch.Tensor):
        raise ExampleInputsError(
            f"the timestep input {timestep!r} must be a tensor in the example inputs (one value "
            "per sample), so that the exported programs take it as an input"
        )
    sig.timestep = [timestep]
    return sig


def _walk(value: Any, path: list[Any], sig: Signature) -> Any:
    """The skeleton of one input value; tensors and constants are noted in ``sig``."""
    if isinstance(value, torch.Tensor):
        sig.tensors.append(
            {"path": path, "shape": list(value.shape), "dtype": str(value.dtype).split(".")[-1]}
        )
        return Leaf(len(sig.tensors) - 1)
    if isinstance(value, dict):
        return {k: _walk(v, [*path, k], sig) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_walk(v, [*path, i], sig) for i, v in enumerate(value))
    if isinstance(value, CONSTANT_TYPES):
        sig.constants.append({"path": path, "value": value})
        return value
    name = ".".join(str(p) for p in path)
    raise ExampleInputsError(
        f"input {name} is a {type(value).__name__}; an exported program takes tensors, "
        "(nested) dicts, lists or tuples of them, and plain values (None, bool, int, float, str)"
    )


def _fill(skeleton: Any, leaves: tuple[torch.Tensor, ...]) -> Any:
    if isinstance(skeleton, Leaf):
        return leaves[skeleton.index]
    if isinstance(skeleton, dict):
        return {k: _fill(v, leaves) for k, v in skeleton.items()}
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(_fill(v, leaves) for v in skeleton)
    return skeleton


def leaves_of(named: dict[str, Any], sig: Signature) -> list[torch.Tensor]:
    """The tensor inputs of a call ``model(**named)`` in the programs' order."""
    out = []
    for spec in sig.tensors:
        value: Any = named
        for key in spec["path"]:
            value = value[key]
        out.append(value)
    return out


__all__ = ["Leaf", "Signature", "bind", "leaves_of", "signature_of"]
