"""ConvertConfig: the settings of convert (routers, groups, timestep handling)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dynconvert.errors import ConfigError

CONFIG_VERSION = 1
TIMESTEP_NAMES = ("timestep", "timesteps", "t", "time", "sigma", "sigmas")


@dataclass
class ConvertConfig:
    """How convert builds the routers. Defaults follow the paper (method.md).

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
    token_reduction: int = 16
    router_embed_dim: int = 256
    importance: str | Callable[..., Any] = "magnitude"
    timestep_arg: str | None = None
    timestep_scale: float = 1.0
    timestep_reverse: bool = False
    capture: str = "auto"
    fast_path: bool = True
    slice_cache_mb: float | None = None  # None: 20% of the model's parameter bytes
    exclude: list[str] = field(default_factory=list)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.mlp_groups is not None and self.mlp_groups < 1:
            raise ConfigError(f"mlp_groups must be a positive integer or None, got {self.mlp_groups}")
        if self.tau <= 0:
            raise ConfigError(f"tau must be > 0, got {self.tau}")
        if self.token_reduction < 1:
            raise ConfigError(f"token_reduction must be >= 1, got {self.token_reduction}")
        if self.router_embed_dim < 2 or self.router_embed_dim % 2:
            raise ConfigError(f"router_embed_dim must be an even integer >= 2, got {self.router_embed_dim}")
        if self.capture not in ("auto", "export", "fx"):
            raise ConfigError(f"capture must be one of auto, export, fx; got {self.capture!r}")
        if self.timestep_scale <= 0:
            raise ConfigError(f"timestep_scale must be > 0, got {self.timestep_scale}")
        if isinstance(self.importance, str):
            from dynconvert.importance import IMPORTANCE

            if self.importance not in IMPORTANCE:
                raise ConfigError(
                    f"unknown importance {self.importance!r}; valid: {', '.join(sorted(IMPORTANCE))}, "
                    "or pass a callable"
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
                f"unknown convert config key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(valid))}"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (a callable importance is stored by its qualified name)."""
        d = dataclasses.asdict(self)
        if callable(self.importance):
            d["importance"] = getattr(self.importance, "__qualname__", repr(self.importance))
        return d
