"""Seeds and RNG states of calibration: every step seeded from (seed, rank, step), and the
states a checkpoint keeps so that a resumed run draws what an uninterrupted one would."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU, and CUDA where present).

    Example:
        >>> state = capture_rng()
        >>> a = torch.rand(1); restore_rng(state); bool(torch.rand(1) == a)
        True
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore states captured by ``capture_rng`` (CUDA only when present on both sides)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) for one step of one process.

    Every random draw of a step (timesteps, noise, label dropout, router Gumbel noise, dropout)
    then depends only on (seed, rank, step), so a resumed run repeats an uninterrupted one.

    Example:
        >>> seed_step(0, 0, 5); a = torch.rand(1); seed_step(0, 0, 5); bool(torch.rand(1) == a)
        True
    """
    mixed = (seed * 1_000_003 + rank) * 1_000_033 + step
    mixed = (mixed * 6364136223846793005 + 1442695040888963407) % (2**63)
    torch.manual_seed(mixed)
    random.seed(mixed)
    np.random.seed(mixed % (2**32))
