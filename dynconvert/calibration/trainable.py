"""What a calibration run trains (``CalibrationConfig.trainable``), and its LoRA adapter.

- "all": every parameter whose ``requires_grad`` is set (the paper: routers and model);
- "routers": the router bank only (base weights frozen);
- "lora": the router bank plus one LoRA adapter, named ``dynconvert``, that :func:`attach_lora`
  puts on the routed Linears (peft ``LoraLayer``; routed with them, ``runtime/lora.py``). The
  base weights stay frozen, so AdamW's moments, the gradients and the EMA cover only the
  adapter and the routers: about ``2 r (in + out)`` values per Linear instead of ``in * out``.
  With ``td_lora`` each routed Linear also gets a TD-LoRA gate (``runtime/lora_run.py``). At
  the end :func:`merge_lora` merges the adapter into the base weights (``lora_save="merge"``,
  the default: the result has no peft layer), or it is kept and saved as a peft file.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dynconvert.errors import ConfigError
from dynconvert.runtime.lora import is_lora, is_routed
from dynconvert.runtime.lora_run import TD_ADAPTER, add_gates, base_of
from dynconvert.runtime.state import get_state

LORA_ROUTER_EMBED_DIM = 32
"""``router_embed_dim`` a recipe's ``trainable="lora"`` run converts with unless its ``convert``
section sets one. The routers' shared timestep encoder (2 * (e^2 + e) values: 131,584 at the
default 256, 27% of the digits DiT) must be trained: a width router starts at zero weights and a
+15 bias (the full model) and switches a unit off only once ``W e(t)`` passes -15; ``e(t)`` at its
random init is small (rms 0.13-0.19), so with the encoder frozen ``|W e(t)|`` stays below about
13 after 400 AdamW steps at lr 1e-3 however ``W`` moves, no unit is ever switched off and the
token routers carry the whole budget (samples fall apart). Trained, the encoder's output grows
about 18 times (rms 0.19 -> 3.4 on digits). At 32 it is 2,112 values (docs/lora.md)."""


def routed_targets(model: nn.Module) -> list[str]:
    """Names of the routed Linears and pointwise convolutions of a converted model (what
    ``trainable="lora"`` wraps by default; depthwise convolutions are not routed for LoRA).

    Example:
        >>> import dynconvert
        >>> from dynconvert.testing import tiny_dit
        >>> routed_targets(dynconvert.convert(tiny_dit(), 0.5))[:2]
        ['blocks.0.attn.proj', 'blocks.0.attn.qkv']
    """
    names = []
    for name, module in model.named_modules():
        if is_lora(module) or not is_routed(module):
            continue
        if getattr(module, "_dc_role", None) == "mlp_mid" or getattr(module, "groups", 1) > 1:
            continue
        names.append(name[: -len(".base_layer")] if name.endswith(".base_layer") else name)
    return sorted(names)


def adapter_numel(model: nn.Module, cfg: Any) -> int:
    """Parameters of the adapter ``attach_lora`` would add with ``cfg``'s rank and targets (an
    A and a B per wrapped Linear, a TD-LoRA gate each with ``td_lora``), for the memory plan.

    Example:
        >>> import dynconvert
        >>> from dynconvert.calibration.config import CalibrationConfig
        >>> from dynconvert.testing import tiny_dit
        >>> m = dynconvert.convert(tiny_dit(), 0.5)
        >>> adapter_numel(m, CalibrationConfig(target=0.5, trainable="lora", lora_rank=4)) > 0
        True
    """
    from dynconvert.runtime.state import get_state

    targets = cfg.lora_targets
    names = routed_targets(model)
    if targets:
        names = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
    embed = get_state(model).config.router_embed_dim if cfg.td_lora else 0
    total = 0
    for name in names:
        shape = model.get_submodule(name).weight.shape  # (out, in, ...)
        total += cfg.lora_rank * (shape[0] + shape[1] + (embed + 1 if embed else 0))
    return total


def attach_lora(model: nn.Module, cfg: Any) -> None:
    """Put the ``dynconvert`` LoRA adapter of a ``trainable="lora"`` run on ``model`` (once: a
    model that has it already is left as it is). Its A is drawn with ``cfg.seed``, its B is
    zero: the model computes what it did before.

    Raises:
        ConfigError: peft is missing, the model already carries other LoRA adapters, or
            ``lora_targets`` names no module.

    Example:
        >>> cfg = CalibrationConfig(target=0.5, trainable="lora", lora_rank=4)  # doctest: +SKIP
        >>> attach_lora(model, cfg)  # doctest: +SKIP
    """
    if cfg.trainable != "lora":
        return
    names = {n for m in model.modules() if is_lora(m) for n in m.lora_A}
    if TD_ADAPTER in names:
        return
    if names:
        raise ConfigError(
            f"trainable='lora' trains its own adapter, but the model carries LoRA adapters "
            f"({', '.join(sorted(names))}); fuse and unload them first (fuse_lora + unload_lora)"
        )
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError("trainable='lora' needs peft: pip install peft") from None
    targets = list(cfg.lora_targets or routed_targets(model))
    config = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha or cfg.lora_rank,
        target_modules=targets,
        lora_dropout=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # A's init: the same adapter whatever ran before
        try:
            inject_adapter_in_model(config, model, adapter_name=TD_ADAPTER)
        except ValueError as err:
            raise ConfigError(f"calibration.lora_targets: {err}") from err
    if cfg.td_lora:
        wrapped = [base_of(m)._dc_name for m in model.modules() if _ours(m)]
        add_gates(get_state(model), [n for n in wrapped if n], cfg.lora_rank)


def _ours(module: nn.Module) -> bool:
    """A LoRA layer holding the ``dynconvert`` adapter around a routed Linear."""
    return is_lora(module) and TD_ADAPTER in module.lora_A and is_routed(base_of(module))


def router_parameters(state: Any) -> list[nn.Parameter]:
    """The router parameters of a converted model's state (what ``trainable="routers"`` trains,
    and what a checkpoint's optimizer state then holds; TD-LoRA gates included).

    Example:
        >>> params = router_parameters(get_state(model))  # doctest: +SKIP
    """
    if hasattr(state, "router_parameters"):
        return list(state.router_parameters())
    return list(state.parameters())


def trainable_parameters(model: nn.Module, cfg: Any) -> list[nn.Parameter]:
    """The parameters ``cfg.trainable`` trains, in the model's order (the optimiser's order,
    which a checkpoint's optimiser state follows); changes no flag.

    Example:
        >>> params = trainable_parameters(model, cfg)  # doctest: +SKIP
    """
    if cfg.trainable == "all":
        return [p for p in model.parameters() if p.requires_grad]
    keep = {id(p) for p in router_parameters(get_state(model))}
    if cfg.trainable == "lora":
        for m in model.modules():
            if is_lora(m) and TD_ADAPTER in m.lora_A:
                keep |= {id(p) for p in m.lora_A[TD_ADAPTER].parameters()}
                keep |= {id(p) for p in m.lora_B[TD_ADAPTER].parameters()}
    return [p for p in model.parameters() if id(p) in keep]


def select_trainable(model: nn.Module, cfg: Any) -> list[nn.Parameter]:
    """Set ``requires_grad`` to what ``cfg.trainable`` trains; returns those parameters.

    Example:
        >>> params = select_trainable(model, cfg)  # doctest: +SKIP
    """
    params = trainable_parameters(model, cfg)
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return params


def merge_lora(model: nn.Module, cfg: Any) -> None:
    """Merge the ``dynconvert`` adapter into the base weights and take its LoRA layers off
    (``lora_save="merge"``); nothing to do for other settings.

    Example:
        >>> merge_lora(result.model, cfg)  # doctest: +SKIP
    """
    if cfg.trainable != "lora" or cfg.lora_save != "merge":
        return
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if is_lora(child) and TD_ADAPTER in child.lora_A:
                with torch.no_grad():
                    child.merge(adapter_names=[TD_ADAPTER])
                setattr(parent, name, child.get_base_layer())  # the routed Linear goes back
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict):
        configs.pop(TD_ADAPTER, None)
        if not configs:
            del model.peft_config
