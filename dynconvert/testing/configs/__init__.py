"""Published configurations of real models (no weights), with their usual sizes and inputs.

One JSON file per family, ``<name>.json``: the model's ``config.json`` as published on the
Hugging Face Hub (``_class_name`` and the keys that configure the architecture; the source
repositories and their licenses are listed in ``SOURCES.txt`` beside them). The table
:data:`REAL_CONFIGS` gives each its usual size (the resolution its pipeline runs at), a probe
size (a few tokens, the same graph: analysis decides head-locality there) and how latent cells
relate to pixels, so that ``dynconvert inspect --model flux-dev`` and
``benchmarks/support_matrix.py --real-size`` can build any of them on the meta device.

Example:
    >>> entry = real_config("flux-dev")
    >>> entry.name, entry.size, entry.pixels()
    ('flux1-dev', Size(h=64, w=64, f=1, txt=512), (1024, 1024, 1))
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynconvert.errors import ConfigError, ModelNotFoundError
from dynconvert.testing.configs.inputs import MAKERS, Size

__all__ = ["REAL_CONFIGS", "RealConfig", "Size", "build", "for_class", "real_config"]

HERE = Path(__file__).parent


@dataclass(frozen=True)
class RealConfig:
    """One shipped configuration: its file, sizes and where it comes from."""

    name: str  # the file's stem
    class_name: str  # the diffusers class
    size: Size  # the usual size, in latent cells (see inputs.py)
    probe: Size  # a few tokens, the same graph: where head-locality is decided
    spatial: int  # pixels per latent cell (VAE factor, times 2 where 2x2 cells are packed)
    temporal: int = 1  # frames per latent frame after the first (video VAEs)
    aliases: tuple[str, ...] = ()
    source: str = ""  # Hugging Face repository

    def config(self) -> dict[str, Any]:
        """The published config (``_class_name`` and the architecture's keys)."""
        return json.loads((HERE / f"{self.name}.json").read_text())

    def pixels(self, size: Size | None = None) -> tuple[int, int, int]:
        """(height, width, frames) in pixels of a size (the usual one by default)."""
        s = size or self.size
        return s.h * self.spatial, s.w * self.spatial, (s.f - 1) * self.temporal + 1

    def size_at(
        self, height: int | None = None, width: int | None = None, frames: int | None = None
    ) -> Size:
        """The size in latent cells for a height and width in pixels (and frames for video);
        what is not given keeps the usual size."""
        h, w, f = self.size.h, self.size.w, self.size.f
        for what, value, step in (("height", height, self.spatial), ("width", width, self.spatial)):
            if value is not None and (value <= 0 or value % step):
                raise ConfigError(
                    f"{what} {value} px does not fit {self.name}: use a positive multiple of "
                    f"{step} px (its latent cells are {step} px)"
                )
        if frames is not None and (frames < 1 or (frames - 1) % self.temporal):
            raise ConfigError(
                f"frames {frames} does not fit {self.name}: use 1 + a multiple of {self.temporal}"
            )
        h = height // self.spatial if height else h
        w = width // self.spatial if width else w
        f = (frames - 1) // self.temporal + 1 if frames else f
        return Size(h, w, f, self.size.txt)

    def inputs(self, model: nn.Module, size: Size | None = None, batch: int = 1) -> dict:
        """Keyword inputs of ``model`` at ``size`` (the usual one by default), on the CPU."""
        return MAKERS[self.class_name](model, size or self.size, batch)


def _c(name: str, cls: str, size: Size, probe: Size, spatial: int, temporal: int = 1,
       aliases: tuple[str, ...] = (), source: str = "") -> RealConfig:  # fmt: skip
    return RealConfig(name, cls, size, probe, spatial, temporal, aliases, source)


S = Size
# fmt: off
REAL_CONFIGS: dict[str, RealConfig] = {c.name: c for c in [
    _c("dit-xl-2", "DiTTransformer2DModel", S(32, 32), S(4, 4), 8, 1, ("dit-xl-2-256",),
       "facebook/DiT-XL-2-256"),
    _c("pixart-sigma", "PixArtTransformer2DModel", S(128, 128, 1, 300), S(4, 6, 1, 5), 8, 1,
       ("pixart-sigma-1024",), "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"),
    _c("sana-1600m", "SanaTransformer2DModel", S(32, 32, 1, 300), S(2, 3, 1, 5), 32, 1,
       ("sana", "sana-1.6b"), "Efficient-Large-Model/Sana_1600M_1024px_diffusers"),
    _c("sd3-medium", "SD3Transformer2DModel", S(128, 128, 1, 333), S(4, 6, 1, 5), 8, 1,
       ("sd3",), "stabilityai/stable-diffusion-3-medium-diffusers"),
    _c("sd3.5-large", "SD3Transformer2DModel", S(128, 128, 1, 333), S(4, 6, 1, 5), 8, 1,
       ("sd35-large", "sd3.5"), "stabilityai/stable-diffusion-3.5-large"),
    _c("flux1-dev", "FluxTransformer2DModel", S(64, 64, 1, 512), S(2, 3, 1, 5), 16, 1,
       ("flux-dev", "flux"), "black-forest-labs/FLUX.1-dev"),
    _c("flux2-dev", "Flux2Transformer2DModel", S(64, 64, 1, 512), S(2, 3, 1, 5), 16, 1,
       ("flux2",), "black-forest-labs/FLUX.2-dev"),
    _c("qwen-image", "QwenImageTransformer2DModel", S(64, 64, 1, 256), S(2, 3, 1, 5), 16, 1,
       ("qwenimage",), "Qwen/Qwen-Image"),
    _c("lumina-image-2", "Lumina2Transformer2DModel", S(128, 128, 1, 256), S(4, 6, 1, 5), 8, 1,
       ("lumina2",), "Alpha-VLLM/Lumina-Image-2.0"),
    _c("cogview4-6b", "CogView4Transformer2DModel", S(128, 128, 1, 256), S(4, 6, 1, 5), 8, 1,
       ("cogview4",), "THUDM/CogView4-6B"),
    _c("hunyuandit-v1.2", "HunyuanDiT2DModel", S(128, 128, 1, 333), S(4, 6, 1, 333), 8, 1,
       ("hunyuan-dit",), "Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers"),
    _c("auraflow", "AuraFlowTransformer2DModel", S(128, 128, 1, 256), S(4, 6, 1, 5), 8, 1,
       ("auraflow-v0.3",), "fal/AuraFlow-v0.3"),
    _c("wan2.1-t2v-1.3b", "WanTransformer3DModel", S(60, 104, 21, 512), S(4, 6, 2, 5), 8, 4,
       ("wan-1.3b", "wan2.1-1.3b"), "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"),
    _c("wan2.1-t2v-14b", "WanTransformer3DModel", S(60, 104, 21, 512), S(4, 6, 2, 5), 8, 4,
       ("wan-14b", "wan2.1-14b"), "Wan-AI/Wan2.1-T2V-14B-Diffusers"),
    _c("hunyuanvideo", "HunyuanVideoTransformer3DModel", S(60, 104, 33, 256), S(4, 6, 2, 5), 8,
       4, ("hunyuan-video",), "hunyuanvideo-community/HunyuanVideo"),
    _c("cogvideox-5b", "CogVideoXTransformer3DModel", S(60, 90, 13, 226), S(4, 6, 2, 5), 8, 4,
       ("cogvideox",), "THUDM/CogVideoX-5b"),
    _c("ltx-video-2b", "LTXVideoTransformer3DModel", S(16, 22, 21, 128), S(2, 3, 2, 5), 32, 8,
       ("ltx-video", "ltx"), "Lightricks/LTX-Video"),
    _c("mochi-1", "MochiTransformer3DModel", S(60, 106, 28, 256), S(4, 6, 2, 5), 8, 6,
       ("mochi",), "genmo/mochi-1-preview"),
]}
# fmt: on
"""Shipped name -> :class:`RealConfig` (sizes from each pipeline's usual resolution)."""


def _names() -> dict[str, str]:
    """Every name and alias, lower case -> the shipped name."""
    out = {}
    for c in REAL_CONFIGS.values():
        out.update({a.lower(): c.name for a in (c.name, *c.aliases)})
    return out


def real_config(name: str) -> RealConfig:
    """The shipped configuration called ``name`` (or one of its aliases, any letter case).

    Example:
        >>> real_config("Flux-Dev").source
        'black-forest-labs/FLUX.1-dev'

    Raises:
        ModelNotFoundError: unknown name; the message lists close matches.
    """
    names = _names()
    key = name.strip().lower()
    if key in names:
        return REAL_CONFIGS[names[key]]
    close = difflib.get_close_matches(key, list(names), n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ModelNotFoundError(
        f"no shipped real configuration {name!r}.{hint} Shipped: {', '.join(REAL_CONFIGS)}"
    )


def is_real_config(name: str) -> bool:
    """Whether ``name`` is a shipped configuration or one of its aliases.

    Example:
        >>> is_real_config("wan-14b"), is_real_config("dit-s")
        (True, False)
    """
    return name.strip().lower() in _names()


def for_class(class_name: str) -> RealConfig:
    """The first shipped configuration of a diffusers class: its input maker and pixel
    factors serve any config of that class (``inspect --diffusers CLASS --config FILE``).

    Example:
        >>> for_class("WanTransformer3DModel").name
        'wan2.1-t2v-1.3b'
    """
    found = [c for c in REAL_CONFIGS.values() if c.class_name == class_name]
    if not found:
        known = sorted({c.class_name for c in REAL_CONFIGS.values()})
        raise ModelNotFoundError(
            f"dynconvert has no example inputs for {class_name}; it has them for "
            f"{', '.join(known)}. For another class, call dynconvert.analyze(model, "
            "example_inputs) from Python with the inputs its pipeline passes"
        )
    return found[0]


def build(class_name: str, config: dict[str, Any], device: str = "meta") -> nn.Module:
    """``diffusers.<class_name>.from_config(config)`` built on ``device`` (meta: no memory
    for the weights), in eval mode.

    Example:
        >>> entry = real_config("dit-xl-2")
        >>> build(entry.class_name, entry.config()).pos_embed.proj.weight.device
        device(type='meta')
    """
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ModelNotFoundError(f"diffusers has no class {class_name}; check the name")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device(device):
        return cls.from_config(config).eval()
