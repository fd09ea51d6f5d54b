"""A zoo of tiny denoising transformers: every image and video DiT class of the installed diffusers,
the built-in DiT and U-ViT, and a timm-based DiT, each with random weights and example inputs.

Each entry builds a model from a config small enough that its forward pass runs on a CPU in
milliseconds (1-2 layers, 2-4 heads of 8-16 channels, tiny latents), and makes inputs exactly as the
model is called (keyword arguments). The support matrix (``dynconvert.support``) converts every
entry; classes that cannot be built or run here are listed in :data:`ZOO_EXCLUDED` with the reason.

Example:
    >>> from dynconvert.models.zoo import ZOO
    >>> entry = ZOO["flux"]
    >>> model = entry.build(0)
    >>> out = model(**entry.inputs(model, batch=2))
"""

from __future__ import annotations

from dynconvert.testing.zoo.builders import TimmDiT, ZooEntry
from dynconvert.testing.zoo.image import IMAGE
from dynconvert.testing.zoo.other import OTHER
from dynconvert.testing.zoo.video import VIDEO

__all__ = ["ZOO", "ZOO_EXCLUDED", "TimmDiT", "ZooEntry", "zoo_names"]

ZOO: dict[str, ZooEntry] = {**IMAGE, **VIDEO, **OTHER}
"""Zoo name -> :class:`ZooEntry`."""

ZOO_EXCLUDED: dict[str, str] = {
    "TransformerTemporalModel": (
        "not a denoiser on its own: the temporal layer of video U-Nets, called without a timestep"
    ),
    "Cosmos3OmniTransformer": (
        "not attempted yet: an omni (text, vision, sound, action) generator whose forward takes packed sequences, per-modality index tensors and token lists built by its pipeline"
    ),
    "MiniMaxMusic3RVQDepthDecoder": (
        "not a denoiser: the autoregressive codebook-depth decoder of a music tokenizer (inputs_embeds only, no timestep)"
    ),
    "RFD4ProteinaTransformer": (
        "protein structure generator, not image/video: a pair representation and a dozen structural feature tensors; not attempted"
    ),
    "WanAnimate2Transformer3DModel": (
        "its denoising call reads a KV cache that a separate reference call (kv_cache_mode='extract') must fill first: a two-call protocol with state between calls, not one call that can be captured and converted"
    ),
}
"""diffusers class name -> why it has no zoo entry (cannot be built or run here)."""


def zoo_names(family: str | None = None) -> list[str]:
    """Names of the zoo entries, in registry order (only those of ``family`` when given)."""
    return [k for k, e in ZOO.items() if family is None or e.family == family]
