"""Exponential moving average of the trained weights (what calibration returns for sampling).

Like DiT's ``update_ema``: ``ema = decay * ema + (1 - decay) * param`` after every optimiser step,
over the trained parameters, in float32. The shadow is a dict of tensors rather than a second
model, so a converted model never needs to be deep-copied.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from dynconvert.errors import CheckpointError


class EMA:
    """Shadow copies of named parameters, updated by exponential moving average.

    Args:
        model: The model whose parameters are tracked (not a DDP wrapper).
        decay: The EMA decay (0.9999 in the paper).
        names: Parameter names to track (default: every parameter that requires grad).
        warmup: Use ``min(decay, (1 + n) / (10 + n))`` at the n-th update.

    Example:
        >>> lin = nn.Linear(1, 1, bias=False)
        >>> _ = lin.weight.data.fill_(0.0)
        >>> ema = EMA(lin, decay=0.5)
        >>> _ = lin.weight.data.fill_(1.0)
        >>> ema.update(lin)
        >>> float(ema.shadow["weight"])
        0.5
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        names: Iterable[str] | None = None,
        warmup: bool = False,
    ):
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        params = dict(model.named_parameters())
        if names is None:
            names = [n for n, p in params.items() if p.requires_grad]
        self.shadow: dict[str, torch.Tensor] = {
            n: params[n].detach().float().clone() for n in names
        }

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow toward the model's current parameters by one EMA step."""
        decay = self.current_decay()
        params = dict(model.named_parameters())
        shadows = list(self.shadow.values())
        current = [params[n].detach().float() for n in self.shadow]
        torch._foreach_mul_(shadows, decay)
        torch._foreach_add_(shadows, current, alpha=1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the shadow weights into the model's parameters (in their dtype)."""
        params = dict(model.named_parameters())
        for name, value in self.shadow.items():
            params[name].copy_(value.to(params[name].dtype))

    def to(self, device: torch.device | str) -> EMA:
        """Move the shadow to a device; returns self."""
        self.shadow = {n: v.to(device) for n, v in self.shadow.items()}
        return self

    def state_dict(self) -> dict:
        """The shadow and counters, for a checkpoint."""
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": {n: v.detach().cpu() for n, v in self.shadow.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``; the tracked names must match.

        Raises:
            CheckpointError: The checkpoint tracks other parameters than this model.
        """
        shadow = state["shadow"]
        if set(shadow) != set(self.shadow):
            missing = sorted(set(self.shadow) - set(shadow))[:5]
            extra = sorted(set(shadow) - set(self.shadow))[:5]
            raise CheckpointError(
                f"the checkpoint's EMA does not match this model (missing {missing}, unexpected "
                f"{extra}); resume with the same model, conversion and 'trainable' setting"
            )
        device = next(iter(self.shadow.values())).device if self.shadow else "cpu"
        self.shadow = {n: shadow[n].to(device=device, dtype=torch.float32) for n in self.shadow}
        self.num_updates = int(state["num_updates"])
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
