"""Gradient accumulation: one optimiser step over several micro-batches of the step's rows.

Each process noises its share of the global batch once (same timesteps and noise as without
accumulation), then splits it into ``grad_accum_steps`` equal micro-batches that run forward and
backward one after the other, each loss scaled by ``1 / grad_accum_steps``. The logged terms are
the means over the micro-batches. The FLOPs term is computed per micro-batch, as it is per
process under DDP. All processes agree, before each backward, whether the micro-batch's loss is
finite: a non-finite one stops the step (no backward for it or the rest; the loop skips the
optimiser step and clears the gradients). Everything random in a step still depends only on
(seed, rank, step), so a resumed run repeats an uninterrupted one.

Example:
    >>> import torch
    >>> parts = split_rows({"x": torch.arange(4), "scale": torch.tensor(2.0)}, 2)
    >>> [p["x"].tolist() for p in parts], float(parts[1]["scale"])
    ([[0, 1], [2, 3]], 2.0)
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import torch


def split_rows(obj: Any, parts: int, rows: int | None = None) -> list[Any]:
    """Split every tensor of ``obj`` whose first dimension is the batch into ``parts`` chunks.

    Dicts, lists, tuples and dataclasses are split member by member; tensors of another first
    size (a scalar timestep, a shared table) and other values are repeated in every part.

    Args:
        obj: A tensor, a container of tensors, or a dataclass (``NoisyBatch``).
        parts: Number of equal parts.
        rows: The batch size (default: the first dimension of the first tensor found).
    """
    if rows is None:
        rows = _first_rows(obj)
    if isinstance(obj, torch.Tensor):
        if obj.dim() and obj.shape[0] == rows and rows is not None:
            return list(obj.chunk(parts))
        return [obj] * parts
    if isinstance(obj, dict):
        split = {k: split_rows(v, parts, rows) for k, v in obj.items()}
        return [{k: split[k][i] for k in obj} for i in range(parts)]
    if isinstance(obj, (list, tuple)):
        split = [split_rows(v, parts, rows) for v in obj]
        return [type(obj)(s[i] for s in split) for i in range(parts)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        names = [f.name for f in dataclasses.fields(obj)]
        split = {n: split_rows(getattr(obj, n), parts, rows) for n in names}
        return [dataclasses.replace(obj, **{n: split[n][i] for n in names}) for i in range(parts)]
    return [obj] * parts


def _first_rows(obj: Any) -> int | None:
    if isinstance(obj, torch.Tensor):
        return obj.shape[0] if obj.dim() else None
    values = obj.values() if isinstance(obj, dict) else obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        values = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    if isinstance(values, (list, tuple)) or isinstance(obj, dict) or dataclasses.is_dataclass(obj):
        for v in values:
            rows = _first_rows(v)
            if rows is not None:
                return rows
    return None


def forward_backward(
    terms_of: Callable[..., dict[str, torch.Tensor]],
    accelerator: Any,
    model: Any,
    batch: dict[str, torch.Tensor],
    x0: torch.Tensor,
    noisy: Any,
    parts: int,
    after_each: Callable[[int], None] | None = None,
    **kwargs: Any,
) -> tuple[dict[str, torch.Tensor], bool]:
    """Run the step's micro-batches forward and backward; the mean terms and whether one was
    non-finite (then no backward ran for it or for the ones after it).

    Args:
        terms_of: ``terms_of(batch, x0, noisy, **kwargs)`` returns the terms of one micro-batch
            ("loss" is what is back-propagated).
        accelerator: The ``accelerate.Accelerator`` (backward, reduction, DDP's ``no_sync``).
        model: The prepared model (``no_sync`` between DDP micro-batches).
        batch, x0, noisy: This process's rows of the step, noised once.
        parts: ``grad_accum_steps``; it must divide the rows.
        after_each: Called with the micro-batches done after each backward (the progress of
            a step that takes minutes: ``progress.MicroBatchReport``), or None.
        **kwargs: Passed to ``terms_of`` (``lam``, ``step``).

    Returns:
        ``(terms, nonfinite)``: each term's mean over the micro-batches that ran (detached),
        and whether a loss was non-finite on any process.
    """
    world = accelerator.num_processes
    if x0.shape[0] % parts:
        raise ValueError(f"{x0.shape[0]} rows cannot be split into {parts} micro-batches")
    chunks = zip(split_rows(batch, parts), x0.chunk(parts), split_rows(noisy, parts), strict=True)
    sums: dict[str, torch.Tensor] = {}
    ran = 0
    for i, (b, x, n) in enumerate(chunks):
        last = i == parts - 1
        sync = _no_sync(accelerator, model) if not last else contextlib.nullcontext()
        with sync:
            terms = terms_of(b, x, n, **kwargs)
            bad = (~torch.isfinite(terms["loss"].detach())).float().reshape(1)
            if world > 1:
                bad = accelerator.reduce(bad, reduction="sum")
            if float(bad) > 0:
                terms = {k: v.detach() for k, v in terms.items()}
                _add(sums, terms)
                return _mean(sums, ran + 1), True
            accelerator.backward(terms["loss"] / parts if parts > 1 else terms["loss"])
        _add(sums, {k: v.detach() for k, v in terms.items()})
        ran += 1
        if after_each is not None:
            after_each(ran)
    return _mean(sums, ran), False


def _no_sync(accelerator: Any, model: Any) -> Any:
    """DDP's ``no_sync`` (gradients are all-reduced once, after the last micro-batch); FSDP and a
    single process reduce as they go."""
    from accelerate.utils import DistributedType

    if accelerator.num_processes > 1 and accelerator.distributed_type != DistributedType.FSDP:
        return accelerator.no_sync(model)
    return contextlib.nullcontext()


def _add(sums: dict[str, torch.Tensor], terms: dict[str, torch.Tensor]) -> None:
    for k, v in terms.items():
        sums[k] = sums[k] + v.float() if k in sums else v.float()


def _mean(sums: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    return {k: v / count for k, v in sums.items()}
