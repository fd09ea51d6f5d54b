"""One exported program: the planned path of a converted model at one width pattern, traced.

The planned path (runtime/planned/planner.py) already makes every shape of a call a function of
its *pattern* (width masks and token capacities, fixed per timestep) and its input shapes; the
timestep read that picks the pattern is the only data-dependent step, and it happens in the
model's pre-hook, before the forward. So a program is traced like this:

1. the pre-hook runs once, eagerly, with a timestep of the pattern (``bank.root_pre_hook``):
   the planner's pattern is now fixed, as before any planned call;
2. the model's forward is traced with ``torch.export`` *without* the pre-hook (the class's
   ``forward`` is called directly, as the CUDA graphs runner does): the timestep is an input
   like any other, read only by the model's own embedding; width decisions, capacities, top-k
   gather and scatter are those of the pattern.

Weights are inputs, not constants, so that every program shares one copy on disk
(``torch.func.functional_call`` replaces the parameters and buffers by the program's
``weights`` input). The planner's pre-sliced weights (per Linear and unit set) are inputs too
(``slices``): the loader cuts them once from the shared weights with the index tensors saved
beside them (``index_select``, what ``Planner.sliced`` computes), so a program runs on
contiguous slices as the planned path does. The planner's token-overflow counter, a device
tensor the planned path adds to in place, becomes a second output: ``(dropped, wanted)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dynconvert.deploy.signature import Signature
from dynconvert.errors import ExportError
from dynconvert.runtime.state import get_state


@dataclass
class SliceSpec:
    """One pre-sliced weight: rows or columns of a Linear's weight (and its bias) for a unit set."""

    weight: str  # the weight's name in the model's state (a key of the weights input)
    bias: str | None  # the bias's name when the slice cuts it too (rows), else None
    dim: int  # 0: rows (q/k/v, fc1), 1: columns (out-projection, fc2)
    index: torch.Tensor  # (n,) long, the rows or columns kept


def slice_key(module: str, axis: str, units: tuple[int, ...]) -> str:
    """The name of a slice: ``<Linear fqn>:<rows|cols>:<unit ids>``.

    Example:
        >>> slice_key("blocks.0.attn.qkv", "rows", (0, 2))
        'blocks.0.attn.qkv:rows:0.2'
    """
    return f"{module}:{axis}:{'.'.join(str(u) for u in units)}"


def cut(spec: SliceSpec, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A slice's tensors from the shared weights: ``{"w": ..., "b": ...}`` (what the planner's
    ``sliced`` computes, and what the standalone loader computes the same way)."""
    out = {"w": weights[spec.weight].index_select(spec.dim, spec.index)}
    if spec.bias is not None:
        out["b"] = weights[spec.bias].index_select(0, spec.index)
    return out


class PlannerTap:
    """Stands in for the planner's ``sliced`` and ``_count`` while a model is exported.

    ``mode`` "record": slices are computed from the module's weight (as the planner does with
    no store) and noted in ``specs``; "trace": they come from the program's ``slices`` input
    (``feed``), and the overflow deltas are kept in ``deltas`` instead of added to a tensor.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.names = {id(m): n for n, m in model.named_modules()}
        params = {id(p): n for n, p in model.named_parameters()}
        self.param_names = params
        self.specs: dict[str, SliceSpec] = {}
        self.mode = "record"
        self.feed: dict[str, torch.Tensor] = {}
        self.deltas: list[torch.Tensor] = []
        self.used: set[str] = set()  # slices recorded since the caller last emptied it

    def sliced(self, lin: nn.Module, axis: str, units: tuple[int, ...], index: torch.Tensor):
        """``Planner.sliced``'s contract: (weight slice, bias or bias slice)."""
        key = slice_key(self.names[id(lin)], axis, units)
        rows = axis == "rows"
        if self.mode == "trace" and key + ":w" in self.feed:
            return self.feed[key + ":w"], (self.feed.get(key + ":b") if rows else lin.bias)
        w = lin.weight.index_select(0 if rows else 1, index)
        b = lin.bias.index_select(0, index) if rows and lin.bias is not None else lin.bias
        weight = self.param_names.get(id(lin.weight))
        if self.mode == "record" and weight is not None:
            bias = self.param_names.get(id(lin.bias)) if rows and lin.bias is not None else None
            self.specs[key] = SliceSpec(weight, bias, 0 if rows else 1, index.detach().cpu())
            self.used.add(key)
        return w, b

    def count(self, delta: torch.Tensor) -> None:
        """``Planner._count``: (dropped, wanted) of one gathered site."""
        self.deltas.append(delta)

    @contextlib.contextmanager
    def installed(self) -> Iterator[PlannerTap]:
        """Stand in for the model's planner while the ``with`` block runs."""
        planner = get_state(self.model).planner
        planner.sliced = self.sliced  # instance attributes: the class's methods stay as they are
        planner._count = self.count
        try:
            yield self
        finally:
            del planner.sliced, planner._count


class _Body(nn.Module):
    """The model's forward without its pre-hooks (the pattern is fixed before the trace)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model

    def forward(self, named: dict[str, Any]) -> Any:
        return type(self.m).forward(self.m, **named)


class Program(nn.Module):
    """What torch.export traces: ``(weights, slices, *tensor inputs) -> (output, overflow)``.

    Holds no parameters of its own (the model is not a submodule), so the exported program has
    no weights: they are its first input.
    """

    def __init__(self, model: nn.Module, signature: Signature, tap: PlannerTap):
        super().__init__()
        object.__setattr__(self, "body", _Body(model))  # not registered: nothing to lift
        object.__setattr__(self, "tap", tap)
        self.signature = signature

    def forward(
        self, weights: dict[str, torch.Tensor], slices: dict[str, torch.Tensor], *leaves: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's prediction and the (2,) overflow count (dropped, wanted) of this call."""
        named = self.signature.rebuild(leaves)
        self.tap.feed, self.tap.deltas = slices, []
        state = {"m." + k: v for k, v in weights.items()}
        out = torch.func.functional_call(self.body, state, (named,), strict=False)
        sample = main_output(out)
        device = sample.device
        if self.tap.deltas:
            overflow = torch.stack([d.to(device) for d in self.tap.deltas]).sum(0)  # (2,)
        else:
            overflow = torch.zeros(2, dtype=torch.long, device=device)
        return sample, overflow


def main_output(out: Any) -> torch.Tensor:
    """The denoiser's prediction in a model's output: a tensor, ``.sample``, or the first item.

    Raises:
        ExportError: nothing in the output is a tensor.

    Example:
        >>> main_output((torch.zeros(1), None)).shape
        torch.Size([1])
    """
    if hasattr(out, "sample"):
        out = out.sample
    elif isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise ExportError(
            f"the model returned {type(out).__name__}; an exported program returns the model's "
            "prediction as a tensor (a tensor, an output with .sample, or a tuple starting with it)"
        )
    return out


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the model by name, detached (the programs' ``weights``)."""
    out = {n: p.detach() for n, p in model.named_parameters()}
    out.update({n: b.detach() for n, b in model.named_buffers()})
    return out


def pin_pattern(model: nn.Module, named: dict[str, Any]) -> None:
    """Run the model's routing pre-hook on a call (its timestep picks the planned pattern)."""
    with torch.no_grad():
        get_state(model).root_pre_hook(model, (), named)


def trace(
    model: nn.Module, signature: Signature, tap: PlannerTap, named: dict[str, Any],
    slices: dict[str, torch.Tensor],
) -> torch.export.ExportedProgram:  # fmt: skip
    """Export the planned forward of ``model`` at the pattern of ``named``'s timestep.

    Raises:
        ExportError: torch.export could not trace the model (its message, and what to do).
    """
    from dynconvert.deploy.signature import leaves_of

    program = Program(model, signature, tap)
    weights = state_of(model)
    leaves = tuple(leaves_of(named, signature))
    pin_pattern(model, named)
    tap.mode = "trace"
    try:
        with torch.no_grad():
            ep = torch.export.export(program, (weights, slices, *leaves), strict=False)
    except Exception as e:  # noqa: BLE001 - any tracing failure is reported with its cause
        raise ExportError(
            f"torch.export could not trace the planned forward of {type(model).__name__}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; export it with "
            "the planned path working eagerly first (dynconvert.set_routing(model, 'eval', "
            "execution='planned'))"
        ) from e
    finally:
        tap.mode = "record"
        tap.feed, tap.deltas = {}, []
        get_state(model).records = {}  # the trace's records hold fake tensors
    return ep


__all__ = [
    "PlannerTap", "Program", "SliceSpec", "cut", "main_output", "pin_pattern", "slice_key",
    "state_of", "trace",
]  # fmt: skip
