"""DiT: class-conditional diffusion transformer (Peebles & Xie, 2023).

Same module tree and state-dict keys as facebookresearch/DiT ``models.py``, so the official
checkpoints (for example ``DiT-XL-2-256x256.pt``) load unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import Attention, Mlp, PatchEmbed

from dynconvert.models.presets import preset_factory


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Apply adaLN shift and scale (N, D) to tokens (N, T, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding (N, dim) of N possibly fractional timesteps (GLIDE layout: cos, sin)."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)  # (half,)
    args = t[:, None].float() * freqs[None]  # (N, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * half)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def example_timesteps(batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Distinct float DDPM-scale timesteps in [0, 999): one per stratum of [0, 999), shuffled."""
    order = torch.randperm(batch_size, generator=generator).float()
    jitter = torch.rand(batch_size, generator=generator)
    return (order + jitter) * (999.0 / batch_size)


#################################################################################
#               Embedding layers for timesteps and class labels                 #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps into vectors: sinusoid (256 dims) then a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(N,) timesteps -> (N, hidden_size) embedding, in the MLP's dtype."""
        t_freq = timestep_embedding(t, self.frequency_embedding_size)  # (N, F)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, D); bf16/fp16 models too


class LabelEmbedder(nn.Module):
    """Embeds class labels; with dropout > 0 an extra row is the null label for CFG."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(
        self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Replace dropped labels by the null label ``num_classes``."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(
        self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(N,) labels -> (N, hidden_size) embeddings.

        Labels are first replaced by the null label where ``force_drop_ids == 1``, or at random
        (rate ``dropout_prob``) when ``train`` is set and dropout is on.
        """
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (N, D)


#################################################################################
#                                 Core DiT model                                #
#################################################################################


class DiTBlock(nn.Module):
    """A transformer block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        approx_gelu = partial(nn.GELU, approximate="tanh")
        self.mlp = Mlp(
            in_features=hidden_size,
            hidden_features=int(hidden_size * mlp_ratio),
            act_layer=approx_gelu,
            drop=0,
        )
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True)
        )

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Tokens x (N, T, D) and conditioning c (N, D) -> (N, T, D).

        adaLN-Zero: c gives shift, scale and gate of the attention and of the MLP residual branch.
        """
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(
            c
        ).chunk(6, dim=1)  # 6 x (N, D)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x  # (N, T, D)


class FinalLayer(nn.Module):
    """The final adaLN-modulated norm and linear projection back to patches."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True)
        )

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Tokens x (N, T, D) and conditioning c (N, D) -> patches (N, T, p * p * out_channels)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (N, D)
        x = modulate(self.norm_final(x), shift, scale)  # (N, T, D)
        return self.linear(x)  # (N, T, p * p * out_channels)


class DiT(nn.Module):
    """Diffusion model with a transformer backbone (DiT)."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ):
        super().__init__()
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.input_size = input_size
        self.num_classes = num_classes
        self.preset: str | None = None
        self.preset_kwargs: dict = {}

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos embedding, kept in the state dict like the original:
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)

        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Initialise as the original: xavier linears, sin-cos pos_embed, zero adaLN and output."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)

        grid_size = self.x_embedder.grid_size[0]
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid_size)
        with torch.no_grad():
            self.pos_embed.copy_(pos_embed.float().unsqueeze(0))

        # Patch embedding initialised like nn.Linear (instead of nn.Conv2d):
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)

        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Fold patch tokens (N, T, p * p * C) back into images (N, C, H, W)."""
        c = self.out_channels
        p = self.x_embedder.patch_size[0]
        h, w = self.x_embedder.grid_size
        x = x.reshape(x.shape[0], h, w, p, p, c)  # (N, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (N, C, h, p, w, p)
        return x.reshape(x.shape[0], c, h * p, w * p)  # (N, C, H, W)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Predict noise (and sigma) for latents x (N, C, H, W), timesteps t (N,), labels y (N,)."""
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D), T = H * W / p ** 2
        t = self.t_embedder(t)  # (N, D)
        y = self.y_embedder(y, self.training)  # (N, D)
        c = t + y  # (N, D)
        for block in self.blocks:
            x = block(x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p ** 2 * out_channels)
        return self.unpatchify(x)  # (N, out_channels, H, W)

    def forward_with_cfg(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float
    ) -> torch.Tensor:
        """Forward a batch whose second half holds null labels; mix eps by classifier-free guidance.

        The first half's latents are run twice (with labels, then null labels) and both halves
        get the same guided eps, so they stay identical through the sampler loop, as in the
        original ``sample.py``.
        """
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)  # (N, C, H, W)
        model_out = self(combined, t, y)  # (N, out_channels, H, W); through __call__ so hooks run
        eps, rest = model_out[:, : self.in_channels], model_out[:, self.in_channels :]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)  # (N / 2, C, H, W)
        eps = torch.cat([half_eps, half_eps], dim=0)  # (N, C, H, W)
        return torch.cat([eps, rest], dim=1)  # (N, out_channels, H, W)

    def example_inputs(
        self,
        batch_size: int = 1,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Valid ``(x, t, y)`` for ``forward``: noise, distinct timesteps in [0, 999), labels."""
        param = next(self.parameters())
        device = param.device if device is None else device
        shape = (batch_size, self.in_channels, self.input_size, self.input_size)
        x = torch.randn(shape, generator=generator)
        t = example_timesteps(batch_size, generator)
        y = torch.randint(0, self.num_classes, (batch_size,), generator=generator)
        return x.to(device=device, dtype=param.dtype), t.to(device), y.to(device)


#################################################################################
#                   Sine/cosine positional embedding (as MAE)                   #
#################################################################################


def get_1d_sincos_pos_embed(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """Sin-cos embedding (M, embed_dim) of M positions, computed in float64."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = pos.reshape(-1).double()[:, None] * omega[None]  # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, D)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2D sin-cos embedding (grid_size ** 2, embed_dim) of a square grid, as MAE and DiT."""
    if embed_dim % 4:
        raise ValueError(
            f"embed_dim must be divisible by 4 for a 2D sin-cos embedding, got {embed_dim}"
        )
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid = torch.meshgrid(coords, coords, indexing="xy")  # grid[0] varies along w, as the original
    emb_0 = get_1d_sincos_pos_embed(embed_dim // 2, grid[0])  # (H * W, D/2)
    emb_1 = get_1d_sincos_pos_embed(embed_dim // 2, grid[1])  # (H * W, D/2)
    return torch.cat([emb_0, emb_1], dim=1)  # (H * W, D)


#################################################################################
#                                  DiT presets                                  #
#################################################################################

# Model sizes of the paper (Table 1).
_SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}


def dit_factory(name: str, **config) -> Callable[..., DiT]:
    """A preset factory: ``DiT`` with ``config``, overridden by the caller's keyword arguments.

    The model it builds records ``preset`` (``name``) and ``preset_kwargs`` (the overrides);
    see :func:`dynconvert.models.presets.preset_factory`.

    Example:
        >>> dit_factory("dit-one", depth=1, hidden_size=32, num_heads=2)(depth=2).preset_kwargs
        {'depth': 2}
    """
    return preset_factory(DiT, name, **config)


# Every size at patch 2, 4 and 8 (the DiT paper's grid) for 256x256 images (32x32 latents),
# and the same as "-512" for 512x512 (64x64 latents).
DIT_PRESETS: dict[str, Callable[..., DiT]] = {}
for _size, _arch in _SIZES.items():
    for _patch in (2, 4, 8):
        _name = f"DiT-{_size}/{_patch}"
        DIT_PRESETS[_name] = dit_factory(_name, input_size=32, patch_size=_patch, **_arch)
        DIT_PRESETS[f"{_name}-512"] = dit_factory(
            f"{_name}-512", input_size=64, patch_size=_patch, **_arch
        )

# Tiny test model: 2 blocks of 2 heads x 16 dims, 8x8x4 latents (16 tokens), 10 classes.
DIT_PRESETS["dit-tiny"] = dit_factory(
    "dit-tiny",
    input_size=8,
    patch_size=2,
    in_channels=4,
    hidden_size=32,
    depth=2,
    num_heads=2,
    num_classes=10,
    learn_sigma=True,
)
