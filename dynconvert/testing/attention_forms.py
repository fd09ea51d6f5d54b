"""Attention modules whose q, k or v reach the attention through more than head-local ops, as
pattern models (see patterns/): key/value compression (PixArt-Sigma, PVT), rotary tables
over the whole width handed in by the model (LTX-Video), heads folded into the batch
(diffusers' classic AttnProcessor), and a context given as keys and values only (PRX).

Example:
    >>> model, inputs = compressed_kv_dit("conv")
    >>> model(**inputs).shape
    torch.Size([2, 16, 4])
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynconvert.models.tiny import randomize_weights
from dynconvert.testing.patterns import (
    HandRMSNorm,
    RotaryDiT,
    rope_tables,
    sequence_inputs,
    time_embedding,
)

KV_SAMPLINGS = ("conv", "uniform", "nearest", "pool", "reduce-input")


class KVCompressAttention(nn.Module):
    """Self-attention on a square token grid whose keys and values are downsampled by ``ratio``
    per side before the attention, as PixArt-Sigma does at high resolution:

    - ``conv``: a strided depthwise convolution, then one LayerNorm over every head's channels
      (one module pair shared by k and v);
    - ``uniform``: every ratio-th row and column (strided slicing);
    - ``nearest``: nearest-neighbour interpolation;
    - ``pool``: average pooling;
    - ``reduce-input``: PVT's spatial reduction, a strided convolution of the *input* before
      the key/value projection.

    ``fused``: one Linear for q, k and v (PixArt-Sigma's own code), else one each (a port to
    diffusers' layout).
    """

    def __init__(self, dim: int, heads: int, sampling: str, ratio: int = 2, fused: bool = True):
        super().__init__()
        self.heads, self.sampling, self.ratio, self.fused = heads, sampling, ratio, fused
        if sampling == "reduce-input":
            self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
            self.sr = nn.Conv2d(dim, dim, ratio, stride=ratio)
        else:
            if fused:
                self.qkv = nn.Linear(dim, 3 * dim)
            else:
                self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
            self.sr = (
                nn.Conv2d(dim, dim, ratio, stride=ratio, groups=dim) if sampling == "conv" else None
            )
        self.norm = nn.LayerNorm(dim) if sampling in ("conv", "reduce-input") else None
        self.proj = nn.Linear(dim, dim)

    def downsample(self, t: torch.Tensor) -> torch.Tensor:
        """(B, N, C) on a square grid -> (B, N / ratio^2, C)."""
        b, n, c = t.shape  # C: as many channels as the active heads have
        side, r = math.isqrt(n), self.ratio
        grid = t.reshape(b, side, side, c).permute(0, 3, 1, 2)  # (B, C, side, side)
        if self.sampling in ("conv", "reduce-input"):
            return self.norm(self.sr(grid).flatten(2).transpose(1, 2))
        if self.sampling == "uniform":
            grid = grid[:, :, ::r, ::r]
        elif self.sampling == "nearest":
            grid = F.interpolate(grid, scale_factor=1 / r, mode="nearest")
        else:
            grid = F.avg_pool2d(grid, r)
        return grid.permute(0, 2, 3, 1).reshape(b, -1, c)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # noqa: D102
        b, n, _ = x.shape
        if self.sampling == "reduce-input":
            q = self.q(x)
            k, v = self.kv(self.downsample(x)).chunk(2, dim=-1)
        else:
            if self.fused:
                q, k, v = self.qkv(x).unflatten(-1, (3, -1)).unbind(2)
            else:
                q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
            k, v = self.downsample(k), self.downsample(v)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, d) over N / ratio^2 keys
        return self.proj(o.transpose(1, 2).reshape(b, n, -1))


def compressed_kv_dit(
    sampling: str = "conv", fused: bool = True, seed: int = 0
) -> tuple[nn.Module, dict[str, Any]]:
    """A DiT on a 4x4 token grid whose attentions compress keys and values by 2 per side
    (:data:`KV_SAMPLINGS`), with one fused q/k/v projection or three."""
    torch.manual_seed(seed)
    model = RotaryDiT()
    for layer in model.layers:
        layer.attn = KVCompressAttention(32, 4, sampling, fused=fused)
    return randomize_weights(model.eval(), seed), sequence_inputs(2, 16, 4, seed)


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (..., C): every channel pair (a, b) becomes (-b, a)."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([-b, a], dim=-1).flatten(-2)


class WideRotaryAttention(nn.Module):
    """LTX-Video's attention: q and k RMS-normed over every head's channels (``norm="all"``)
    or not at all, then rotated by cos / sin tables (B, N, C) over the whole width that the
    model computes once and hands to every block (each head has its own frequencies)."""

    def __init__(self, dim: int, heads: int, norm: str | None = "all"):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.to_out = nn.Linear(dim, dim)
        self.norm_q = HandRMSNorm(dim) if norm == "all" else nn.Identity()
        self.norm_k = HandRMSNorm(dim) if norm == "all" else nn.Identity()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:  # noqa: D102
        cos, sin = rope
        q, k, v = self.norm_q(self.to_q(x)), self.norm_k(self.to_k(x)), self.to_v(x)
        q = (q.float() * cos + _rotate_pairs(q).float() * sin).to(x.dtype)
        k = (k.float() * cos + _rotate_pairs(k).float() * sin).to(x.dtype)
        q, k, v = (t.unflatten(2, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(o.transpose(1, 2).flatten(2))


class WideRopeDiT(RotaryDiT):
    """A DiT whose rotary tables span the whole width (B, N, C) and are computed once at the
    top, then passed through every block into its attention (LTX-Video's layout)."""

    def __init__(self, norm: str | None = "all"):
        super().__init__()
        for layer in self.layers:
            layer.attn = WideRotaryAttention(32, 4, norm)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:  # noqa: D102
        b, n, _ = hidden_states.shape
        c = self.t_mlp(time_embedding(timestep, 64))
        cos, sin = rope_tables(n, 32)  # (N, C): one frequency per channel pair of the width
        rope = (cos[None].expand(b, n, 32), sin[None].expand(b, n, 32))
        h = self.embed(hidden_states)
        for layer in self.layers:
            h = layer(h, c, rope)
        return self.head(h)


def wide_rope_dit(norm: str | None = "all", seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """A DiT with LTX-Video's attention: rotary tables over the whole width, handed in."""
    torch.manual_seed(seed)
    return randomize_weights(WideRopeDiT(norm).eval(), seed), sequence_inputs(2, 16, 4, seed)


class FoldedHeadsAttention(nn.Module):
    """Attention with the heads folded into the batch, as diffusers' classic AttnProcessor and
    older repositories write it: (B * H, N, d) operands, baddbmm for the scores, bmm with v.
    ``key_first``: k is laid out (B, H, d, N) before folding instead of transposed after."""

    def __init__(self, dim: int, heads: int, key_first: bool = False):
        super().__init__()
        self.heads, self.key_first = heads, key_first
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.to_out = nn.Linear(dim, dim)

    def fold(self, t: torch.Tensor) -> torch.Tensor:
        """(B, N, H * d) -> (B * H, N, d), batch-major (diffusers' head_to_batch_dim)."""
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, -1).permute(0, 2, 1, 3).reshape(b * self.heads, n, -1)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # noqa: D102
        b, n, _ = x.shape
        q, v = self.fold(self.to_q(x)), self.fold(self.to_v(x))
        if self.key_first:  # (B, N, H, d) -> (B, H, d, N) -> (B * H, d, N)
            kt = (
                self.to_k(x)
                .reshape(b, n, self.heads, -1)
                .permute(0, 2, 3, 1)
                .reshape(b * self.heads, -1, n)
            )
        else:
            kt = self.fold(self.to_k(x)).transpose(1, 2)
        empty = torch.empty(b * self.heads, n, n, dtype=x.dtype, device=x.device)
        scores = torch.baddbmm(empty, q, kt, beta=0, alpha=q.shape[-1] ** -0.5)
        o = torch.bmm(scores.softmax(-1), v)  # (B * H, N, d)
        return self.to_out(o.reshape(b, self.heads, n, -1).permute(0, 2, 1, 3).reshape(b, n, -1))


def folded_heads_dit(key_first: bool = False, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """A DiT whose attentions fold the heads into the batch (:class:`FoldedHeadsAttention`)."""
    torch.manual_seed(seed)
    model = RotaryDiT()
    for layer in model.layers:
        layer.attn = FoldedHeadsAttention(32, 4, key_first)
    return randomize_weights(model.eval(), seed), sequence_inputs(2, 16, 4, seed)


class ContextKVAttention(nn.Module):
    """PRX / Nucleus style: the image's queries attend over the text's keys and values followed
    by the image's own; the text has key and value projections but no queries (it is attended
    to, not attending) and no out-projection."""

    def __init__(self, dim: int, heads: int, context_dim: int = 12):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(dim, dim) for _ in range(4))
        self.add_k_proj, self.add_v_proj = nn.Linear(context_dim, dim), nn.Linear(context_dim, dim)

    def forward(
        self, x: torch.Tensor, pos_and_context: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:  # noqa: D102
        context = pos_and_context[1]
        q = self.to_q(x)
        k = torch.cat([self.add_k_proj(context), self.to_k(x)], dim=1)
        v = torch.cat([self.add_v_proj(context), self.to_v(x)], dim=1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class ContextKVDiT(RotaryDiT):
    """A DiT whose attentions take the text as extra keys and values only."""

    def __init__(self):
        super().__init__()
        for layer in self.layers:
            layer.attn = ContextKVAttention(32, 4)

    def forward(  # noqa: D102
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
    ) -> torch.Tensor:
        c = self.t_mlp(time_embedding(timestep, 64))
        pos = torch.arange(hidden_states.shape[1], device=hidden_states.device)
        h = self.embed(hidden_states)
        for layer in self.layers:
            h = layer(h, c, (pos, encoder_hidden_states))
        return self.head(h)


def context_kv_dit(seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """A DiT whose image queries attend over text keys/values and their own (PRX's layout)."""
    torch.manual_seed(seed)
    inputs = sequence_inputs(2, 16, 4, seed, encoder_hidden_states=(6, 12))
    return randomize_weights(ContextKVDiT().eval(), seed), inputs


_KERNEL: Any = None


def kernel_attention_op() -> Any:
    """A ``torch.library`` custom op standing in for another library's attention kernel
    (flash-attn's layout: q, k, v and the output as (B, N, H, d)), registered once, with a FLOP
    formula so that PyTorch's counter sees its matmuls as it would sdpa's."""
    global _KERNEL
    if _KERNEL is None:
        from torch.utils.flop_counter import register_flop_formula

        @torch.library.custom_op("dynconvert_patterns::flash_like_attention", mutates_args=())
        def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            )
            return o.transpose(1, 2).contiguous()

        @op.register_fake
        def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return q.new_empty(*q.shape[:3], v.shape[3])

        @register_flop_formula(torch.ops.dynconvert_patterns.flash_like_attention)
        def _flops(q_shape: Any, k_shape: Any, v_shape: Any, *_: Any, **__: Any) -> int:
            b, n, h, d = q_shape
            return 2 * b * h * n * k_shape[1] * (d + v_shape[3])  # QK^T + AV, 2 FLOPs a MAC

        _KERNEL = op
    return _KERNEL


class KernelAttention(nn.Module):
    """Attention through another library's kernel (see :func:`kernel_attention_op`), with
    q, k and v laid out (B, N, H, d) as flash-attn takes them."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_qkv, self.to_out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # noqa: D102
        q, k, v = self.to_qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(2)  # (B, N, H, d) each
        return self.to_out(kernel_attention_op()(q, k, v).flatten(2))


def kernel_dit(seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """A DiT whose attentions call another library's kernel (:class:`KernelAttention`)."""
    torch.manual_seed(seed)
    model = RotaryDiT()
    for layer in model.layers:
        layer.attn = KernelAttention(32, 4)
    return randomize_weights(model.eval(), seed), sequence_inputs(2, 16, 4, seed)


FORMS = {
    "kv-conv-norm": lambda: compressed_kv_dit("conv", fused=False),
    "kv-uniform": lambda: compressed_kv_dit("uniform"),
    "kv-nearest": lambda: compressed_kv_dit("nearest"),
    "kv-pool": lambda: compressed_kv_dit("pool"),
    "kv-reduce-input": lambda: compressed_kv_dit("reduce-input"),
    "rotary-wide-table": lambda: wide_rope_dit(None),
    "rotary-wide-table-norm-all": lambda: wide_rope_dit("all"),
    "folded-heads": folded_heads_dit,
    "folded-heads-key-first": lambda: folded_heads_dit(key_first=True),
    "context-kv": context_kv_dit,
    "kernel": kernel_dit,
}
"""Builders of this module's pattern models by name, each returning ``(model, example_inputs)``."""
