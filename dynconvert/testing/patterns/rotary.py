"""Token-sequence DiTs whose attention comes in today's forms: rotary embeddings in every form
with per-head or whole-width qk-norm, attention by hand or through sdpa, grouped-query attention
with or without an output gate, Sana's linear attention and its convolutional MLP."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynconvert.models.tiny import randomize_weights
from dynconvert.testing.patterns.parts import (
    FeedForward,
    HandRMSNorm,
    ScaleShift,
    apply_rope,
    sequence_inputs,
    time_embedding,
)


class RotarySelfAttention(nn.Module):
    """Self-attention with rotary embeddings and optional qk-norm, attention by hand or sdpa."""

    def __init__(self, dim: int, n_heads: int, rope: str, qk_norm: str | None, manual: bool):
        super().__init__()
        self.n_heads, self.head_size, self.rope, self.manual = n_heads, dim // n_heads, rope, manual
        # Wan / LTX style (a norm over all heads) with separate projections, else one fused.
        self.to_qkv = nn.Linear(dim, 3 * dim) if qk_norm != "all" else None
        self.to_q, self.to_k, self.to_v = (
            (nn.Linear(dim, dim) for _ in range(3)) if qk_norm == "all" else (None,) * 3
        )
        self.proj = nn.Linear(dim, dim)
        self.qk_norm = qk_norm
        if qk_norm == "head_rms":
            self.q_norm, self.k_norm = HandRMSNorm(self.head_size), HandRMSNorm(self.head_size)
        elif qk_norm == "head_layernorm":
            self.q_norm, self.k_norm = nn.LayerNorm(self.head_size), nn.LayerNorm(self.head_size)
        elif qk_norm == "all":  # Wan / LTX: one norm over every head's channels
            self.q_norm, self.k_norm = HandRMSNorm(dim), HandRMSNorm(dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # noqa: D102
        b, n, _ = x.shape
        if self.qk_norm == "all":
            q, k, v = self.q_norm(self.to_q(x)), self.k_norm(self.to_k(x)), self.to_v(x)
        else:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (self.n_heads, -1)).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm in ("head_rms", "head_layernorm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, self.rope, pos), apply_rope(k, self.rope, pos)
        if self.manual:  # by hand, in float32, as older repositories do
            w = (q.float() @ k.float().transpose(-2, -1)) * self.head_size**-0.5
            o = (w.softmax(-1) @ v.float()).to(x.dtype)
        else:
            o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, n, -1))


class GroupedQueryAttention(nn.Module):
    """Llama-style grouped-query attention: fewer key/value heads, each shared by a group of
    query heads, either repeated to every query head (``repeat_kv``: expand, then reshape) or
    handed to the kernel as they are (``enable_gqa``)."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        share: str = "repeat_kv",
        gate: str | None = None,
    ):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.share = (
            n_heads,
            n_kv_heads,
            dim // n_heads,
            share,
        )
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self.q_norm, self.k_norm = HandRMSNorm(self.head_dim), HandRMSNorm(self.head_dim)
        # Output gate: per channel, sigmoid(to_gate(x)) (Qwen3-Next, Krea 2), or per head,
        # 2 * sigmoid(to_gate(x)) of shape (B, N, H) (LTX-2).
        self.gate = gate
        if gate is not None:
            self.to_gate = nn.Linear(dim, n_heads * self.head_dim if gate == "channel" else n_heads)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # noqa: D102
        b, n, _ = x.shape
        q = self.q_norm(self.wq(x).view(b, n, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.wk(x).view(b, n, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.wv(x).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, "rotate_half", pos), apply_rope(k, "rotate_half", pos)
        if self.share == "repeat_kv":
            rep = self.n_heads // self.n_kv_heads
            k, v = (
                t[:, :, None]
                .expand(b, self.n_kv_heads, rep, n, self.head_dim)
                .reshape(b, -1, n, self.head_dim)
                for t in (k, v)
            )
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        o = o.transpose(1, 2)  # (B, N, H, d)
        if self.gate == "channel":
            o = o.reshape(b, n, -1) * torch.sigmoid(self.to_gate(x))
        elif self.gate == "head":
            o = o * (2.0 * torch.sigmoid(self.to_gate(x))).unsqueeze(-1)
        return self.wo(o.reshape(b, n, -1))


class ReLULinearAttention(nn.Module):
    """Sana's linear attention: ReLU feature maps, (v padded with a row of ones) @ k, then @ q,
    divided by the normaliser row; channels first, (B, H, d, N), computed in float32."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # noqa: D102
        q = F.relu(
            self.to_q(x).transpose(1, 2).unflatten(1, (self.heads, -1))
        ).float()  # (B, H, d, N)
        k = F.relu(
            self.to_k(x).transpose(1, 2).unflatten(1, (self.heads, -1)).transpose(2, 3)
        ).float()
        v = F.pad(
            self.to_v(x).transpose(1, 2).unflatten(1, (self.heads, -1)).float(),
            (0, 0, 0, 1),
            value=1.0,
        )
        o = (v @ k) @ q  # (B, H, d + 1, N)
        o = o[:, :, :-1] / (o[:, :, -1:] + 1e-15)
        return self.to_out(o.flatten(1, 2).transpose(1, 2).to(x.dtype))


class ConvFeedForward(nn.Module):
    """Sana's GLUMBConv on a token grid (B, C, H, W): a 1x1 convolution to value and gate, SiLU,
    a 3x3 depthwise convolution, value * SiLU(gate), a 1x1 convolution back."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.inverted = nn.Conv2d(dim, 2 * hidden, 1)
        self.depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.point = nn.Conv2d(hidden, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        value, gate = self.depth(F.silu(self.inverted(x))).chunk(2, dim=1)
        return self.point(value * F.silu(gate))


class RotaryBlock(nn.Module):
    """adaLN-Zero block: rotary self-attention, GELU MLP (or a convolutional one on the token
    grid, as Sana), gated residuals."""

    def __init__(
        self,
        dim: int,
        heads: int,
        rope: str,
        qk_norm: str | None,
        manual: bool,
        gqa: tuple | None = None,
        conv_mlp: bool = False,
    ):
        super().__init__()
        self.mod = ScaleShift(dim)
        self.n1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.n2 = nn.LayerNorm(dim, elementwise_affine=False)
        if gqa:  # (key/value heads, how they are shared)
            self.attn = GroupedQueryAttention(dim, heads, *gqa)
        elif rope == "linear":  # Sana: linear attention, no rotary
            self.attn = ReLULinearAttention(dim, heads)
        else:
            self.attn = RotarySelfAttention(dim, heads, rope, qk_norm, manual)
        self.conv_mlp = conv_mlp
        self.ff = ConvFeedForward(dim, 2 * dim) if conv_mlp else FeedForward(dim, 4 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # noqa: D102
        sh1, sc1, g1, sh2, sc2, g2 = self.mod(c)
        x = x + g1 * self.attn(self.n1(x) * (1 + sc1) + sh1, pos)
        h = self.n2(x) * (1 + sc2) + sh2
        if not self.conv_mlp:
            return x + g2 * self.ff(h)
        b, n, d = h.shape
        side = int(n**0.5)  # tokens of a square grid, row-major
        grid = h.transpose(1, 2).reshape(b, d, side, side)
        return x + g2 * self.ff(grid).flatten(2).transpose(1, 2)


class RotaryDiT(nn.Module):
    """Token-sequence DiT with rotary attention (hidden_states (B, N, C_in), timestep (B,))."""

    def __init__(
        self, dim=32, heads=4, depth=2, channels=4, rope="rotate_half", qk_norm=None,
        manual=False, gqa=None, conv_mlp=False,
    ):  # fmt: skip
        super().__init__()
        self.embed = nn.Linear(channels, dim)
        self.t_mlp = nn.Sequential(nn.Linear(64, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.layers = nn.ModuleList(
            [RotaryBlock(dim, heads, rope, qk_norm, manual, gqa, conv_mlp) for _ in range(depth)]
        )
        self.head = nn.Linear(dim, channels)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:  # noqa: D102
        c = self.t_mlp(time_embedding(timestep, 64))
        pos = torch.arange(hidden_states.shape[1], device=hidden_states.device)
        h = self.embed(hidden_states)
        for layer in self.layers:
            h = layer(h, c, pos)
        return self.head(h)


def rotary_dit(
    rope: str = "rotate_half",
    qk_norm: str | None = None,
    manual: bool = False,
    seed: int = 0,
    gqa: tuple[int, str] | tuple[int, str, str] | None = None,
    conv_mlp: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """A DiT with rotary embeddings (:data:`ROPE_FORMS`) and qk-norm (:data:`QK_NORMS`);
    ``gqa=(kv_heads, "repeat_kv" | "enable_gqa"[, "channel" | "head"])``: grouped-query
    attention instead, with an output gate per channel or per head; ``conv_mlp``: Sana's
    convolutional MLP on the 4x4 token grid; ``rope="linear"``: Sana's linear attention."""
    torch.manual_seed(seed)
    model = RotaryDiT(rope=rope, qk_norm=qk_norm, manual=manual, gqa=gqa, conv_mlp=conv_mlp)
    return randomize_weights(model.eval(), seed), sequence_inputs(2, 16, 4, seed)
