"""Pieces the pattern models share: timestep features, a hand-written RMSNorm, rotary embeddings
in every form, adaLN modulation, a GELU MLP, and the example inputs of a token-sequence model."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROPE_FORMS = ("rotate_half", "interleaved", "complex", "table", "matrix")
QK_NORMS = (None, "head_rms", "head_layernorm", "all")


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) timesteps in [0, 1000) -> (B, dim) sinusoidal features."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    ang = t.float()[:, None] * freqs[None]
    return torch.cat([ang.cos(), ang.sin()], -1)


class HandRMSNorm(nn.Module):
    """RMSNorm written out (pow, mean, rsqrt, mul), as many repositories do, in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.scale).to(dtype)


def rope_tables(n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (n, d) of rotary angles, each frequency repeated for its channel pair."""
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))  # (d/2,)
    ang = torch.arange(n, dtype=torch.float32)[:, None] * inv[None]  # (n, d/2)
    ang = ang.repeat_interleave(2, -1)  # (n, d): pairs (0,1), (2,3)... share a frequency
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, form: str, pos: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary embedding of x (B, H, N, d) in one of :data:`ROPE_FORMS` (pos: (N,) positions)."""
    n, d = x.shape[-2], x.shape[-1]
    if form == "complex":  # Lumina / Llama style: pairs as complex numbers times e^(i angle)
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        freqs = torch.polar(
            torch.ones(n, d // 2), torch.arange(n, dtype=torch.float32)[:, None] * inv
        )
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs).flatten(-2).type_as(x)
    cos, sin = rope_tables(n, d)
    if form == "matrix":  # Kandinsky 5: a 2x2 rotation per channel pair, times the pair, summed
        c, s = cos[:, ::2], sin[:, ::2]  # (N, d/2)
        rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # (N, d/2, 2, 2)
        return (
            (rot * x.float().reshape(*x.shape[:-1], -1, 1, 2)).sum(-1).reshape(x.shape).to(x.dtype)
        )
    if form == "table" and pos is not None:  # tables indexed by position ids (Flux, Hunyuan)
        cos, sin = cos[pos], sin[pos]
    if form == "interleaved":  # pairs (x0, x1) -> (-x1, x0), stacked and flattened back
        x1, x2 = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
        rotated = torch.stack([-x2, x1], dim=-1).flatten(-2)
    else:  # rotate_half: the first half against the second (GPT-NeoX, diffusers' default)
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class ScaleShift(nn.Module):
    """adaLN modulation: (B, dim) conditioning -> shift, scale, gate for attention and MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.lin = nn.Linear(dim, 6 * dim)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:  # noqa: D102
        return self.lin(F.silu(c))[:, None].chunk(6, dim=-1)


class FeedForward(nn.Module):
    """GELU MLP with its own Linear subclass for projections."""

    def __init__(self, dim: int, hidden: int, linear: type[nn.Linear] = nn.Linear):
        super().__init__()
        self.up, self.down = linear(dim, hidden), linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.down(F.gelu(self.up(x), approximate="tanh"))


def sequence_inputs(
    batch: int, tokens: int, channels: int, seed: int, **extra: Any
) -> dict[str, Any]:
    """Keyword inputs of a pattern model: (B, N, C) hidden states, B timesteps, and ``extra``
    random tensors by name and shape."""
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([100.0, 800.0, 450.0, 20.0][:batch] + [500.0] * max(0, batch - 4))
    out = {"hidden_states": torch.randn(batch, tokens, channels, generator=g), "timestep": t}
    for k, shape in extra.items():
        out[k] = torch.randn(batch, *shape, generator=g)
    return out
