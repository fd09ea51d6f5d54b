"""Gradient checkpointing for calibration (``calibration.gradient_checkpointing``).

A diffusers model checkpoints its own blocks (``enable_gradient_checkpointing()``); any other
converted model has each block of its plan (``plan.blocks``) run under
``torch.utils.checkpoint`` (non-reentrant, so DDP's unused-parameter search and FSDP's hooks
work). Either way the block's checkpointing function is the one the RouterBank wraps
(``runtime/checkpointing.py``), so a recomputed block routes with its own call's masks and
noise, and the gradients are those of the run without checkpointing. Everything is put back
when calibration ends.

Example:
    >>> import dynconvert
    >>> from dynconvert.testing import tiny_dit
    >>> m = dynconvert.convert(tiny_dit(), 0.5)
    >>> with gradient_checkpointing(m, True) as kind:
    ...     kind
    'blocks'
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn

from dynconvert.runtime.checkpointing import FUNC
from dynconvert.runtime.state import get_state

_OWNERS = "_ckpt_owners"  # the bank's cache of the modules that hold a checkpointing function


def _checkpointed_forward(block: nn.Module, forward) -> object:
    """``block.forward`` that runs through the block's checkpointing function in training."""

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if block.training and torch.is_grad_enabled():
            return block.__dict__[FUNC](forward, *args, **kwargs)
        return forward(*args, **kwargs)

    return run


@contextlib.contextmanager
def gradient_checkpointing(model: nn.Module, enabled: bool) -> Iterator[str | None]:
    """Checkpoint the converted model's blocks while the block runs; yields how.

    Yields:
        None (off), "diffusers" (the model's own) or "blocks" (each block of the plan).
    """
    if not enabled:
        yield None
        return
    bank = get_state(model)
    own = getattr(model, "_supports_gradient_checkpointing", False) and hasattr(
        model, "enable_gradient_checkpointing"
    )
    bank.__dict__.pop(_OWNERS, None)  # the bank looks for checkpointing modules again
    if own:
        was = bool(getattr(model, "is_gradient_checkpointing", False))
        model.enable_gradient_checkpointing()
        try:
            yield "diffusers"
        finally:
            if not was:
                model.disable_gradient_checkpointing()
            bank.__dict__.pop(_OWNERS, None)
        return
    blocks = [model.get_submodule(name) for name in bank.plan.blocks if name]
    checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    saved = [block.__dict__.get("forward") for block in blocks]
    for block in blocks:
        block.__dict__[FUNC] = checkpoint
        block.forward = _checkpointed_forward(block, block.forward)
    try:
        yield "blocks"
    finally:
        for block, forward in zip(blocks, saved):
            block.__dict__.pop(FUNC, None)
            block.__dict__.pop("forward", None)
            if forward is not None:
                block.forward = forward
        bank.__dict__.pop(_OWNERS, None)
