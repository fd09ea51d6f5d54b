"""Data sources for calibration and the resumable, rank-aware batch stream.

A source yields batch dicts ``{"x": (B, C, H, W), "y": (B,), "cond": (B, L, D), "cond_mask":
(B, L)}`` (only "x" is required). Sources: precomputed latent shards (``LatentShards``), an image
folder encoded on the fly through a VAE (``ImageFolderSource``), tensors in memory
(``TensorSource``), a map-style dataset, or any iterable of batch dicts
(``IterableSource``). ``as_source`` picks one for whatever the user passed;
``stream.batch_stream`` orders the rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from dynconvert.errors import DataError
from dynconvert.plugins import Registry

BATCH_KEYS = ("x", "y", "cond", "cond_mask")


def check_batch(batch: Any) -> dict[str, torch.Tensor]:
    """Check a batch dict's keys and shapes.

    Raises:
        DataError: Not a dict, no "x", or tensors of mismatched shapes.

    Example:
        >>> check_batch({"x": torch.zeros(2, 4, 8, 8), "y": torch.tensor([1, 2])})["y"].tolist()
        [1, 2]
    """
    if not isinstance(batch, dict):
        raise DataError(
            "a batch must be a dict with key 'x' (and 'y', 'cond', 'cond_mask'); "
            f"got {type(batch).__name__}"
        )
    x = batch.get("x")
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(f"batch['x'] must be latents (B, C, H, W); got {shape}")
    n = x.shape[0]
    if n == 0:
        raise DataError("got an empty batch (0 rows); check the data source")
    y = batch.get("y")
    if y is not None and (
        not isinstance(y, torch.Tensor) or y.shape != (n,) or y.is_floating_point()
    ):
        raise DataError(
            f"batch['y'] must be integer labels of shape ({n},); got {getattr(y, 'shape', y)}"
        )
    cond = batch.get("cond")
    if cond is not None and (cond.ndim != 3 or cond.shape[0] != n):
        raise DataError(
            f"batch['cond'] must be caption embeddings ({n}, L, D); got {tuple(cond.shape)}"
        )
    mask = batch.get("cond_mask")
    if mask is not None and (cond is None or tuple(mask.shape) != tuple(cond.shape[:2])):
        raise DataError("batch['cond_mask'] must be (B, L), matching batch['cond'] (B, L, D)")
    return batch


class Source:
    """A finite, indexable data source. Subclasses give ``__len__`` and ``get_batch``."""

    def __len__(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def get_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:  # pragma: no cover
        """The rows at ``indices`` as a batch dict (on CPU)."""
        raise NotImplementedError

    def prepare(
        self, batch: dict[str, torch.Tensor], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Turn a fetched batch into model-ready tensors on ``device`` (default: move)."""
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def __getitem__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.get_batch(list(indices))


class TensorSource(Source):
    """Rows of tensors held in memory.

    Example:
        >>> src = TensorSource(torch.zeros(3, 1, 4, 4), torch.tensor([0, 1, 2]))
        >>> src.get_batch([2, 0])["y"].tolist()
        [2, 0]
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        cond_mask: torch.Tensor | None = None,
    ):
        self.tensors = {
            k: v
            for k, v in {"x": x, "y": y, "cond": cond, "cond_mask": cond_mask}.items()
            if v is not None
        }
        if not isinstance(x, torch.Tensor) or x.shape[0] == 0:
            raise DataError("the data set is empty (no rows in 'x'); pass at least one example")
        check_batch(self.tensors)

    def __len__(self) -> int:
        return self.tensors["x"].shape[0]

    def get_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The rows at ``indices`` of every tensor held ("x"; "y", "cond", "cond_mask" if given)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {k: v[idx] for k, v in self.tensors.items()}


class LatentShards(Source):
    """A latents folder (``latents.py`` format), read row by row from memory-mapped shards.

    Example:
        >>> import tempfile
        >>> from dynconvert.calibration.latents import write_latent_shards
        >>> d = tempfile.mkdtemp()
        >>> x = torch.arange(6.).reshape(6, 1, 1, 1)
        >>> _ = write_latent_shards(d, x, torch.arange(6), shard_size=4)
        >>> LatentShards(d).get_batch([5, 0])["x"].flatten().tolist()
        [5.0, 0.0]
    """

    def __init__(self, folder: str | Path):
        from dynconvert.calibration.latents import SHARD_KEYS, read_index

        self.root = Path(folder)
        self.index = read_index(self.root)
        self.starts: list[int] = []
        total = 0
        from safetensors import safe_open

        for shard in self.index["shards"]:
            path = self.root / shard["file"]
            if not path.is_file():
                raise DataError(
                    f"shard {path} listed in index.json is missing; write the folder again"
                )
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
                bad = sorted(keys - set(SHARD_KEYS))
                if "latents" not in keys or bad:
                    raise DataError(
                        f"shard {path} has keys {sorted(keys)}; a shard holds 'latents' and "
                        f"optionally {', '.join(SHARD_KEYS[1:])}; write the folder with "
                        "write_latents()"
                    )
                rows = f.get_slice("latents").get_shape()[0]
            if rows != shard["count"]:
                raise DataError(
                    f"shard {path} has {rows} rows, index.json says {shard['count']}; "
                    "write it again"
                )
            self.starts.append(total)
            total += rows
        if total != self.index["count"]:
            raise DataError(
                f"shards hold {total} rows, index.json says {self.index['count']}; write it again"
            )
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return int(self.index["count"])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}  # file handles do not cross into worker processes
        return state

    def _handle(self, i: int):
        if i not in self._handles:
            from safetensors import safe_open

            self._handles[i] = safe_open(
                str(self.root / self.index["shards"][i]["file"]), framework="pt"
            )
        return self._handles[i]

    def get_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Read the rows at ``indices`` from their shards (global row numbers, any order).

        Returns:
            "x" (from "latents", as float32) and whichever of "y" ("labels"), "cond", "cond_mask"
            the shards hold, on the CPU.
        """
        import bisect

        rows: dict[str, list[torch.Tensor]] = {}
        names = {"latents": "x", "labels": "y", "cond": "cond", "cond_mask": "cond_mask"}
        for i in indices:
            shard = bisect.bisect_right(self.starts, i) - 1
            local = i - self.starts[shard]
            f = self._handle(shard)
            for key in f.keys():
                rows.setdefault(names[key], []).append(f.get_slice(key)[local : local + 1])
        batch = {k: torch.cat(v) for k, v in rows.items()}
        batch["x"] = batch["x"].float()
        return batch


class ImageFolderSource(Source):
    """An ImageFolder tree encoded on the fly through a local VAE (see ``images.py``).

    Loading and resizing happen in ``get_batch`` (in DataLoader workers when ``num_workers`` >
    0); the VAE runs in ``prepare`` on the training device, posterior sampled with the global RNG.
    """

    def __init__(
        self, folder: str | Path, vae_path: str | Path, image_size: int, sample: bool = True
    ):
        from dynconvert.calibration.images import list_image_folder

        self.paths, self.labels, self.classes = list_image_folder(folder)
        if not Path(vae_path).is_dir():
            raise DataError(
                f"VAE folder {vae_path} does not exist; pass a local AutoencoderKL folder"
            )
        self.vae_path, self.image_size, self.sample = Path(vae_path), int(image_size), sample
        self._vae = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_vae"] = None
        return state

    def get_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Load, resize and center-crop images: {"image": (B, 3, S, S) in [-1, 1], "y": (B,)}.

        No VAE here (this may run in a DataLoader worker); ``prepare`` encodes the images.
        """
        from dynconvert.calibration.images import load_image

        images = torch.stack([load_image(self.paths[i], self.image_size) for i in indices])
        return {
            "image": images,
            "y": torch.tensor([self.labels[i] for i in indices], dtype=torch.long),
        }

    def prepare(
        self, batch: dict[str, torch.Tensor], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Encode the images to latents on ``device``: {"x": (B, C, H/f, W/f), "y": (B,)}.

        The VAE is loaded on first use (leaving the global RNG as it was); the posterior is
        sampled with the global RNG when ``sample`` is set, else its mean is used.
        """
        from dynconvert.calibration.images import encode_images, load_vae

        if self._vae is None:
            with torch.random.fork_rng(devices=[]):  # loading must not shift the step's RNG
                self._vae = load_vae(self.vae_path, device=device)
        x = encode_images(self._vae, batch["image"].to(device), sample=self.sample)
        return {"x": x, "y": batch["y"].to(device)}


class DatasetSource(Source):
    """A map-style dataset whose items are dicts (as batches of one) or (x, y) pairs."""

    def __init__(self, dataset: Any):
        self.dataset = dataset
        if len(dataset) == 0:
            raise DataError("the data set is empty; pass at least one example")

    def __len__(self) -> int:
        return len(self.dataset)

    def get_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Stack the items at ``indices``: dicts key by key, (x, y) pairs into "x" and long "y".

        Raises:
            DataError: The items are neither dicts nor (x, y) pairs.
        """
        items = [self.dataset[i] for i in indices]
        if isinstance(items[0], dict):
            return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}
        if isinstance(items[0], (tuple, list)) and len(items[0]) == 2:
            return {
                "x": torch.stack([torch.as_tensor(it[0]) for it in items]),
                "y": torch.as_tensor([int(it[1]) for it in items], dtype=torch.long),
            }
        raise DataError(
            f"dataset items must be dicts or (x, y) pairs; got {type(items[0]).__name__}"
        )


class IterableSource:
    """Any iterable of global batch dicts, used in order (``config.batch_size`` is ignored).

    Under DDP every process reads the same stream and keeps its share of rows. Resuming at step
    k re-iterates and skips k batches, so the iterable must repeat the same batches; it is
    iterated again when it runs out.
    """

    def __init__(self, iterable: Iterable[dict[str, torch.Tensor]]):
        self.iterable = iterable

    def prepare(
        self, batch: dict[str, torch.Tensor], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Move every tensor of the batch to ``device`` (non-blocking), like ``Source.prepare``."""
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


NAMED_SOURCES: dict[str, Callable[[], Source]] = Registry()
"""Data sets known by name (``as_source("digits")``); packages add theirs with
:func:`register_source` (the digits demo adds ``digits``)."""


def register_source(name: str, factory: Callable[[], Source]) -> None:
    """Make ``as_source(name)`` (and a recipe's ``data: name``) build ``factory()``.

    Example:
        >>> register_source("zeros", lambda: TensorSource(torch.zeros(4, 1, 8, 8)))
        >>> len(as_source("zeros"))
        4
    """
    NAMED_SOURCES[name] = factory


def as_source(data: Any) -> Source | IterableSource:
    """Wrap what the user passed as a data source.

    Accepts a ``Source``; a latents folder path; a registered name (:func:`register_source`,
    e.g. "digits"); a dict of tensors with "x";
    a tensor of latents; a map-style dataset; or any iterable of batch dicts.

    Raises:
        DataError: A missing folder, an image folder without a VAE, or an empty set.

    Example:
        >>> len(as_source({"x": torch.zeros(5, 4, 8, 8)}))
        5
    """
    if isinstance(data, (Source, IterableSource)):
        return data
    if isinstance(data, (str, Path)):
        path = Path(data)
        if path.is_dir():
            if (path / "index.json").is_file() or any(path.glob("shard-*.safetensors")):
                return LatentShards(path)
            if any(p.is_dir() for p in path.iterdir()):
                raise DataError(
                    f"{path} looks like an image folder; encode it with write_latents(...) or pass "
                    "ImageFolderSource(folder, vae_path=..., image_size=...)"
                )
            raise DataError(
                f"{path} holds no latents (no index.json or shards); write it with write_latents()"
            )
        if str(data) in NAMED_SOURCES:
            return NAMED_SOURCES[str(data)]()
        names = ", ".join(repr(n) for n in sorted(NAMED_SOURCES))
        raise DataError(
            f"data folder {path} does not exist; pass a latents folder, tensors, or a named data "
            f"set ({names or 'none registered'})"
        )
    if isinstance(data, dict):
        if "x" not in data:
            raise DataError(f"a data dict needs 'x' (latents); got keys {sorted(data)}")
        return TensorSource(data["x"], data.get("y"), data.get("cond"), data.get("cond_mask"))
    if isinstance(data, torch.Tensor):
        return TensorSource(data)
    if (
        hasattr(data, "__getitem__")
        and hasattr(data, "__len__")
        and not isinstance(data, (list, tuple))
    ):
        return DatasetSource(data)
    if isinstance(data, Iterable):
        return IterableSource(data)
    raise DataError(
        f"cannot use {type(data).__name__} as data; see dynconvert.calibration.data.as_source"
    )
