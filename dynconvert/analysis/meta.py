"""Analysing a model whose weights are on the meta device (built without memory for them).

Export runs on shapes only, so a meta model is captured whole once its example inputs are on
the meta device too (:func:`to_meta`). Some models read values of their inputs in Python
(Lumina 2 turns its caption mask into lengths with ``.tolist()``): for their eager runs the
inputs stay on the CPU and :class:`MetaMix` moves a CPU tensor to the meta device only where
it meets one, so what is computed from inputs alone keeps its values and everything the
weights touch has shapes only.

Example:
    >>> lin = torch.nn.Linear(4, 3, device="meta")
    >>> with MetaMix():
    ...     y = lin(torch.ones(2, 4))
    >>> y.device, tuple(y.shape)
    (device(type='meta'), (2, 3))
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree


def is_meta(model: torch.nn.Module) -> bool:
    """Whether some parameter or buffer of ``model`` is on the meta device (no data).

    Example:
        >>> is_meta(torch.nn.Linear(2, 2)), is_meta(torch.nn.Linear(2, 2, device="meta"))
        (False, True)
    """
    return any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def to_meta(value: Any) -> Any:
    """Every tensor in a nest of tuples, lists and dicts on the meta device.

    Example:
        >>> to_meta({"x": torch.ones(2)})["x"].device
        device(type='meta')
    """
    return pytree.tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, value)


class MetaMix(TorchFunctionMode):
    """A call that mixes meta and CPU tensors runs on the meta device (the CPU ones are moved);
    a call on CPU tensors only runs as usual. Under export (a meta model's capture), a table
    the forward makes on the CPU (``torch.arange(n)``) is moved where it meets the weights."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        kwargs = kwargs or {}
        # Called for every torch function under export (300k calls for Flux.1-dev): a look at
        # the arguments and one level of lists, not a pytree flatten, decides the usual case.
        if _mixed(args, kwargs):
            args, kwargs = to_meta((args, kwargs))
        elif func in _MOVES and args and isinstance(args[0], torch.Tensor) and _on_meta(args[0]):
            # A table made at construction (Lumina 2's rotary list, not a buffer) is on meta
            # with the weights; moving it to the inputs' device keeps it there (shapes only).
            if func is torch.Tensor.cpu:
                return args[0]
            args, kwargs = _to_meta_device(args, kwargs)
        return func(*args, **kwargs)


_MOVES = (torch.Tensor.to, torch.Tensor.cpu)


def _to_meta_device(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``Tensor.to``'s arguments with any device (a torch.device or a string) made ``meta``."""
    out = tuple(torch.device("meta") if isinstance(a, (torch.device, str)) else a for a in args)
    if "device" in kwargs:
        kwargs = {**kwargs, "device": torch.device("meta")}
    return out, kwargs


def _mixed(args: tuple, kwargs: dict) -> bool:
    """Whether the tensors among ``args``/``kwargs`` (and in their lists and tuples) are some
    on meta and some not; deeper nests (rare in a torch call) by a full flatten."""
    found = set()
    for a in (*args, *kwargs.values()):
        for t in a if isinstance(a, (list, tuple)) else (a,):
            if isinstance(t, torch.Tensor):
                found.add(_on_meta(t))
            elif isinstance(t, (list, tuple, dict)):
                found.update(
                    _on_meta(x) for x in pytree.tree_leaves(t) if isinstance(x, torch.Tensor)
                )
    return len(found) == 2


def _on_meta(t: torch.Tensor) -> bool:
    # A plain tensor's is_meta is a C attribute; a fake one's (under export) goes through
    # Python at 8 us a call, its device at about 1 us.
    return t.is_meta if type(t) is torch.Tensor else t.device.type == "meta"


@contextlib.contextmanager
def buffers_on_meta(model: torch.nn.Module) -> Iterator[None]:
    """Every buffer of a meta model on the meta device while export traces it, put back after.

    accelerate's ``init_empty_weights`` leaves buffers (a sincos position table) on the CPU
    while the parameters are on meta: export's fake tensors refuse to mix the two devices.

    Example:
        >>> m = torch.nn.BatchNorm1d(2).to_empty(device="meta")
        >>> m.register_buffer("table", torch.ones(2))
        >>> with buffers_on_meta(m):
        ...     m.table.device.type
        'meta'
        >>> m.table.device.type
        'cpu'
    """
    moved = []
    if is_meta(model):
        for mod in model.modules():
            for name, buf in list(mod._buffers.items()):
                if buf is not None and not buf.is_meta:
                    moved.append((mod, name, buf))
                    mod._buffers[name] = buf.to("meta")
    try:
        yield
    finally:
        for mod, name, buf in moved:
            mod._buffers[name] = buf


@contextlib.contextmanager
def meta_eager(model: torch.nn.Module) -> Iterator[None]:
    """:class:`MetaMix` around an eager run of ``model`` when it is on the meta device."""
    if not is_meta(model):
        yield
        return
    with MetaMix():
        yield
