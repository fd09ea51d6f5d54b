"""How a zoo entry builds its tiny model and its example inputs: the entry type and the input
makers shared by every family."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dynconvert.models.tiny import randomize_weights


@dataclass(frozen=True)
class ZooEntry:
    """One tiny model of the zoo.

    Attributes:
        class_name: the model's class name (a diffusers class, or a built-in one).
        family: ``"image"``, ``"video"``, ``"audio"`` or ``"other"``.
        build: ``build(seed) -> model`` in eval mode with random weights.
        inputs: ``inputs(model, batch=2) -> dict`` of keyword arguments, as the model is called.
        note: what the tiny config leaves out or chooses (empty when nothing notable).
    """

    class_name: str
    family: str
    build: Callable[[int], nn.Module]
    inputs: Callable[..., dict[str, Any]]
    note: str = ""


# -- helpers ---------------------------------------------------------------------------------------
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def steps(batch: int, scale: float = 1000.0, integer: bool = False) -> torch.Tensor:
    """Distinct timesteps, one per sample, spread over (0, scale)."""
    t = torch.linspace(0.9, 0.1, batch) * scale if batch > 1 else torch.tensor([0.5 * scale])
    return t.round().long() if integer else t


def diffusers(class_name: str, **config: Any) -> Callable[[int], nn.Module]:
    """A builder of ``diffusers.<class_name>(**config)`` with random weights, in eval mode."""

    def build(seed: int = 0) -> nn.Module:
        import diffusers.models.transformers as transformers

        torch.manual_seed(seed)
        model = getattr(transformers, class_name)(**config)
        return randomize_weights(model.eval(), seed)

    return build


def ones_mask(batch: int, length: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
    return torch.ones(batch, length, dtype=dtype)


def flux_ids(h: int, w: int, text: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flux-style position ids: (h*w, 3) image ids (0, row, col) and (text, 3) zero text ids."""
    img = torch.zeros(h, w, 3)
    img[..., 1] = torch.arange(h)[:, None]
    img[..., 2] = torch.arange(w)[None, :]
    return img.reshape(h * w, 3), torch.zeros(text, 3)


def T(scale: float = 1000.0, integer: bool = False) -> Callable[[int], torch.Tensor]:
    """Spec of a timestep input: distinct per sample, in (0, scale)."""
    return lambda batch: steps(batch, scale, integer)


def M(length: int, dtype: torch.dtype = torch.long) -> Callable[[int], torch.Tensor]:
    """Spec of an all-ones (B, length) mask."""
    return lambda batch: ones_mask(batch, length, dtype)


def Z(*shape: int) -> Callable[[int], torch.Tensor]:
    """Spec of a zero (B, *shape) tensor."""
    return lambda batch: torch.zeros(batch, *shape)


def kw(**spec: Any) -> Callable[..., dict[str, Any]]:
    """Inputs from a spec: a tuple is a random (B, *tuple) tensor, a callable gets the batch
    size, anything else is passed as it is."""

    def inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
        g = gen()
        out: dict[str, Any] = {}
        for key, value in spec.items():
            if isinstance(value, tuple):
                out[key] = randn(g, batch, *value)
            elif callable(value):
                out[key] = value(batch)
            else:
                out[key] = value
        return out

    return inputs


# -- built-in and timm models ----------------------------------------------------------------------
def builtin(name: str) -> Callable[[int], nn.Module]:
    def build(seed: int = 0) -> nn.Module:
        from dynconvert.models import build_model

        torch.manual_seed(seed)
        return randomize_weights(build_model(name).eval(), seed)

    return build


def builtin_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    import inspect

    args = model.example_inputs(batch_size=batch)
    names = [p for p in inspect.signature(model.forward).parameters]
    return dict(zip(names, args))


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimmDiT(nn.Module):
    """A DiT built from timm's ViT parts: PatchEmbed, ``vision_transformer.Block`` and a timestep
    embedding added to every token (no adaLN: the blocks are timm's own, unchanged).

    Args:
        img_size: latent side.
        patch_size: patch side.
        in_chans: latent channels.
        dim: token width.
        depth: number of timm Blocks.
        heads: attention heads.
        mlp_ratio: MLP hidden width / dim.
    """

    def __init__(
        self,
        img_size: int = 8,
        patch_size: int = 2,
        in_chans: int = 4,
        dim: int = 32,
        depth: int = 2,
        heads: int = 2,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block, PatchEmbed

        self.patch_size, self.in_chans, self.dim = patch_size, in_chans, dim
        self.x_embedder = PatchEmbed(img_size, patch_size, in_chans, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, dim))
        self.t_embedder = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio, qkv_bias=True) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, patch_size * patch_size * in_chans)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predict the noise of ``x`` (B, C, H, W) at timesteps ``t`` (B,)."""
        b, c, h, w = x.shape
        tokens = self.x_embedder(x) + self.pos_embed
        tokens = tokens + self.t_embedder(timestep_embedding(t, self.dim))[:, None]
        for block in self.blocks:
            tokens = block(tokens)
        out = self.head(self.norm(tokens))
        p = self.patch_size
        out = out.reshape(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, c, h, w)


def timm_dit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_weights(TimmDiT().eval(), seed)


def timm_inputs(model: nn.Module, batch: int = 2) -> dict[str, Any]:
    g = gen()
    return {"x": randn(g, batch, 4, 8, 8), "t": steps(batch, integer=True)}
