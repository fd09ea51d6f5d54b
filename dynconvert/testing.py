"""Tiny models and routing helpers for tests (shipped, like torchao.testing).

Every builder returns a small model with *random* weights everywhere (zero-initialised gates,
as in DiT's adaLN-Zero, are re-drawn) so that every head, group and token really matters.

Example:
    >>> from dynconvert.testing import tiny_dit, randomize_routing
    >>> import dynconvert
    >>> model = dynconvert.convert(tiny_dit(), budget=0.5)
    >>> randomize_routing(model, keep=0.5)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from dynconvert.convert import get_state
from dynconvert.inputs import default_inputs, split_inputs
from dynconvert.plan import MlpSite
from dynconvert.routing import routing


def randomize_weights(model: nn.Module, seed: int = 0, std: float = 0.2) -> nn.Module:
    """Re-draw every floating parameter from N(0, std^2 / fan_in-ish) so no path is inert."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            if p.dim() >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif name.endswith("weight"):
                p.copy_(1.0 + std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def tiny_dit(seed: int = 0, **overrides: Any) -> nn.Module:
    """Built-in DiT, 2 blocks, 2 heads x 16 dims, 8x8x4 latents, 10 classes, random weights."""
    from dynconvert.models import build_model

    torch.manual_seed(seed)
    return randomize_weights(build_model("dit-tiny", **overrides).eval(), seed)


def tiny_uvit(seed: int = 0, **overrides: Any) -> nn.Module:
    """Built-in U-ViT (in/mid/out blocks with long skips), tiny, random weights."""
    from dynconvert.models import build_model

    torch.manual_seed(seed)
    return randomize_weights(build_model("uvit-tiny", **overrides).eval(), seed)


def tiny_diffusers_dit(seed: int = 0, layers: int = 2) -> nn.Module:
    """diffusers DiTTransformer2DModel (adaLN-Zero blocks), 2 heads x 8 dims, 8x8x4 latents."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    m = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
        num_layers=layers, sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero",
    )
    return randomize_weights(m.eval(), seed)


def tiny_pixart(seed: int = 0, layers: int = 2) -> nn.Module:
    """diffusers PixArtTransformer2DModel (self- and cross-attention), tiny, random weights."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    m = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=layers,
        sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=12, norm_num_groups=1,
    )
    return randomize_weights(m.eval(), seed)


TINY_BUILDERS = {
    "dit": tiny_dit,
    "uvit": tiny_uvit,
    "diffusers-dit": tiny_diffusers_dit,
    "pixart": tiny_pixart,
}


def call(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Run a model on (args, kwargs) or a tuple/dict and return its output tensor."""
    args, kwargs = split_inputs(inputs)
    out = model(*args, **kwargs)
    return out.sample if hasattr(out, "sample") else out


def randomize_routing(
    model: nn.Module,
    keep: float = 0.5,
    seed: int = 0,
    *,
    tokens: float | None = None,
    vary_with_t: bool = True,
    example_inputs: Any = None,
) -> None:
    """Set the routers so that roughly ``keep`` of heads and groups (and ``tokens`` of tokens,
    default ``keep``) are on in evaluation.

    With ``vary_with_t`` the width masks change with the timestep (each unit on for about
    ``keep`` of the timesteps); without it exactly ``round(keep * units)`` units are on at every
    t. Token routers get random weights and a bias at the quantile that keeps the requested
    fraction of tokens of ``example_inputs`` (default: the model's own example inputs).
    """
    bank = get_state(model)
    tokens = keep if tokens is None else tokens
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb = bank.t_embed(torch.arange(1000, dtype=torch.float32, device=bank.always_on.device))
        for key, router in bank.width.items():
            units = router.out_features
            on = int(bank.always_on[int(key)])
            if vary_with_t:
                router.weight.copy_(torch.randn(router.weight.shape, generator=g) * 3 / math.sqrt(router.in_features))
                raw = (emb @ router.weight.T).cpu()  # (1000, U): each unit on for `keep` of the t
                router.bias.copy_(_threshold(raw, keep, dim=0))
            else:
                router.weight.zero_()
                k = max(1, min(units, round(keep * units)))
                others = [u for u in torch.randperm(units, generator=g).tolist() if u != on]
                chosen = set([on, *others[: k - 1]])
                router.bias.copy_(torch.tensor([1.0 if u in chosen else -1.0 for u in range(units)]))
        if bank.token:
            _randomize_tokens(model, bank, tokens, g, example_inputs)
    bank.clear_cache()


def _threshold(raw: torch.Tensor, keep: float, dim: int | None = None) -> torch.Tensor:
    """The bias that puts ``keep`` of the ``raw`` logits above 0 (along ``dim``, or overall)."""
    if keep >= 1:
        low = raw.min() if dim is None else raw.min(dim).values
        return 1.0 - low
    if keep <= 0:
        high = raw.max() if dim is None else raw.max(dim).values
        return -1.0 - high
    return -torch.quantile(raw, 1.0 - keep, dim=dim)


def _randomize_tokens(model: nn.Module, bank: Any, keep: float, g: torch.Generator, example_inputs: Any) -> None:
    """Random token routers whose thresholds keep ``keep`` of the tokens each site really sees.

    One evaluation call sets them site by site: just before each MLP runs, its router's bias is
    put at the quantile of the logits of the tokens reaching it (so later blocks see the effect
    of earlier skips, as they will at run time).
    """
    inputs = split_inputs(example_inputs) if example_inputs is not None else default_inputs(model)
    modules = dict(model.named_modules())
    for router in bank.token.values():
        router.net[0].bias.fill_(1.0)  # keep the hidden ReLUs mostly active: no ties at logit 0
        last = router.net[2]
        last.weight.copy_(torch.randn(last.weight.shape, generator=g) * 2 / math.sqrt(last.in_features))
        last.bias.zero_()
    handles = []
    for s in bank.plan.sites:
        if isinstance(s, MlpSite) and s.token:
            router = bank.token[str(s.index)]

            def set_bias(mod: nn.Module, args: tuple, router: nn.Module = router) -> None:
                with torch.no_grad():
                    last = router.net[2]
                    last.bias.zero_()
                    last.bias.copy_(_threshold(router(args[0]).flatten().float().cpu(), keep))

            handles.append(modules[s.fc1[0]].register_forward_pre_hook(set_bias))
    try:
        with routing(model, "eval", "masked"), torch.no_grad():
            call(model, inputs)
    finally:
        for h in handles:
            h.remove()
