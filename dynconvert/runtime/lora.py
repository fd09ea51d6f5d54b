"""Routed adapters: peft LoRA layers around routed Linears are adopted, kept and let go.

peft (and what builds on it: diffusers' ``load_lora_adapter``, ``add_adapter``,
``load_lora_weights`` on a pipeline, peft's ``inject_adapter_in_model`` and ``get_peft_model``)
wraps a Linear by putting a ``LoraLayer`` in its place whose ``base_layer`` is that Linear. When
the Linear is routed (a DynamicLinear or DynamicConv of a converted model), the module
registration hook installed by convert adopts the wrapper as it is put in place:

- its class becomes a subclass of its own peft class (``isinstance`` checks still hold) whose
  forward hands the call to the routed Linear, which keeps a reference to the wrapper
  (``_dc_lora``) so that its site runtime adds the adapters' updates cut like itself
  (``lora_run.py``);
- adding, deleting, merging or unmerging an adapter drops the slice caches of its model, and
  merging (which writes the base weight through ``.data``, unseen by torch's version counter)
  bumps the weight's version, so every cache keyed by versions notices;
- replacing the wrapper by its base layer (peft ``merge_and_unload`` / ``unload``, diffusers
  ``unload_lora``) lets it go; ``revert`` gives it back its peft class.

Adapters attached before ``convert`` are lifted off during analysis (:func:`lifted`) and adopted
after. Refused with :class:`LoraNotRoutedError`, before the module is put in place (each message
names the kind and the reason): adapters that are not LoRA (LoHa, LoKr, IA3, OFT, ... : their
updates are not low-rank products that can be cut), LoRA variants other than DoRA and MiCA
(Arrow, aLoRA, BD-LoRA, VeLoRA, MonteCLoRA, KaSA, QALoRA), DoRA on a convolution, LoRA on a
depthwise convolution (its A mixes the channels that routing switches off one by one), and
peft's per-sample ``adapter_names`` at call time.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from dynconvert.errors import LoraNotRoutedError
from dynconvert.runtime.dynamic import DynamicConv, DynamicLinear
from dynconvert.runtime.lora_run import base_of, lora_of

ROUTED_VARIANTS = ("DoraLinearVariant", "MiCALinearVariant")
"""peft LoRA variants routed (MiCA computes as plain LoRA; DoRA by ``lora_run._dora``)."""
_hook: Any = None
_ROUTED_CLASSES: dict[type, type] = {}


def lora_layer_class() -> type | None:
    """peft's ``LoraLayer`` when peft is imported (no LoRA layer can exist before), else None."""
    module = sys.modules.get("peft.tuners.lora.layer")
    return getattr(module, "LoraLayer", None)


def is_lora(module: Any) -> bool:
    """True for a peft LoRA layer (adopted or not)."""
    cls = lora_layer_class()
    return cls is not None and isinstance(module, cls)


def is_routed(module: Any) -> bool:
    """True for a routed Linear or convolution of a converted model."""
    return isinstance(module, (DynamicLinear, DynamicConv))


class RoutedLora:
    """Mixed into an adopted peft LoRA layer: its routed base layer computes the adapters."""

    _dc_peft: type  # the peft class it had before adoption

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x -> the routed Linear's output with the active adapters' updates (``lora_run``)."""
        if kwargs.get("adapter_names") is not None:
            raise LoraNotRoutedError(
                "peft's per-sample adapter_names is not routed on a converted model; activate "
                "the adapters with set_adapter / set_adapters instead"
            )
        if self.disable_adapters and self.merged:  # as peft: disabling unmerges
            self.unmerge()
        return self.get_base_layer()(x, *args, **kwargs)

    def update_layer(self, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """peft's, then refused (and taken back out) when the new adapter is not routed."""
        super().update_layer(adapter_name, *args, **kwargs)
        reason = _not_routed(self, self.get_base_layer())
        if reason is not None:
            super().delete_adapter(adapter_name)
            raise LoraNotRoutedError(f"{_name(self)}: {reason}; the adapter was not added")
        refresh(self)

    def delete_adapter(self, adapter_name: str) -> None:
        """peft's, then the caches refreshed."""
        super().delete_adapter(adapter_name)
        refresh(self)

    def merge(self, *args: Any, **kwargs: Any) -> None:
        """peft's merge into the base weights, then their versions bumped (see module doc)."""
        super().merge(*args, **kwargs)
        refresh(self, weights=True)

    def unmerge(self, *args: Any, **kwargs: Any) -> None:
        """peft's unmerge, then the base weights' versions bumped."""
        super().unmerge(*args, **kwargs)
        refresh(self, weights=True)


def refresh(wrapper: Any, weights: bool = False) -> None:
    """Drop the cut weights of ``wrapper``'s model (and with ``weights`` bump the versions of its
    base weights, which peft edits through ``.data``)."""
    base = base_of(wrapper)
    if weights:
        for p in (base.weight, getattr(base, "bias", None)):
            if p is not None:
                torch.autograd.graph.increment_version(p)
    rt = getattr(base, "_dc_rt", None)
    if rt is not None:
        rt.bank.slices.clear()
        rt.bank.planner.clear()
    wrapper.__dict__.pop("_dc_norms", None)


def _name(wrapper: Any) -> str:
    return getattr(base_of(wrapper), "_dc_name", type(wrapper).__name__)


def _not_routed(wrapper: Any, base: nn.Module) -> str | None:
    """Why this LoRA layer cannot be routed on ``base``, or None when it can."""
    if getattr(base, "_dc_role", None) == "mlp_mid" or getattr(base, "groups", 1) > 1:
        return (
            "LoRA on a depthwise convolution of a convolutional MLP is not routed (its A mixes "
            "the channels routing switches off one group at a time); leave it out of "
            "target_modules"
        )
    for variant in getattr(wrapper, "lora_variant", {}).values():
        kind = type(variant).__name__
        if kind not in ROUTED_VARIANTS or (kind.startswith("Dora") and not _is_linear(base)):
            what = "DoRA on a convolution" if kind.startswith("Dora") else f"the {kind} variant"
            return (
                f"{what} is not routed on a converted model (routed: plain LoRA, rsLoRA, MiCA "
                "and DoRA on Linears); use one of those, or revert the model, apply it and "
                "convert again"
            )
    if getattr(wrapper, "fan_in_fan_out", False):
        return "fan_in_fan_out=True (Conv1D weights) is not routed; routed Linears are nn.Linear"
    return None


def _is_linear(module: nn.Module) -> bool:
    return module.weight.dim() == 2


def adopt(wrapper: Any) -> None:
    """Route a peft LoRA layer whose base layer is routed (the module docstring says how).

    Raises:
        LoraNotRoutedError: the adapter is of a kind that is not routed (nothing changed).

    Example:
        >>> adopt(model.blocks[0].attn.qkv)  # doctest: +SKIP  (the registration hook calls it)
    """
    base = base_of(wrapper)
    reason = _not_routed(wrapper, base)
    if reason is not None:
        raise LoraNotRoutedError(f"{_name(wrapper)}: {reason}. Nothing was changed")
    cls = type(wrapper)
    if not issubclass(cls, RoutedLora):
        routed = _ROUTED_CLASSES.get(cls)
        if routed is None:
            routed = _ROUTED_CLASSES[cls] = type(
                f"Routed{cls.__name__}",
                (RoutedLora, cls),
                {"_dc_peft": cls, "__module__": __name__},
            )
        wrapper.__class__ = routed
    object.__setattr__(base, "_dc_lora", wrapper)  # not a submodule: no cycle in modules()
    refresh(wrapper)


def release(wrapper: Any) -> None:
    """Undo :func:`adopt`: the peft class again, and the base layer forgets the wrapper."""
    base = base_of(wrapper)
    refresh(wrapper)
    if isinstance(wrapper, RoutedLora):
        wrapper.__class__ = wrapper._dc_peft
    if lora_of(base) is wrapper:
        del base.__dict__["_dc_lora"]


def check_adoptable(layers: list[Any]) -> None:
    """Refuse LoRA layers around routed Linears that cannot be routed (before adopting any).

    Raises:
        LoraNotRoutedError: naming the first such layer and why.
    """
    for layer in layers:
        base = base_of(layer)
        reason = _not_routed(layer, base) if is_routed(base) else None
        if reason is not None:
            raise LoraNotRoutedError(f"{_name(layer)}: {reason}. The model was not converted")


def adopt_all(model: nn.Module) -> None:
    """Adopt every LoRA layer of ``model`` whose base layer is routed (convert, load)."""
    for module in list(model.modules()):
        if is_lora(module) and is_routed(base_of(module)) and lora_of(base_of(module)) is None:
            adopt(module)


def release_all(model: nn.Module) -> None:
    """Release every adopted LoRA layer of ``model`` (revert keeps them as peft layers)."""
    for module in list(model.modules()):
        if isinstance(module, RoutedLora):
            release(module)


@contextmanager
def lifted(model: nn.Module) -> Iterator[list[tuple[nn.Module, str, Any]]]:
    """Take every LoRA layer of ``model`` out of its parent (its base layer in its place) and put
    them back on exit: analysis sees the plain model, ``state_dict`` has the base model's keys.

    Yields:
        (parent, name, LoRA layer) of each layer lifted.

    Example:
        >>> with lifted(model):  # doctest: +SKIP
        ...     weights = model.state_dict()  # no lora_A / base_layer keys
    """
    taken = []
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if is_lora(child):
                taken.append((parent, name, child))
    for parent, name, child in taken:  # straight into _modules: the registration hook stays out
        parent._modules[name] = base_of(child)
    try:
        yield taken
    finally:
        for parent, name, child in taken:
            parent._modules[name] = child


def install_hook() -> None:
    """Install (once per process) the registration hook that adopts LoRA layers around routed
    Linears and refuses other replacements of them (convert calls it)."""
    global _hook
    if _hook is None:
        _hook = register_module_module_registration_hook(_on_register)


def _on_register(parent: nn.Module, name: str, module: Any) -> None:
    """Global module-registration hook (runs before ``module`` is put in place)."""
    old = parent._modules.get(name) if isinstance(parent, nn.Module) else None
    if old is None or module is old:
        return
    adopted = isinstance(old, RoutedLora)
    if not (adopted or is_routed(old)):
        return
    base = base_of(old)
    if adopted and module is base:  # unloaded: the wrapper goes, the routed Linear stays
        release(old)
        return
    if is_lora(module) and base_of(module) is base:
        adopt(module)  # raises, before anything changes, for a kind that is not routed
        if adopted:
            release(old)  # another LoRA layer around the same Linear takes its place
        return
    raise LoraNotRoutedError(
        f"{getattr(base, '_dc_name', name)} is a routed Linear of a converted model; replacing "
        f"it with {_kind(module)} would bypass its routing (only peft LoRA layers are routed: "
        "their low-rank updates are cut with the Linear's heads, channel groups and tokens). "
        "Nothing was replaced; merge this adapter into the weights before converting, or revert "
        "the model, apply it and convert again"
    )


def _kind(module: Any) -> str:
    """What replaces a routed Linear, in words: peft's tuner name for a peft layer (LoHa,
    LoKr, IA3, OFT, ...), else its class."""
    path = f"{type(module).__module__}.{type(module).__qualname__}"
    parts = type(module).__module__.split(".")
    if parts[:2] == ["peft", "tuners"] and len(parts) > 2:
        return f"a peft {parts[2]} adapter layer ({path})"
    return path
