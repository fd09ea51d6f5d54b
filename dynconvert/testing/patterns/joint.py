"""Image + text models as SD3 / Flux / CogView4 write them: two-stream blocks with joint
attention (one MLP per stream, or one MLP shared by both), then parallel single-stream blocks."""

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


class FusedParallelBlock(nn.Module):
    """Single-stream block as Black Forest Labs' reference code writes Flux 2's: one Linear for
    q, k, v and the SwiGLU MLP's two halves, split by the block's attributes; one Linear out of
    concat(attention output, MLP hidden)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.num_heads, self.hidden_size = heads, dim
        self.mlp_hidden_dim = mlp_ratio * dim
        self.modulation = nn.Linear(dim, 3 * dim)
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.linear1 = nn.Linear(dim, 3 * dim + 2 * self.mlp_hidden_dim)
        self.q_norm, self.k_norm = HandRMSNorm(dim // heads), HandRMSNorm(dim // heads)
        self.linear2 = nn.Linear(dim + self.mlp_hidden_dim, dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # noqa: D102
        shift, scale, gate = self.modulation(F.silu(c))[:, None].chunk(3, -1)
        x_mod = (1 + scale) * self.pre_norm(x) + shift  # (B, N, D)
        qkv, mlp = torch.split(
            self.linear1(x_mod), [3 * self.hidden_size, 2 * self.mlp_hidden_dim], dim=-1
        )
        b, n, _ = qkv.shape
        q, k, v = qkv.view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, N, d)
        q, k = apply_rope(self.q_norm(q), "interleaved"), apply_rope(self.k_norm(k), "interleaved")
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        x1, x2 = mlp.chunk(2, dim=-1)  # (B, N, F) each
        return x + gate * self.linear2(torch.cat([attn, F.silu(x1) * x2], 2))


class MMDiT(nn.Module):
    """Image + text model: joint two-stream blocks, then parallel single-stream blocks."""

    def __init__(
        self, dim=32, heads=4, joint=2, single=1, channels=4, text_dim=12, shared_mlp=False,
        single_block: type[nn.Module] = ParallelBlock,
    ):  # fmt: skip
        super().__init__()
        self.embed, self.text_embed = nn.Linear(channels, dim), nn.Linear(text_dim, dim)
        self.t_mlp = nn.Sequential(nn.Linear(64, dim), nn.SiLU(), nn.Linear(dim, dim))
        block = SharedMlpBlock if shared_mlp else JointBlock
        self.joint = nn.ModuleList([block(dim, heads) for _ in range(joint)])
        self.single = nn.ModuleList([single_block(dim, heads) for _ in range(single)])
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
    joint: int = 2, single: int = 1, seed: int = 0, shared_mlp: bool = False, fused: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """An MM-DiT (SD3 / Flux shape): joint attention blocks and parallel single-stream blocks;
    ``shared_mlp``: the joint blocks apply one sliced-SwiGLU MLP to both streams (CogView4);
    ``fused``: the single blocks compute q, k, v and the MLP in one Linear (Flux 2)."""
    torch.manual_seed(seed)
    single_block = FusedParallelBlock if fused else ParallelBlock
    model = MMDiT(joint=joint, single=single, shared_mlp=shared_mlp, single_block=single_block)
    inputs = sequence_inputs(2, 16, 4, seed, encoder_hidden_states=(6, 12))
    return randomize_weights(model.eval(), seed), inputs
