"""The resumable, rank-aware order in which calibration reads its data.

Data order is a pure function of (seed, step): the index stream is the concatenation of one
seeded permutation per epoch, global step k reads positions [k B, (k + 1) B), and process r of W
takes its contiguous share of B / W. Resuming at step k therefore needs nothing but k.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from dynconvert.calibration.data import IterableSource, Source, check_batch
from dynconvert.errors import DataError


def _rows(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    return {k: (v[start:stop] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919 + 12_345) % (2**63))
    return torch.randperm(n, generator=g)


class StepIndices:
    """Per-step index lists of one process: step k reads the global positions
    [k B + r b, k B + (r+1) b).

    Example:
        >>> plan = StepIndices(n=10, global_batch=4, seed=0, rank=1, world=2, start=0, stop=3)
        >>> [len(ix) for ix in plan]
        [2, 2, 2]
    """

    def __init__(
        self, n: int, global_batch: int, seed: int, rank: int, world: int, start: int, stop: int
    ):
        self.n, self.b, self.seed = n, global_batch // world, seed
        self.global_batch, self.rank, self.start, self.stop = global_batch, rank, start, stop
        self._perm: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def indices(self, step: int) -> list[int]:
        """The dataset indices this process reads at ``step``."""
        out = []
        first = step * self.global_batch + self.rank * self.b
        for p in range(first, first + self.b):
            epoch, offset = divmod(p, self.n)
            if self._perm is None or self._perm[0] != epoch:
                self._perm = (epoch, _permutation(self.n, self.seed, epoch))
            out.append(int(self._perm[1][offset]))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            yield self.indices(step)


def _identity(x: Any) -> Any:
    return x


def batch_stream(
    source: Source | IterableSource,
    global_batch: int,
    *,
    seed: int,
    rank: int = 0,
    world: int = 1,
    start: int = 0,
    stop: int,
    num_workers: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """The CPU batches of one process for steps ``start .. stop - 1``, in a resumable order.

    Args:
        source: The data source.
        global_batch: Rows per step over all processes (a multiple of ``world``).
        seed: Seed of the epoch permutations.
        rank: This process's rank.
        world: Number of processes.
        start: First step (the resume point).
        stop: One past the last step.
        num_workers: DataLoader workers (map-style sources).

    Yields:
        Batch dicts (this process's rows), before ``source.prepare``.

    Example:
        >>> from dynconvert.calibration.data import TensorSource
        >>> src = TensorSource(torch.arange(8.).reshape(8, 1, 1, 1))
        >>> full = [b["x"].flatten().tolist() for b in batch_stream(src, 4, seed=0, stop=3)]
        >>> later = batch_stream(src, 4, seed=0, start=1, stop=3)
        >>> tail = [b["x"].flatten().tolist() for b in later]
        >>> full[1:] == tail
        True
    """
    if global_batch % world:
        raise DataError(
            f"batch_size {global_batch} must be divisible by the number of processes {world}"
        )
    if isinstance(source, IterableSource):
        yield from _iterable_stream(source, rank, world, start, stop)
        return
    if len(source) == 0:
        raise DataError("the data set is empty; pass at least one example")
    plan = StepIndices(len(source), global_batch, seed, rank, world, start, stop)
    loader = torch.utils.data.DataLoader(
        source,
        batch_size=None,
        sampler=plan,
        num_workers=num_workers,
        collate_fn=_identity,
        # Its own generator: the loader's base seed must not come from (and shift) the global
        # RNG, which the training step seeds and uses.
        generator=torch.Generator().manual_seed(seed + start),
    )
    yield from loader


def _iterable_stream(
    source: IterableSource, rank: int, world: int, start: int, stop: int
) -> Iterator[dict[str, torch.Tensor]]:
    step, seen = 0, 0
    while step < stop:
        produced = False
        for batch in source.iterable:
            produced = True
            if step >= start:
                batch = check_batch(batch)
                n = batch["x"].shape[0]
                if n % world:
                    raise DataError(f"a batch of {n} rows cannot be split over {world} processes")
                yield _rows(batch, rank * n // world, (rank + 1) * n // world)
            step += 1
            seen += 1
            if step >= stop:
                return
        if not produced:
            raise DataError(
                f"the data iterable ran out after {seen} batches and gives nothing when iterated "
                "again; pass a re-iterable (a list, a DataLoader) or enough batches for every step"
            )
