"""The learned routers: timestep-wise width routers and spatial token routers.

docs/method.md, "Routers".
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from dynconvert.plan import token_router_width

COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""Dtypes routers compute in; any other (float8 storage under layerwise casting) is storage only."""


def logistic_noise(like: torch.Tensor) -> torch.Tensor:
    """Logistic noise (the difference of two Gumbel samples) of the shape of ``like``, in float32.

    Example:
        >>> logistic_noise(torch.zeros(3)).shape
        torch.Size([3])
    """
    u = torch.rand(like.shape, dtype=torch.float32, device=like.device).clamp_(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


def gumbel_sigmoid(
    logits: torch.Tensor, tau: float, hard: bool = True, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """Gumbel-sigmoid with a straight-through estimator.

    Logistic noise (the difference of two Gumbel samples) is added to the logits, divided by the
    temperature and squashed; the forward value is the hard threshold at 0.5 and the gradient is
    that of the soft value. ``noise`` (from :func:`logistic_noise`) replays an earlier draw, as
    the recomputation of a checkpointed block must. ``tau``: ``ConvertConfig.tau``.

    Example:
        >>> import torch
        >>> m = gumbel_sigmoid(torch.full((4,), 15.0), tau=5.0)
        >>> bool((m == 1).all())
        True
    """
    noise = logistic_noise(logits) if noise is None else noise
    soft = torch.sigmoid((logits + noise.to(logits.dtype)) / tau)
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
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """A context in which autocast is off on ``device`` (a no-op where it is not on).

    Routers compute in their own dtype: under a bf16 or fp16 autocast their logits, many close
    to the threshold, would be rounded and flip decisions the float32 model makes (issue 23
    measured PixArt with random routing 0.12 off, against 0.024 for the plain model).

    Example:
        >>> with torch.autocast("cpu", dtype=torch.bfloat16), no_autocast(torch.device("cpu")):
        ...     F.linear(torch.ones(1, 2), torch.ones(3, 2)).dtype
        torch.float32
    """
    try:
        on = torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type autocast does not know (meta)
        on = False
    return torch.autocast(device.type, enabled=False) if on else contextlib.nullcontext()


class RouterLinear(nn.Linear):
    """An nn.Linear that computes in its weight's dtype, or the input's when that is storage only.

    Under diffusers layerwise casting the weight is stored in float8 and cast to the compute
    dtype by a hook just before this forward runs, so the weight's dtype here is the compute
    dtype; stored float8 with no such hook, it computes in the input's dtype (float32 if that is
    not a compute dtype either). Never in a storage dtype, and not in autocast's (no_autocast).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features) in the compute dtype described above."""
        w, b = self.weight, self.bias
        dtype = w.dtype if w.dtype in COMPUTE_DTYPES else x.dtype
        dtype = dtype if dtype in COMPUTE_DTYPES else torch.float32
        with no_autocast(x.device):
            return F.linear(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype))


class TimestepEncoder(nn.Module):
    """A timestep-only embedding shared by all width routers: sinusoid -> MLP.

    ``dim``: ``ConvertConfig.router_embed_dim`` (the config holds every router default).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(RouterLinear(dim, dim), nn.SiLU(), RouterLinear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) timesteps -> (B, dim) embedding, in the MLP's compute dtype (see RouterLinear)."""
        return self.mlp(sinusoidal(t, self.dim))  # (B, dim)


class TokenRouter(nn.Module):
    """Per-token MLP D -> D/r -> ReLU -> 1 whose logit says whether the token runs the MLP.

    ``reduction`` (r) and ``bias_init``: ``ConvertConfig.token_reduction`` and ``token_bias_init``.
    """

    def __init__(self, dim: int, reduction: int, bias_init: float):
        super().__init__()
        hidden = token_router_width(dim, reduction)  # plan.py counts its MACs with the same width
        self.net = nn.Sequential(RouterLinear(dim, hidden), nn.ReLU(), RouterLinear(hidden, 1))
        nn.init.constant_(self.net[2].bias, bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (..., N, D) -> one logit per token (..., N); evaluation runs the MLP iff > 0."""
        return self.net(x).squeeze(-1)  # (..., N), in the router's compute dtype


def width_router(embed_dim: int, units: int, bias_init: float) -> RouterLinear:
    """One Linear from the timestep embedding to one logit per head or channel group.

    Weights start at zero and the bias at ``bias_init`` (``ConvertConfig.width_bias_init``)
    so every unit starts on (the converted model begins as the original).
    """
    lin = RouterLinear(embed_dim, units)
    nn.init.zeros_(lin.weight)
    nn.init.constant_(lin.bias, bias_init)
    return lin


def budget_features(budget: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) budgets in (0, 1] -> (B, dim) smooth features: sines and cosines of ``budget`` at
    angular frequencies from 0.25 to 3 per unit of budget (geometric).

    Why not t's sinusoid: on a 0..1000 scale its fast frequencies turn within 0.01 of budget,
    so nearby budgets get unrelated features and the routers learn each budget drawn in
    calibration apart, with nothing in between (measured: a dial that did not track,
    docs/budgets.md). Here the fastest turns by 2.1 radians over a 0.3..1.0 range: what is
    learned at one budget carries to its neighbours.

    Example:
        >>> bool(budget_features(torch.tensor([0.3, 0.31]), 8).diff(dim=0).abs().max() < 0.05)
        True
    """
    half = dim // 2
    freqs = torch.exp(torch.linspace(math.log(0.25), math.log(3.0), half, device=budget.device))
    args = budget.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class BudgetEncoder(nn.Module):
    """An embedding of a call's FLOPs budget, added to the timestep's (budget-conditioned models).

    The budget (a fraction in (0, 1]) is read through smooth features (:func:`budget_features`,
    not t's sinusoid), then a small MLP (default initialisation). What reads it starts at zero
    (the width routers' weights, and a zero-initialised Linear per token router to a logit
    offset, ``RouterBank.token_budget``), so a fresh conversion is still the original. The
    encoder itself must not start at zero: the readers' gradients are the embedding, and the
    embedding's are the readers' weights, so both would stay at zero (measured: a dial that did
    not move, docs/budgets.md).

    Example:
        >>> BudgetEncoder(8)(torch.tensor([0.5, 0.9])).shape
        torch.Size([2, 8])
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(RouterLinear(dim, dim), nn.SiLU(), RouterLinear(dim, dim))

    def forward(self, budget: torch.Tensor) -> torch.Tensor:
        """(B,) budgets in (0, 1] -> (B, dim) embedding, in the MLP's compute dtype."""
        return self.mlp(budget_features(budget, self.dim))  # (B, dim)


def budget_offset(embed_dim: int) -> RouterLinear:
    """A token router's logit offset from the budget embedding: zero weights and bias at start."""
    lin = RouterLinear(embed_dim, 1)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin
