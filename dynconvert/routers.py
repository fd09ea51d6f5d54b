"""The learned routers: timestep-wise width routers and spatial token routers (method.md)."""

from __future__ import annotations

import math

import torch
from torch import nn


def gumbel_sigmoid(logits: torch.Tensor, tau: float = 5.0, hard: bool = True) -> torch.Tensor:
    """Gumbel-sigmoid with a straight-through estimator.

    Logistic noise (the difference of two Gumbel samples) is added to the logits, divided by the
    temperature and squashed; the forward value is the hard threshold at 0.5 and the gradient is
    that of the soft value.

    Example:
        >>> import torch
        >>> m = gumbel_sigmoid(torch.full((4,), 15.0))
        >>> bool((m == 1).all())
        True
    """
    u = torch.rand_like(logits, dtype=torch.float32).clamp_(1e-6, 1 - 1e-6)
    noise = (torch.log(u) - torch.log1p(-u)).to(logits.dtype)  # logistic = Gumbel - Gumbel
    soft = torch.sigmoid((logits + noise) / tau)
    if not hard:
        return soft
    return _StraightThrough.apply(soft)


class _StraightThrough(torch.autograd.Function):
    """Forward: exactly 0 or 1 (threshold at 0.5). Backward: the gradient of the soft value."""

    @staticmethod
    def forward(ctx, soft: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return (soft > 0.5).to(soft.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return grad


def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (normalised, 0..1000) timesteps, as in DiT's TimestepEmbedder."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class TimestepEncoder(nn.Module):
    """A timestep-only embedding shared by all width routers: sinusoid -> MLP."""

    def __init__(self, dim: int = 256):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) timesteps -> (B, dim) embedding, in the MLP's dtype."""
        return self.mlp(sinusoidal(t, self.dim).to(self.mlp[0].weight.dtype))  # (B, dim)


class TokenRouter(nn.Module):
    """Per-token MLP D -> D/r -> ReLU -> 1 whose logit says whether the token runs the MLP."""

    def __init__(self, dim: int, reduction: int = 16, bias_init: float = 35.0):
        super().__init__()
        hidden = max(1, dim // reduction)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        nn.init.constant_(self.net[2].bias, bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (..., N, D) -> one logit per token (..., N); evaluation runs the MLP iff > 0."""
        return self.net(x.to(self.net[0].weight.dtype)).squeeze(-1)  # (..., N)


def width_router(embed_dim: int, units: int, bias_init: float = 15.0) -> nn.Linear:
    """One Linear from the timestep embedding to one logit per head or channel group.

    Weights start at zero and the bias at ``bias_init`` so every unit starts on (the
    converted model begins as the original).
    """
    lin = nn.Linear(embed_dim, units)
    nn.init.zeros_(lin.weight)
    nn.init.constant_(lin.bias, bias_init)
    return lin
