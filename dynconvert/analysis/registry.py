"""Facts the graph alone does not give, per module class.

The graph tells where q, k, v and the out-projection are and how their rows are laid out.
It cannot tell which attributes of the attention module hold the head count that its Python
code reshapes with: after heads are physically removed those must be lowered too, or some
modules silently compute wrong heads (design.md, "Traps"). One entry per attention class.

Adding a model family: if its attention class reshapes with attributes other than those below,
add ``register_attention("package.module.ClassName", {"attr": "heads" | "inner"})``, where
"heads" means the attribute holds the head count and "inner" the head count times head size.
Without an entry, dynconvert looks for integer attributes equal to the head count (or the
attention width) and verifies the result by running the fast path against the masked path
once at convert time; a site that fails that check keeps the masked path.
"""

from __future__ import annotations

from typing import Literal

import torch

AttrKind = Literal["heads", "inner"]

# Attention class "package.module.Class" -> {attribute: kind}. timm reshapes with both
# num_heads and attn_dim (forgetting attn_dim does not raise: it reshapes into wrong heads).
_ATTENTION: dict[str, dict[str, AttrKind]] = {
    "timm.layers.attention.Attention": {"num_heads": "heads", "attn_dim": "inner"},
    "timm.models.vision_transformer.Attention": {"num_heads": "heads", "attn_dim": "inner"},
    "diffusers.models.attention_processor.Attention": {"heads": "heads"},
    "dynconvert.models.uvit.Attention": {"num_heads": "heads"},
}


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
    module: torch.nn.Module, heads: int, head_dim: int
) -> tuple[dict[str, int], bool]:
    """Attributes to lower when heads are removed, as ``{attr: channels per head}``.

    On the fast path each attribute is set to (active heads) x (channels per head) for the
    call: 1 for a head count, ``head_dim`` for a width.

    Returns the mapping and whether it came from the registry (True) or from a scan (False).

    Example:
        >>> from timm.models.vision_transformer import Attention
        >>> attention_attrs(Attention(32, num_heads=4), heads=4, head_dim=8)
        ({'num_heads': 1, 'attn_dim': 8}, True)
    """
    # The registry, through the class's bases (a subclass reshapes like its parent).
    for cls in type(module).__mro__:
        key = f"{cls.__module__}.{cls.__qualname__}"
        if key in _ATTENTION:
            out = {}
            for attr, kind in _ATTENTION[key].items():
                if hasattr(module, attr):
                    out[attr] = 1 if kind == "heads" else head_dim
            return out, True
    # No entry: guess from integer attributes equal to the head count or the attention width
    # (convert then checks the fast path against the masked path before trusting the guess).
    out = {}
    for attr, value in vars(module).items():
        if attr.startswith("_") or isinstance(value, bool) or not isinstance(value, int):
            continue
        if value == heads:
            out[attr] = 1
        elif value == heads * head_dim and heads > 1:  # one head: width = head size, not to lower
            out[attr] = head_dim
    return out, False
