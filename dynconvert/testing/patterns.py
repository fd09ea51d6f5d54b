"""Small DiT-like models written the way other codebases write them, one per pattern of today's
diffusion transformers: rotary embeddings in every form and per-head qk-norm, joint attention
over two streams (MM-DiT), parallel single-stream blocks, frames folded into the batch (video),
and projections that are ``nn.Linear`` subclasses.

None of their classes is in any registry: every site is found from the graph. Each builder
returns ``(model, example_inputs)`` with random weights; the inputs are keyword arguments.

Example:
    >>> model, inputs = rotary_dit(rope="complex", qk_norm="head_rms")
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
        self, dim=32, heads=4, depth=2, channels=4, rope="rotate_half", qk_norm=None, manual=False, gqa=None,
        conv_mlp=False,
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


class JointAttention(nn.Module):
    """MM-DiT attention: image and text streams with their own q/k/v/out, attended together."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.txt_q, self.txt_k, self.txt_v, self.txt_o = (nn.Linear(dim, dim) for _ in range(4))
        self.q_norm, self.txt_q_norm = HandRMSNorm(dim // heads), HandRMSNorm(dim // heads)

    def forward(self, img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: D102
        b, n_img, _ = img.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)

        q = torch.cat([self.txt_q_norm(split(self.txt_q(txt))), self.q_norm(split(self.q(img)))], 2)
        k = torch.cat([split(self.txt_k(txt)), split(self.k(img))], 2)
        v = torch.cat([split(self.txt_v(txt)), split(self.v(img))], 2)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        o_txt, o_img = o.split([txt.shape[1], n_img], dim=1)
        return self.o(o_img), self.txt_o(o_txt)


class JointBlock(nn.Module):
    """Two-stream block: joint attention, then one MLP per stream."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.mod_img, self.mod_txt = ScaleShift(dim), ScaleShift(dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = JointAttention(dim, heads)
        self.ff_img, self.ff_txt = FeedForward(dim, 2 * dim), FeedForward(dim, 2 * dim)

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: D102
        a1, b1, g1, a2, b2, g2 = self.mod_img(c)
        c1, d1, h1, c2, d2, h2 = self.mod_txt(c)
        ai, at = self.attn(self.norm(img) * (1 + b1) + a1, self.norm(txt) * (1 + d1) + c1)
        img, txt = img + g1 * ai, txt + h1 * at
        ff_img, ff_txt = self.mlps()
        img = img + g2 * ff_img(self.norm(img) * (1 + b2) + a2)
        txt = txt + h2 * ff_txt(self.norm(txt) * (1 + d2) + c2)
        return img, txt

    def mlps(self) -> tuple[nn.Module, nn.Module]:
        """The image stream's MLP and the text stream's."""
        return self.ff_img, self.ff_txt


class SlicedSwiGLU(nn.Module):
    """Flux 2's MLP: one projection to value and gate, the halves taken by slicing."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.proj_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        h = self.proj_in(x)
        half = h.shape[-1] // 2  # from the shape: a sliced projection halves the same way
        return self.proj_out(F.silu(h[..., :half]) * h[..., half:])


class SharedMlpBlock(JointBlock):
    """CogView4's two-stream block: joint attention, then one MLP (shared weights) applied to
    the image tokens and to the text tokens in turn."""

    def __init__(self, dim: int, heads: int):
        super().__init__(dim, heads)
        del self.ff_img, self.ff_txt
        self.ff = SlicedSwiGLU(dim, 2 * dim)

    def mlps(self) -> tuple[nn.Module, nn.Module]:
        """The one MLP, for both streams."""
        return self.ff, self.ff


class ParallelBlock(nn.Module):
    """Single-stream block (Flux): attention and MLP side by side from one input, one out-proj
    reading concat(attention output, activated MLP hidden)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.heads = heads
        self.mod = nn.Linear(dim, 3 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.q_norm, self.k_norm = HandRMSNorm(dim // heads), HandRMSNorm(dim // heads)
        self.mlp_in = nn.Linear(dim, mlp_ratio * dim)
        self.out = nn.Linear(dim + mlp_ratio * dim, dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # noqa: D102
        shift, scale, gate = self.mod(F.silu(c))[:, None].chunk(3, -1)
        h = self.norm(x) * (1 + scale) + shift
        b, n, _ = h.shape
        q, k, v = (
            t.view(b, n, self.heads, -1).transpose(1, 2)
            for t in (self.to_q(h), self.to_k(h), self.to_v(h))
        )
        q, k = apply_rope(self.q_norm(q), "rotate_half"), apply_rope(self.k_norm(k), "rotate_half")
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        mlp = F.gelu(self.mlp_in(h), approximate="tanh")
        return x + gate * self.out(torch.cat([o, mlp], dim=2))


class MMDiT(nn.Module):
    """Image + text model: joint two-stream blocks, then parallel single-stream blocks."""

    def __init__(
        self, dim=32, heads=4, joint=2, single=1, channels=4, text_dim=12, shared_mlp=False
    ):
        super().__init__()
        self.embed, self.text_embed = nn.Linear(channels, dim), nn.Linear(text_dim, dim)
        self.t_mlp = nn.Sequential(nn.Linear(64, dim), nn.SiLU(), nn.Linear(dim, dim))
        block = SharedMlpBlock if shared_mlp else JointBlock
        self.joint = nn.ModuleList([block(dim, heads) for _ in range(joint)])
        self.single = nn.ModuleList([ParallelBlock(dim, heads) for _ in range(single)])
        self.head = nn.Linear(dim, channels)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
    ) -> torch.Tensor:  # noqa: D102
        c = self.t_mlp(time_embedding(timestep, 64))
        img, txt = self.embed(hidden_states), self.text_embed(encoder_hidden_states)
        for blk in self.joint:
            img, txt = blk(img, txt, c)
        x = torch.cat([txt, img], 1)
        for blk in self.single:
            x = blk(x, c)
        return self.head(x[:, txt.shape[1] :])


def mmdit(
    joint: int = 2, single: int = 1, seed: int = 0, shared_mlp: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """An MM-DiT (SD3 / Flux shape): joint attention blocks and parallel single-stream blocks;
    ``shared_mlp``: the joint blocks apply one sliced-SwiGLU MLP to both streams (CogView4)."""
    torch.manual_seed(seed)
    model = MMDiT(joint=joint, single=single, shared_mlp=shared_mlp)
    inputs = sequence_inputs(2, 16, 4, seed, encoder_hidden_states=(6, 12))
    return randomize_weights(model.eval(), seed), inputs


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


PATTERNS = {
    "rotary-rotate-half": lambda: rotary_dit("rotate_half"),
    "rotary-interleaved": lambda: rotary_dit("interleaved", "head_layernorm"),
    "rotary-complex": lambda: rotary_dit("complex", "head_rms"),
    "rotary-table-manual": lambda: rotary_dit("table", "head_rms", manual=True),
    "rotary-matrix": lambda: rotary_dit("matrix", "head_rms"),
    "qknorm-all-heads": lambda: rotary_dit("rotate_half", "all"),
    "gqa-repeat-kv": lambda: rotary_dit(gqa=(2, "repeat_kv")),
    "gqa-enable-gqa": lambda: rotary_dit(gqa=(2, "enable_gqa")),
    "gated-gqa": lambda: rotary_dit(gqa=(2, "repeat_kv", "channel")),
    "gated-per-head": lambda: rotary_dit(gqa=(4, "enable_gqa", "head")),
    "conv-mlp": lambda: rotary_dit(conv_mlp=True),
    "sana-like": lambda: rotary_dit("linear", conv_mlp=True),
    "mmdit": mmdit,
    "mmdit-shared-mlp": lambda: mmdit(shared_mlp=True),
    "video": video_dit,
    "video-own-projections": lambda: video_dit(linear=Dense),
}
"""Builders of the pattern models by name, each returning ``(model, example_inputs)``."""
