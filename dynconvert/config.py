"""ConvertConfig: the settings of convert (routers, groups, timestep handling)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dynconvert.errors import ConfigError
from dynconvert.fields import Range, check_fields
from dynconvert.plan import TOKEN_REDUCTION

CONFIG_VERSION = 1
"""Format version of ``ConvertConfig.to_dict``; a newer one is refused."""

TIMESTEP_NAMES = ("timestep", "timesteps", "t", "time", "sigma", "sigmas")
"""Forward argument names taken for the timestep, in this order, when ``timestep_arg`` is None."""


_POSITIVE = Range(0, low_open=True)
_RANGES = {
    "mlp_groups": Range(1),
    "tau": _POSITIVE,
    "width_bias_init": Range(-1e4, 1e4),
    "token_bias_init": Range(-1e4, 1e4),
    "token_reduction": Range(1),
    "router_embed_dim": Range(2, 65536),
    "timestep_scale": _POSITIVE,
    "slice_cache_mb": Range(0),
    "version": Range(1),
}
"""Valid ranges of the number fields (the types come from the annotations)."""


@dataclass
class ConvertConfig:
    """How convert builds the routers; defaults follow docs/method.md, "Hyperparameters".

    Attributes:
        attention_width: Route attention heads. Off: no attention site is converted (heads are
            an attention site's only routed units). Default True, as the paper.
        mlp_width: Route the MLP's channel groups. Off: MLPs keep full width (their tokens may
            still be routed). Default True.
        token_routing: Route tokens through the MLP (a skipped token skips the whole MLP).
            Off: no token routers. Default True. Sites whose MLP output does not reach the
            residual as ``x + g * mlp(...)`` are never token-routed.
        mlp_groups: Channel groups G the MLP hidden width is cut into, >= 1. None (default):
            the block's head count, G = H as in the paper (DiT-XL: 16 groups of 288). When G
            does not divide the hidden width the largest divisor below it is used; one group
            turns width routing off for that MLP.
        tau: Temperature of the Gumbel-sigmoid used in training, > 0: noisy logits are divided
            by it before the sigmoid. Default 5.0, the paper's.
        width_bias_init: Initial bias of the width routers (their weights start at zero), in
            logits. Default 15.0, the paper's: every unit starts on (all but surely, under the
            training noise), so the converted model starts as the original.
        token_bias_init: Initial bias of the token routers' last layer, in logits. Default
            35.0, the paper's: every token starts selected.
        token_reduction: Bottleneck ratio r of the token router D -> D/r -> ReLU -> 1, >= 1.
            Default 16, the paper's: the routers cost about 1/16 of a D x D Linear per token.
        router_embed_dim: Width of the timestep embedding the width routers read (sinusoid,
            then a 2-layer MLP shared by all of them); an even integer >= 2 (cos and sin
            halves). Default 256, DiT's frequency embedding size.
        importance: How the always-on unit of each width router is chosen: "magnitude" (the
            unit whose weights have the largest L2 norm; default), "first" (unit 0, as the
            original code without re-ranking), or a callable ``fn(site, linears) -> scores``
            with one score per unit (see ``dynconvert.analysis.importance``).
        timestep_arg: Name of the forward argument that carries t. None (default): the first
            of ``TIMESTEP_NAMES`` in the forward's signature.
        timestep_scale: The routers read ``t * timestep_scale``, which should be on the DDPM
            scale 0..1000; > 0. None (default): inferred at analysis and stated in the plan
            (``Plan.timestep_convention``): from the model class where its pipelines are known
            to pass sigma in [0, 1] (Flux, Chroma, QwenImage, Lumina...), else from example
            timesteps that all lie in [0, 1], else 1.0 (DDPM models pass t in 0..999).
        timestep_reverse: Use ``1000 - t`` (after scaling), for models whose time runs the
            other way (t = 0 at pure noise). None (default): inferred with the scale.
        capture: How the graph is captured: "auto" (default; torch.export non-strict, and
            the per-module torch.fx tracer where export fails), "export" (export only: its
            errors are raised) or "fx" (the tracer only).
        fast_path: Let evaluation run the sliced weights and gathered tokens. False: evaluation
            always runs the masked full-width path (same outputs, no speed-up; a reference
            for debugging). Default True.
        slice_cache_mb: Memory bound, in MiB, of the cache of sliced weights the fast path
            reuses across calls. None (default): 20% of the model's parameter bytes, so a
            converted model stays within about 1.25x the original's memory.
        exclude: Sites to leave unconverted: regular expressions matched against the whole
            site name, or module paths above it ("blocks.0" leaves out "blocks.0.attn").
            Default empty.
        version: Format version of this config (``CONFIG_VERSION``); a newer one than this
            dynconvert's is refused.

    Example:
        >>> cfg = ConvertConfig(mlp_groups=8, token_routing=False)
        >>> cfg.tau
        5.0
    """

    attention_width: bool = True
    mlp_width: bool = True
    token_routing: bool = True
    mlp_groups: int | None = None
    tau: float = 5.0
    width_bias_init: float = 15.0
    token_bias_init: float = 35.0
    token_reduction: int = TOKEN_REDUCTION
    router_embed_dim: int = 256
    importance: str | Callable[..., Any] = "magnitude"
    timestep_arg: str | None = None
    timestep_scale: float | None = None
    timestep_reverse: bool | None = None
    capture: str = "auto"
    fast_path: bool = True
    slice_cache_mb: float | None = None
    exclude: list[str] = field(default_factory=list)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        # Types and ranges of every field first (an integer field refuses 5.0), then the rest.
        check_fields(self, _RANGES)
        if self.router_embed_dim % 2:
            raise ConfigError(
                "router_embed_dim must be an even integer in [2, 65536]; "
                f"got {self.router_embed_dim}"
            )
        if self.capture not in ("auto", "export", "fx"):
            raise ConfigError(f"capture must be one of auto, export, fx; got {self.capture!r}")
        if isinstance(self.importance, str):
            from dynconvert.analysis.importance import IMPORTANCE

            if self.importance not in IMPORTANCE:
                raise ConfigError(
                    f"unknown importance {self.importance!r}; "
                    f"valid: {', '.join(sorted(IMPORTANCE))}, or pass a callable"
                )
        if self.version > CONFIG_VERSION:
            raise ConfigError(
                f"config version {self.version} is newer than this dynconvert ({CONFIG_VERSION}); "
                "upgrade dynconvert"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConvertConfig:
        """Build from a dict, rejecting unknown keys.

        Example:
            >>> ConvertConfig.from_dict({"tau": 2.0}).tau
            2.0
        """
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ConfigError(
                f"unknown convert config key(s) {', '.join(unknown)}; "
                f"valid keys: {', '.join(sorted(valid))}"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (a callable importance is stored by its qualified name)."""
        d = dataclasses.asdict(self)
        if callable(self.importance):
            d["importance"] = getattr(self.importance, "__qualname__", repr(self.importance))
        return d
