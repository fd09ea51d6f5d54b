"""A video DiT folding frames and tokens into the batch (Latte-style spatial and temporal
blocks), with projections that are ``nn.Linear`` subclasses or written by hand."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynconvert.models.tiny import randomize_weights
from dynconvert.testing.patterns.parts import FeedForward, time_embedding


class CustomLinear(nn.Linear):
    """A Linear subclass that only adds an attribute (LoRA-ready or quantisation-ready layers)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.tag = "custom"


class Dense(nn.Module):
    """A projection written by hand, as some repositories do: its own weight and bias and
    ``F.linear`` on them (not an nn.Linear)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / in_features**0.5)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.linear(x, self.weight, self.bias)


class ScaledDense(Dense):
    """Like :class:`Dense` but scales its output: not a plain linear, so it is not routed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.linear(x, self.weight, self.bias) * 0.5


class SpaceTimeAttention(nn.Module):
    """Attention over one axis of a video: frames folded into the batch by the caller."""

    def __init__(self, dim: int, heads: int, linear: type[nn.Linear]):
        super().__init__()
        self.nh, self.hd = heads, dim // heads
        self.qkv, self.out = linear(dim, 3 * dim), linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.nh, self.hd).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, self.nh * self.hd)
        return self.out(o)


class VideoBlock(nn.Module):
    """Latte-style: a spatial block over (B x F, N) and a temporal block over (B x N, F)."""

    def __init__(self, dim: int, heads: int, linear: type[nn.Linear]):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.spatial, self.temporal = (
            SpaceTimeAttention(dim, heads, linear),
            SpaceTimeAttention(dim, heads, linear),
        )
        self.ff_s, self.ff_t = FeedForward(dim, 2 * dim, linear), FeedForward(dim, 2 * dim, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        b, f, n, c = x.shape
        s = x.reshape(b * f, n, c)  # frames folded into the batch, sample-major
        s = s + self.spatial(self.norm(s))
        s = s + self.ff_s(self.norm(s))
        t = s.reshape(b, f, n, c).transpose(1, 2).reshape(b * n, f, c)  # tokens into the batch
        t = t + self.temporal(self.norm(t))
        t = t + self.ff_t(self.norm(t))
        return t.reshape(b, n, f, c).transpose(1, 2)


class VideoDiT(nn.Module):
    """Video latents (B, F, N, C) through folded spatial / temporal blocks."""

    def __init__(
        self, dim=32, heads=4, depth=1, channels=4, linear: type[nn.Linear] = CustomLinear
    ):
        super().__init__()
        self.embed = nn.Linear(channels, dim)
        self.t_mlp = nn.Sequential(nn.Linear(64, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList([VideoBlock(dim, heads, linear) for _ in range(depth)])
        self.head = nn.Linear(dim, channels)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:  # noqa: D102
        h = self.embed(hidden_states) + self.t_mlp(time_embedding(timestep, 64))[:, None, None]
        for blk in self.blocks:
            h = blk(h)
        return self.head(h)


def video_dit(
    seed: int = 0, linear: type[nn.Module] = CustomLinear
) -> tuple[nn.Module, dict[str, Any]]:
    """A video DiT folding frames (spatial) and tokens (temporal) into the batch, with
    ``linear`` (a Linear subclass by default, or a hand-written projection) for every
    projection of its blocks."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "hidden_states": torch.randn(2, 3, 8, 4, generator=g),
        "timestep": torch.tensor([100.0, 800.0]),
    }
    return randomize_weights(VideoDiT(linear=linear).eval(), seed), inputs
