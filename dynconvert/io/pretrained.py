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
- LoRA: nothing. peft's LoRA layers (``add_adapter``, ``load_lora_adapter``, a pipeline's
  ``load_lora_weights``) are routed with the Linears they wrap, whatever the model class
  (``runtime/lora.py``); this module only re-exports :class:`LoraNotRoutedError`, which that
  module raises for the adapter kinds it does not route.
"""

from __future__ import annotations

import functools
import inspect
import types
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from dynconvert.errors import DynconvertError, LoraNotRoutedError
from dynconvert.io.limits import read_json
from dynconvert.io.save import (
    RECORD,
    is_diffusers_model,
    write_diffusers_config,
    write_pretrained_record,
)
from dynconvert.runtime.state import ATTACH_HOOKS, DETACH_HOOKS

ROUTER_PATTERN = r"^dynconvert(\.|$)"
"""The layerwise-casting skip pattern of the RouterBank (module names are matched by re.search)."""
_SET = ("save_pretrained", "_skip_layerwise_casting_patterns")
__all__ = [
    "LoraNotRoutedError", "ROUTER_PATTERN", "attach_diffusers", "detach_diffusers",
    "save_pretrained",
]  # fmt: skip


def attach_diffusers(model: nn.Module) -> None:
    """Set the instance attributes described in the module docstring (diffusers models only).

    Example:
        >>> attach_diffusers(model)   # doctest: +SKIP  (convert and load call it)
    """
    if not is_diffusers_model(model):
        return
    model.save_pretrained = _bound_save_pretrained(model)
    skip = getattr(type(model), "_skip_layerwise_casting_patterns", None) or []
    model._skip_layerwise_casting_patterns = [*skip, ROUTER_PATTERN]


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


ATTACH_HOOKS.append(attach_diffusers)
DETACH_HOOKS.append(detach_diffusers)
