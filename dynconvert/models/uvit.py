"""U-ViT: a ViT backbone for diffusion models (Bao et al., 2023).

Same module tree and state-dict keys as thu-ml/U-ViT ``libs/uvit.py``, so the official
``nnet_ema.pth`` checkpoints load unchanged. Time and class enter as tokens prepended to the patch
tokens; long skip connections join each in-block to its mirror out-block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.models.vision_transformer import Mlp

from dynconvert.models.dit import example_timesteps, timestep_embedding
from dynconvert.models.presets import preset_factory


def unpatchify(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Fold square-grid patch tokens (B, L, p * p * C) back into images (B, C, H, W)."""
    batch, length, patch_dim = x.shape
    p = int(round((patch_dim // channels) ** 0.5))
    h = w = int(round(length**0.5))
    if h * w != length or p * p * channels != patch_dim:
        raise ValueError(
            f"cannot unpatchify {tuple(x.shape)} into {channels} channels on a square grid"
        )
    x = x.reshape(batch, h, w, p, p, channels)  # (B, h, w, p, p, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return x.reshape(batch, channels, h * p, w * p)  # (B, C, H, W)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv laid out as (3, heads, head_dim) rows."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, L, D); head size taken from the qkv weights, so pruned heads work."""
        batch, length, _ = x.shape
        qkv = self.qkv(x)  # (B, L, 3 * H * Dh)
        head_dim = qkv.shape[-1] // (3 * self.num_heads)  # from the weights: heads may be pruned
        qkv = qkv.reshape(batch, length, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, L, Dh)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, Dh)
        x = x.transpose(1, 2).reshape(batch, length, -1)  # (B, L, H * Dh)
        return self.proj(x)  # (B, L, D)


class Block(nn.Module):
    """A pre-norm transformer block; out-blocks first fuse the long skip with ``skip_linear``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        skip: bool = False,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, D) -> (B, L, D); an out-block first fuses ``skip``, its in-block's (B, L, D).

        With ``use_checkpoint`` the block is activation-checkpointed in training.
        """
        if self.use_checkpoint and self.training:
            return torch.utils.checkpoint.checkpoint(self._forward, x, skip, use_reentrant=False)
        return self._forward(x, skip)

    def _forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))  # (B, L, D)
        x = x + self.attn(self.norm1(x))  # (B, L, D)
        x = x + self.mlp(self.norm2(x))  # (B, L, D)
        return x


class PatchEmbed(nn.Module):
    """Image to patch tokens with a strided convolution."""

    def __init__(self, patch_size: int, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> patch tokens (B, H/p * W/p, D)."""
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, L, D)


class UViT(nn.Module):
    """U-ViT: time, class and patches as tokens, with long skips between shallow and deep blocks."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        mlp_time_embed: bool = False,
        num_classes: int = -1,
        use_checkpoint: bool = False,
        conv: bool = True,
        skip: bool = True,
    ):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be divisible by patch_size {patch_size}")
        self.num_features = self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = img_size
        self.num_heads = num_heads
        self.preset: str | None = None
        self.preset_kwargs: dict = {}

        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = (img_size // patch_size) ** 2

        self.time_embed = (
            nn.Sequential(
                nn.Linear(embed_dim, 4 * embed_dim),
                nn.SiLU(),
                nn.Linear(4 * embed_dim, embed_dim),
            )
            if mlp_time_embed
            else nn.Identity()
        )

        if self.num_classes > 0:
            self.label_emb = nn.Embedding(self.num_classes, embed_dim)
        self.extras = 1 + int(self.num_classes > 0)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, embed_dim))

        def make_block(skip_block: bool = False) -> Block:
            return Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                skip=skip_block,
                use_checkpoint=use_checkpoint,
            )

        self.in_blocks = nn.ModuleList([make_block() for _ in range(depth // 2)])
        self.mid_block = make_block()
        self.out_blocks = nn.ModuleList([make_block(skip) for _ in range(depth // 2)])

        self.norm = nn.LayerNorm(embed_dim)
        self.patch_dim = patch_size**2 * in_chans
        self.decoder_pred = nn.Linear(embed_dim, self.patch_dim, bias=True)
        self.final_layer = (
            nn.Conv2d(self.in_chans, self.in_chans, 3, padding=1) if conv else nn.Identity()
        )

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        """Initialise as the original: truncated-normal linears, unit layer norms."""
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict noise for images x (B, C, H, W) at timesteps (B,), with labels y (B,) if any."""
        if (y is not None) != (self.num_classes > 0):
            raise ValueError(
                f"this U-ViT has num_classes={self.num_classes}: pass labels y if and only if "
                "num_classes > 0 (use model.example_inputs() for valid inputs)"
            )
        x = self.patch_embed(x)  # (B, L, D)

        t_freq = timestep_embedding(timesteps, self.embed_dim).to(x.dtype)  # (B, D)
        time_token = self.time_embed(t_freq)  # (B, D)
        x = torch.cat((time_token.unsqueeze(dim=1), x), dim=1)  # (B, 1 + L, D)
        if y is not None:
            label_emb = self.label_emb(y)  # (B, D)
            x = torch.cat((label_emb.unsqueeze(dim=1), x), dim=1)  # (B, extras + L, D)
        x = x + self.pos_embed  # (B, extras + L, D)

        skips = []
        for blk in self.in_blocks:
            x = blk(x)  # (B, extras + L, D)
            skips.append(x)

        x = self.mid_block(x)  # (B, extras + L, D)

        for blk in self.out_blocks:
            x = blk(x, skips.pop())  # (B, extras + L, D)

        x = self.norm(x)  # (B, extras + L, D)
        x = self.decoder_pred(x)  # (B, extras + L, p * p * C)
        x = x[:, self.extras :, :]  # (B, L, p * p * C)
        x = unpatchify(x, self.in_chans)  # (B, C, H, W)
        return self.final_layer(x)  # (B, C, H, W)

    def example_inputs(
        self,
        batch_size: int = 1,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Valid inputs for ``forward``: ``(x, timesteps, y)``, or ``(x, timesteps)`` without
        classes."""
        param = next(self.parameters())
        device = param.device if device is None else device
        shape = (batch_size, self.in_chans, self.img_size, self.img_size)
        x = torch.randn(shape, generator=generator).to(device=device, dtype=param.dtype)
        t = example_timesteps(batch_size, generator).to(device)
        if self.num_classes <= 0:
            return x, t
        y = torch.randint(0, self.num_classes, (batch_size,), generator=generator)
        return x, t, y.to(device)


#################################################################################
#                                 U-ViT presets                                 #
#################################################################################


def _factory(name: str, **config) -> Callable[..., UViT]:
    """A preset factory: ``UViT`` with ``config``, overridden by the caller's keyword arguments."""
    return preset_factory(UViT, name, **config)


# Sizes of the paper (Table 1); depth counts in + out blocks, plus one mid block.
_S = dict(embed_dim=512, depth=12, num_heads=8)
_M = dict(embed_dim=768, depth=16, num_heads=12)
_L = dict(embed_dim=1024, depth=20, num_heads=16)
_H = dict(embed_dim=1152, depth=28, num_heads=16)
# Settings every official config shares.
_COMMON = dict(mlp_ratio=4, qkv_bias=False, mlp_time_embed=False)
# Latent models: Stable Diffusion VAE latents (4 channels), 1000 classes plus the null class.
_LATENT = dict(in_chans=4, num_classes=1001)

UVIT_PRESETS: dict[str, Callable[..., UViT]] = {
    # configs/cifar10_uvit.py: CIFAR-10 32x32 pixels, unconditional.
    "U-ViT-S/2": _factory("U-ViT-S/2", img_size=32, patch_size=2, num_classes=-1, **_S, **_COMMON),
    # configs/celeba64_uvit.py: CelebA 64x64 pixels, unconditional.
    "U-ViT-S/4": _factory("U-ViT-S/4", img_size=64, patch_size=4, num_classes=-1, **_S, **_COMMON),
    # configs/imagenet64_uvit_mid.py: ImageNet 64x64 pixels, 1000 classes.
    "U-ViT-M/4": _factory(
        "U-ViT-M/4", img_size=64, patch_size=4, num_classes=1000, **_M, **_COMMON
    ),
    # configs/imagenet64_uvit_large.py: ImageNet 64x64 pixels, 1000 classes.
    "U-ViT-L/4": _factory(
        "U-ViT-L/4", img_size=64, patch_size=4, num_classes=1000, **_L, **_COMMON
    ),
    # configs/imagenet256_uvit.py: ImageNet 256x256 as 32x32 latents.
    "U-ViT-L/2": _factory("U-ViT-L/2", img_size=32, patch_size=2, **_LATENT, **_L, **_COMMON),
    # configs/imagenet256_uvit_huge.py: ImageNet 256x256 as 32x32 latents, no final conv.
    "U-ViT-H/2": _factory(
        "U-ViT-H/2", img_size=32, patch_size=2, conv=False, **_LATENT, **_H, **_COMMON
    ),
    # configs/imagenet512_uvit_large.py: ImageNet 512x512 as 64x64 latents.
    "U-ViT-L/4-512": _factory(
        "U-ViT-L/4-512", img_size=64, patch_size=4, **_LATENT, **_L, **_COMMON
    ),
    # configs/imagenet512_uvit_huge.py: ImageNet 512x512 as 64x64 latents, no final conv.
    "U-ViT-H/4-512": _factory(
        "U-ViT-H/4-512", img_size=64, patch_size=4, conv=False, **_LATENT, **_H, **_COMMON
    ),
    # Tiny test model: 2 in-blocks, 1 mid-block, 2 out-blocks.
    "uvit-tiny": _factory(
        "uvit-tiny",
        img_size=8,
        patch_size=2,
        in_chans=4,
        embed_dim=32,
        depth=5,
        num_heads=2,
        num_classes=11,
        mlp_time_embed=False,
        conv=True,
    ),
}
