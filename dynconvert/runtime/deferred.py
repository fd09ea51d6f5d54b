"""What convert leaves to do when it converts a model whose weights are on the meta device.

Analysis, the plan, the module swaps and the routers' shapes need no weights; three things do:
the routers' initial values (drawn from the seed, as convert draws them for a model with
weights), the always-on unit of every width router (chosen by importance from the weights) and
the one-time check of the fast path where analysis asks for it (a forward pass). Convert keeps
them in a :class:`Deferred` on the RouterBank and runs them when the weights arrive: after
``model.load_state_dict(state, assign=True)`` (a post hook), or at the first forward call
after the parameters were set some other way (diffusers' or accelerate's loading into a meta
model), so the model then runs exactly as if it had been converted with its weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dynconvert.errors import CheckpointError


@dataclass
class Deferred:
    """Convert's unfinished work on a model converted on the meta device."""

    seed: int  # of the routers' initial values
    inputs: tuple[tuple, dict] | None  # the example inputs, for the fast-path check
    finish: Callable[[nn.Module], Any]  # convert's: does the work, returns the model's bank
    handle: Any = None  # the model's load_state_dict post hook (removed once finished)


def weights_pending(model: nn.Module, bank: nn.Module) -> list[str]:
    """Names of the model's parameters and saved buffers still on the meta device, the
    routers' aside (they are made when the others arrive).

    Example:
        >>> weights_pending(nn.Linear(2, 2, device="meta"), nn.Module())
        ['weight', 'bias']
    """
    own = {id(t) for t in [*bank.parameters(), *bank.buffers()]}
    return [
        name
        for name, t in model.state_dict(keep_vars=True).items()
        if isinstance(t, torch.Tensor) and t.is_meta and id(t) not in own
    ]


def check_weights(model: nn.Module, bank: nn.Module) -> None:
    """Raise a clear error when a converted model runs before its weights were loaded.

    Example:
        >>> check_weights(nn.Linear(2, 2), nn.Module())  # every weight has data: no error
    """
    pending = weights_pending(model, bank)
    if pending:
        raise CheckpointError(
            f"{type(model).__name__} was converted on the meta device and {len(pending)} of its "
            f"weights ({pending[0]}, ...) have no data yet: load them first, e.g. "
            "model.load_state_dict(state, assign=True); the routers are made then"
        )
