"""A converted diffusers model keeps behaving like one: save_pretrained, layerwise casting, LoRA.

Registered in ``state.ATTACH_HOOKS``, :func:`attach_diffusers` runs whenever a diffusers model
is converted or loaded, and :func:`detach_diffusers` undoes it on revert. On the model instance
(never on its class) it sets:

- ``save_pretrained``: diffusers' own, then ``dynconvert.json`` beside the weights it wrote, so
  ``dynconvert.load(folder)`` (or a pipeline folder, ``pipe.save_pretrained``) brings the model
  back converted. diffusers ``from_pretrained`` of that folder gives the static model, which
  the warning issued at save time and the note in config.json both say;
- ``_skip_layerwise_casting_patterns``: the routers (a few thousand parameters) keep their
  dtype under ``enable_layerwise_casting``, as diffusers keeps LoRA layers: stored in float8
  their decisions would drift from the calibrated ones;
- LoRA: the adapters peft injects would wrap routed Linears and add full-width updates that the
  routing does not slice (a switched-off head or a skipped token would still get its LoRA
  update). Until adapters are routed, ``add_adapter`` / ``load_lora_adapter`` refuse, and a
  module-registration hook refuses any module that replaces a routed Linear, before it is put
  in place. Merging the LoRA into the base weights first works (see :data:`LORA_FIX`).
"""

from __future__ import annotations

import functools
import inspect
import types
import warnings
from pathlib import Path
from typing import Any

from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from dynconvert.errors import DynconvertError
from dynconvert.io.limits import read_json
from dynconvert.io.save import (
    RECORD,
    is_diffusers_model,
    write_diffusers_config,
    write_pretrained_record,
)
from dynconvert.runtime.dynamic import DynamicLinear
from dynconvert.runtime.state import ATTACH_HOOKS, DETACH_HOOKS

ROUTER_PATTERN = r"^dynconvert(\.|$)"
"""The layerwise-casting skip pattern of the RouterBank (module names are matched by re.search)."""
LORA_FIX = (
    "merge the LoRA into the base weights before converting (peft: merge_and_unload(); diffusers "
    "pipelines: fuse_lora() then unload_lora_weights()), or revert the model, apply the adapter "
    "and convert again"
)
"""How to use a LoRA with a converted model today (the error messages end with it)."""
_SET = ("save_pretrained", "add_adapter", "load_lora_adapter", "_skip_layerwise_casting_patterns")
_hook_handle: Any = None


class LoraNotRoutedError(DynconvertError):
    """A LoRA adapter would be applied to routed Linears, whose routing does not slice it."""


def attach_diffusers(model: nn.Module) -> None:
    """Set the instance attributes described in the module docstring (diffusers models only).

    Example:
        >>> attach_diffusers(model)   # doctest: +SKIP  (convert and load call it)
    """
    _install_registration_hook()
    if not is_diffusers_model(model):
        return
    model.save_pretrained = _bound_save_pretrained(model)
    skip = getattr(type(model), "_skip_layerwise_casting_patterns", None) or []
    model._skip_layerwise_casting_patterns = [*skip, ROUTER_PATTERN]
    for name in ("add_adapter", "load_lora_adapter"):
        if hasattr(type(model), name):
            setattr(model, name, types.MethodType(refuse_lora, model))


def detach_diffusers(model: nn.Module) -> None:
    """Remove what :func:`attach_diffusers` set on the instance (revert)."""
    for name in _SET:
        model.__dict__.pop(name, None)


def save_pretrained(self: nn.Module, save_directory: Any, *args: Any, **kwargs: Any) -> None:
    """diffusers ``save_pretrained``, then the dynconvert record beside the weights.

    Takes the arguments of the model class's ``save_pretrained``. Warns (UserWarning) that
    diffusers ``from_pretrained`` gives back the static model and that ``dynconvert.load`` keeps
    the routers, and, with ``push_to_hub=True``, that the record written after the upload must
    be pushed too.

    Example:
        >>> model.save_pretrained("out/")          # doctest: +SKIP
        >>> model = dynconvert.load("out/")        # doctest: +SKIP
    """
    original = type(self).save_pretrained
    original(self, save_directory, *args, **kwargs)
    bound = inspect.signature(original).bind(self, save_directory, *args, **kwargs)
    bound.apply_defaults()
    options = dict(bound.arguments)
    options.update(options.pop("kwargs", {}) or {})
    if not options.get("is_main_process", True):
        return
    out = Path(save_directory)
    files = _written_weights(
        out, bool(options.get("safe_serialization", True)), options.get("variant")
    )
    write_pretrained_record(self, out, files)
    write_diffusers_config(self, out)
    warnings.warn(
        f"saved a converted {type(self).__name__} to {out}: dynconvert.load({str(out)!r}) (or "
        "dynconvert.load of the pipeline folder) rebuilds it with its routers; diffusers "
        "from_pretrained gives back the static model without them",
        UserWarning,
        stacklevel=2,
    )
    if options.get("push_to_hub"):
        warnings.warn(
            f"push_to_hub uploaded {out} before {RECORD} was written: the copy on the hub loads "
            f"only as the static model; upload the folder again (huggingface_hub upload_folder) "
            f"so it holds {RECORD}",
            UserWarning,
            stacklevel=2,
        )


def _bound_save_pretrained(model: nn.Module) -> types.MethodType:
    """:func:`save_pretrained` bound to ``model``, with the signature of its class's own: a
    diffusers pipeline hands ``safe_serialization``, ``variant`` and ``max_shard_size`` only to
    a save method whose signature names them (``*args, **kwargs`` silently lost them)."""

    def method(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        save_pretrained(self, *args, **kwargs)

    functools.update_wrapper(method, save_pretrained)
    method.__signature__ = inspect.signature(type(model).save_pretrained)
    return types.MethodType(method, model)


def _written_weights(out: Path, safe: bool, variant: str | None) -> list[str]:
    """The weights file save_pretrained wrote, or its shard index followed by the shards."""
    stem, ext = "diffusion_pytorch_model", ".safetensors" if safe else ".bin"
    name = f"{stem}.{variant}{ext}" if variant else f"{stem}{ext}"
    index = (
        out / f"{stem}{ext}.index.{variant}.json" if variant else out / f"{stem}{ext}.index.json"
    )
    if index.is_file():
        weight_map = read_json(index, DynconvertError, root=out).get("weight_map", {})
        shards = sorted(set(weight_map.values()))
        return [index.name, *shards]
    if not (out / name).is_file():
        raise DynconvertError(
            f"save_pretrained wrote no {name} in {out}; save with dynconvert.save(model, folder)"
        )
    return [name]


def refuse_lora(self: nn.Module, *args: Any, **kwargs: Any) -> None:
    """``add_adapter`` / ``load_lora_adapter`` of a converted model: refused, nothing changed.

    Raises:
        LoraNotRoutedError: always, with the fix.
    """
    raise LoraNotRoutedError(
        f"this {type(self).__name__} is converted: its routers switch heads, channel groups and "
        f"tokens of the Linears a LoRA adapts, and would not switch off the adapter's update. "
        f"Nothing was changed; {LORA_FIX}"
    )


def _install_registration_hook() -> None:
    """Install (once per process) the hook that refuses to replace a routed Linear."""
    global _hook_handle
    if _hook_handle is None:
        _hook_handle = register_module_module_registration_hook(_refuse_replacing_routed)


def _refuse_replacing_routed(parent: nn.Module, name: str, module: Any) -> None:
    """Global module-registration hook: raises before a routed Linear is replaced by a wrapper."""
    old = parent._modules.get(name)
    if type(old) is DynamicLinear and module is not old and module is not None:
        raise LoraNotRoutedError(
            f"{old._dc_name} is a routed Linear of a converted model, and replacing it with "
            f"{type(module).__name__} (a LoRA or other adapter layer) would bypass its routing. "
            f"Nothing was replaced; {LORA_FIX}"
        )


ATTACH_HOOKS.append(attach_diffusers)
DETACH_HOOKS.append(detach_diffusers)
