"""Facts the graph alone does not give, per module class.

The graph tells where q, k, v and the out-projection are and how their rows are laid out.
It cannot tell which attributes of the attention module hold the head count that its Python
code reshapes with: after heads are physically removed those must be lowered too, or some
modules silently compute wrong heads (docs/architecture.md, "Traps"). One entry per attention class.

Adding a model family: if its attention class reshapes with attributes other than those below,
add ``register_attention("package.module.ClassName", {"attr": "heads" | "inner"})``, where
"heads" means the attribute holds the head count and "inner" the head count times head size.
Without an entry, dynconvert looks for integer attributes equal to the head count (or the
attention width) and verifies the result by running the fast path against the masked path
once at convert time; a site that fails that check is not converted (it would save nothing).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from dynconvert.plan import ROUTER_TIMESTEPS

AttrKind = Literal["heads", "inner"]

# Attention class "package.module.Class" -> {attribute: kind}. timm reshapes with both
# num_heads and attn_dim (forgetting attn_dim does not raise: it reshapes into wrong heads).
_ATTENTION: dict[str, dict[str, AttrKind]] = {
    "timm.layers.attention.Attention": {"num_heads": "heads", "attn_dim": "inner"},
    "timm.models.vision_transformer.Attention": {"num_heads": "heads", "attn_dim": "inner"},
    # Processors reshape with heads, and some derive head_dim = inner_dim // heads (QwenImage).
    "diffusers.models.attention_processor.Attention": {
        "heads": "heads",
        "inner_dim": "inner",
        "inner_kv_dim": "inner",
    },
    "dynconvert.models.uvit.Attention": {"num_heads": "heads"},
    # Flux 2's single blocks split their fused projection by 3 * inner_dim; its other integers
    # (mlp_mult_factor 2, query_dim) may equal the head count or width without being them.
    "diffusers.models.transformers.transformer_flux2.Flux2ParallelSelfAttention": {
        "heads": "heads",
        "inner_dim": "inner",
    },
}


_UNIT = float(ROUTER_TIMESTEPS)  # the scale of a time in [0, 1] onto the routers' 0..1000

# Diffusion transformers whose pipelines pass the timestep on another scale than DDPM's
# 0..1000: class name -> (scale onto 0..1000, reversed, what they take). The graph cannot
# tell this; a wrong guess is warned about at run time (bank.py).
TIMESTEP_CONVENTIONS: dict[str, tuple[float, bool, str]] = {
    "FluxTransformer2DModel": (_UNIT, False, "sigma in [0, 1] (Flux pipelines pass t / 1000)"),
    "Flux2Transformer2DModel": (_UNIT, False, "sigma in [0, 1] (Flux 2 pipelines pass t / 1000)"),
    "ChromaTransformer2DModel": (_UNIT, False, "sigma in [0, 1] (Chroma pipelines pass t / 1000)"),
    "QwenImageTransformer2DModel": (
        _UNIT,
        False,
        "sigma in [0, 1] (QwenImage pipelines pass t / 1000)",
    ),
    "Lumina2Transformer2DModel": (
        _UNIT,
        True,
        "t in [0, 1] from noise (0) to data (1) (Lumina 2 pipelines)",
    ),
    "LuminaNextDiT2DModel": (
        _UNIT,
        True,
        "t in [0, 1] from noise (0) to data (1) (Lumina-Next pipelines)",
    ),
    "ZImageTransformer2DModel": (
        _UNIT,
        True,
        "t in [0, 1] from noise (0) to data (1) (Z-Image pipelines)",
    ),
}


def timestep_convention(
    model: torch.nn.Module, example_t: Any, scale: float | None, reverse: bool | None
) -> tuple[float, bool, str]:
    """The scale onto DDPM's 0..1000, whether time runs reversed, and a sentence for the plan.

    User settings win; then the class table :data:`TIMESTEP_CONVENTIONS`; then the example
    timesteps (all in [0, 1] and not all whole numbers: sigma, times 1000); else DDPM.

    Example:
        >>> timestep_convention(torch.nn.Linear(1, 1), torch.tensor([0.3, 0.9]), None, None)[:2]
        (1000.0, False)
    """
    if scale is not None:
        rev = bool(reverse)
        return float(scale), rev, f"t x {scale:g}{' reversed' if rev else ''} (set in the config)"
    for cls in type(model).__mro__:
        if cls.__name__ in TIMESTEP_CONVENTIONS:
            s, rev, text = TIMESTEP_CONVENTIONS[cls.__name__]
            rev = rev if reverse is None else bool(reverse)
            return s, rev, f"{text}: routers read t x {s:g}{', reversed' if rev else ''}"
    rev = bool(reverse)
    t_known = isinstance(example_t, torch.Tensor) and example_t.device.type != "meta"
    if t_known and example_t.numel() and example_t.is_floating_point():
        t = example_t.detach().float().cpu()
        if float(t.min()) >= 0 and float(t.max()) <= 1 and not torch.equal(t, t.round()):
            return (
                _UNIT,
                rev,
                f"t in [0, 1] (inferred from the example timesteps): routers read t x {_UNIT:g}",
            )
    return 1.0, rev, "t in [0, 1000] (DDPM scale, the default)"


def register_attention(qualname: str, attrs: dict[str, AttrKind]) -> None:
    """Declare which attributes of an attention class hold its head count.

    Example:
        >>> register_attention("mypkg.blocks.MyAttention", {"n_heads": "heads"})
    """
    for kind in attrs.values():
        if kind not in ("heads", "inner"):
            raise ValueError(f"attribute kind must be 'heads' or 'inner', got {kind!r}")
    _ATTENTION[qualname] = dict(attrs)


def attention_attrs(
    module: torch.nn.Module, heads: int, head_dim: int, inner: str = "", kv_heads: int | None = None
) -> tuple[dict[str, int], bool]:
    """Attributes to lower when heads are removed, as ``{attr: value per routed unit}``.

    On the fast path each attribute is set to (active units) x (value per unit) for the
    call: 1 for a head count, ``head_dim`` for a width. With grouped-query attention
    (``kv_heads`` < ``heads``) a unit is a key/value head with its g = heads / kv_heads query
    heads: a query head count lowers by g per unit, a key/value head count by 1.

    ``inner`` is the path, below ``module``, of the module whose forward runs the attention op:
    when the site's module is a whole block (a parallel block), the head count lives there.

    Returns the mapping and whether it came from the registry (True) or from a scan (False).

    Example:
        >>> from timm.models.vision_transformer import Attention
        >>> attention_attrs(Attention(32, num_heads=4), heads=4, head_dim=8)
        ({'num_heads': 1, 'attn_dim': 8}, True)
    """
    kv = kv_heads or heads
    out, known = _own_attrs(module, heads, head_dim, kv)
    if out:
        return out, known
    # A block whose forward runs the attention itself (a parallel block's site is the block):
    # the head count lives on its attention submodule, lowered by its dotted path.
    parts = inner.split(".") if inner else []
    for i in range(len(parts), 0, -1):  # the attention's own module first, then its parents
        name = ".".join(parts[:i])
        sub_out, sub_known = _own_attrs(module.get_submodule(name), heads, head_dim, kv)
        if sub_out:
            return {f"{name}.{a}": v for a, v in sub_out.items()}, sub_known
    return {}, known


def _own_attrs(
    module: torch.nn.Module, heads: int, head_dim: int, kv_heads: int
) -> tuple[dict[str, int], bool]:
    """:func:`attention_attrs` of the module itself (registry, else a scan of its integers)."""
    # The registry, through the class's bases (a subclass reshapes like its parent).
    for cls in type(module).__mro__:
        key = f"{cls.__module__}.{cls.__qualname__}"
        if key in _ATTENTION:
            out = {}
            for attr, kind in _ATTENTION[key].items():
                if hasattr(module, attr):
                    per = _per_unit(getattr(module, attr), heads, head_dim, kv_heads)
                    g = heads // kv_heads
                    out[attr] = per if per is not None else (g if kind == "heads" else g * head_dim)
            return out, True
    # No entry: guess from integer attributes equal to the head count or the attention width
    # (convert then checks the fast path against the masked path before trusting the guess).
    out = {}
    for attr, value in vars(module).items():
        if attr.startswith("_") or isinstance(value, bool) or not isinstance(value, int):
            continue
        per = _per_unit(value, heads, head_dim, kv_heads)
        if per is not None:
            out[attr] = per
    return out, False


def _per_unit(value: Any, heads: int, head_dim: int, kv_heads: int) -> int | None:
    """What an integer attribute lowers by per routed unit: a query head count by g (query
    heads per unit), a key/value head count by 1, a width by g * head_dim or head_dim; None
    when the value is none of these (one head: its width is the head size, not lowered)."""
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    g = heads // kv_heads
    if value == heads:
        return g
    if value == kv_heads:
        return 1
    if value == heads * head_dim and heads > 1:
        return g * head_dim
    if value == kv_heads * head_dim and kv_heads > 1:
        return head_dim
    return None
