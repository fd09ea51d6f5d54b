"""The on-disk latents format, and the tools that write it.

A latents folder holds safetensors shards plus ``index.json``::

    out_dir/
      index.json
      shard-00000.safetensors    # tensors: latents (N, C, H, W) float32 or bfloat16/float16,
      shard-00001.safetensors    #          labels (N,) int64 (optional),
      ...                        #          cond (N, L, D), cond_mask (N, L) (optional, text models)

``index.json``::

    {"format": "dynconvert-latents", "version": 1, "count": 1281167,
     "latent_shape": [4, 32, 32], "dtype": "float32", "scaling_factor": 0.18215,
     "has_labels": true, "num_classes": 1000, "classes": ["n01440764", ...],
     "has_cond": false, "cond_shape": null, "image_size": 256, "source": "...", "vae": "...",
     "shards": [{"file": "shard-00000.safetensors", "count": 1024}, ...]}

Latents are stored already multiplied by ``scaling_factor`` (what the diffusion model sees).

Example:
    >>> import tempfile, torch
    >>> from dynconvert.calibration.latents import write_latent_shards, read_index
    >>> d = tempfile.mkdtemp()
    >>> _ = write_latent_shards(d, torch.zeros(5, 4, 2, 2), torch.arange(5), shard_size=2)
    >>> read_index(d)["count"], len(read_index(d)["shards"])
    (5, 3)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dynconvert.errors import DataError
from dynconvert.io.limits import read_json

FORMAT_NAME = "dynconvert-latents"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
SHARD_KEYS = ("latents", "labels", "cond", "cond_mask")


def shard_name(i: int) -> str:
    """File name of shard ``i``: ``shard-00000.safetensors``."""
    return f"shard-{i:05d}.safetensors"


def _fsync(path: Path) -> None:
    """Flush a written file to disk (before it is renamed into place)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class ShardWriter:
    """Appends rows and writes full shards as it goes; ``close()`` writes ``index.json``.

    Args:
        out_dir: The folder to write (created; must not already hold an index).
        shard_size: Rows per shard.
        scaling_factor: The VAE scaling factor the latents were multiplied by (recorded).
        meta: Extra index fields (classes, image_size, vae, source...).

    Example:
        >>> import tempfile
        >>> w = ShardWriter(tempfile.mkdtemp(), shard_size=4)
        >>> w.add(torch.zeros(6, 4, 2, 2), torch.zeros(6, dtype=torch.long))
        >>> w.close()["count"]
        6
    """

    def __init__(
        self,
        out_dir: str | Path,
        shard_size: int = 1024,
        scaling_factor: float | None = None,
        meta: dict[str, Any] | None = None,
    ):
        if shard_size < 1:
            raise DataError(f"shard_size must be >= 1; got {shard_size}")
        self.out = Path(out_dir)
        if (self.out / INDEX_FILE).exists():
            raise DataError(
                f"{self.out} already holds a latents index; choose an empty output folder "
                "or delete the old one"
            )
        self.out.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.scaling_factor = scaling_factor
        self.meta = dict(meta or {})
        self._pending: dict[str, list[torch.Tensor]] = {}
        self._pending_rows = 0
        self._shards: list[dict[str, Any]] = []
        self._count = 0
        self._keys: tuple[str, ...] | None = None
        self._shapes: dict[str, list[int]] = {}
        self._dtype = "float32"

    def add(
        self,
        latents: torch.Tensor,
        labels: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        cond_mask: torch.Tensor | None = None,
    ) -> None:
        """Append rows (the same optional tensors on every call)."""
        rows = {"latents": latents, "labels": labels, "cond": cond, "cond_mask": cond_mask}
        rows = {k: v.detach().cpu() for k, v in rows.items() if v is not None}
        if latents.ndim != 4:
            raise DataError(f"latents must be (N, C, H, W); got shape {tuple(latents.shape)}")
        keys = tuple(sorted(rows))
        if self._keys is None:
            self._keys = keys
            self._shapes = {k: list(v.shape[1:]) for k, v in rows.items()}
            self._dtype = str(latents.dtype).replace("torch.", "")
        elif keys != self._keys:
            raise DataError(
                f"every add() must give the same tensors; first {self._keys}, now {keys}"
            )
        for k, v in rows.items():
            if v.shape[0] != latents.shape[0]:
                raise DataError(f"{k} has {v.shape[0]} rows but latents has {latents.shape[0]}")
            if list(v.shape[1:]) != self._shapes[k]:
                raise DataError(
                    f"{k} rows have shape {tuple(v.shape[1:])}, earlier {self._shapes[k]}"
                )
            if k == "labels":
                v = v.long()
            self._pending.setdefault(k, []).append(v)
        self._pending_rows += latents.shape[0]
        while self._pending_rows >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, rows: int) -> None:
        from safetensors.torch import save_file

        merged = {k: torch.cat(v) for k, v in self._pending.items()}
        tensors = {k: v[:rows].contiguous() for k, v in merged.items()}
        self._pending = {k: [v[rows:]] for k, v in merged.items()}
        self._pending_rows -= rows
        name = shard_name(len(self._shards))
        tmp = self.out / (name + ".tmp")
        save_file(tensors, str(tmp))
        _fsync(tmp)  # on disk before the rename: a crash leaves no torn shard under its name
        os.replace(tmp, self.out / name)
        self._shards.append({"file": name, "count": rows})
        self._count += rows

    def close(self) -> dict[str, Any]:
        """Write the last partial shard and ``index.json``; returns the index."""
        if self._pending_rows:
            self._flush(self._pending_rows)
        if self._count == 0:
            raise DataError("no rows were written; the input was empty")
        index = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "count": self._count,
            "latent_shape": self._shapes["latents"],
            "dtype": self._dtype,
            "scaling_factor": self.scaling_factor,
            "has_labels": "labels" in self._shapes,
            "has_cond": "cond" in self._shapes,
            "cond_shape": self._shapes.get("cond"),
            "shards": self._shards,
        }
        index.update(self.meta)
        tmp = self.out / (INDEX_FILE + ".tmp")
        tmp.write_text(json.dumps(index, indent=1))
        _fsync(tmp)
        os.replace(tmp, self.out / INDEX_FILE)
        return index


def write_latent_shards(
    out_dir: str | Path,
    latents: torch.Tensor,
    labels: torch.Tensor | None = None,
    cond: torch.Tensor | None = None,
    cond_mask: torch.Tensor | None = None,
    *,
    shard_size: int = 1024,
    scaling_factor: float | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write tensors already in memory as a latents folder.

    Args:
        out_dir: The folder to create.
        latents: (N, C, H, W), already scaled.
        labels: (N,) class labels, if any.
        cond: (N, L, D) caption embeddings, if any.
        cond_mask: (N, L) caption masks, if any.
        shard_size: Rows per shard.
        scaling_factor: Recorded in the index.
        meta: Extra index fields.

    Returns:
        The index dict.

    Example:
        >>> import tempfile
        >>> write_latent_shards(tempfile.mkdtemp(), torch.zeros(3, 4, 2, 2))["has_labels"]
        False
    """
    meta = dict(meta or {})
    if labels is not None and "num_classes" not in meta and labels.numel():
        meta["num_classes"] = int(labels.max()) + 1
    writer = ShardWriter(out_dir, shard_size, scaling_factor, meta)
    writer.add(latents, labels, cond, cond_mask)
    return writer.close()


def read_index(folder: str | Path) -> dict[str, Any]:
    """Read and check a latents folder's ``index.json``.

    Raises:
        DataError: The folder or index is missing, unreadable, from another format or a newer
            version, or lists no shards.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"latents folder {root} does not exist; write one with write_latents()")
    path = root / INDEX_FILE
    if not path.is_file():
        shards = sorted(root.glob("shard-*.safetensors"))
        hint = " (shards are there: the writer was interrupted; write it again)" if shards else ""
        raise DataError(f"{root} has no {INDEX_FILE}{hint}; write the folder with write_latents()")
    index = read_json(path, DataError, root=root)  # bounded, no link followed
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
        raise DataError(
            f"{path} is not a {FORMAT_NAME} index; write the folder with write_latents()"
        )
    if int(index.get("version", 0)) > FORMAT_VERSION:
        raise DataError(
            f"{path} has format version {index['version']}, newer than this dynconvert "
            f"({FORMAT_VERSION}); upgrade dynconvert"
        )
    if not index.get("shards") or int(index.get("count", 0)) == 0:
        raise DataError(f"{path} lists no shards (an empty set); write the folder with data")
    return index


def write_latents(
    image_folder: str | Path,
    out_dir: str | Path,
    vae_path: str | Path,
    image_size: int,
    batch_size: int = 32,
    on_progress: Callable[[int, int], None] | None = None,
    *,
    shard_size: int = 1024,
    sample: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Encode an ImageFolder tree with a local AutoencoderKL into a latents folder.

    Args:
        image_folder: One subfolder of images per class (labels by sorted folder name).
        out_dir: The latents folder to create.
        vae_path: A local ``AutoencoderKL`` folder (``save_pretrained`` layout).
        image_size: Images are resized and center-cropped to this side; must be divisible by the
            VAE's downsampling factor.
        batch_size: Images per VAE call.
        on_progress: Called as ``on_progress(done, total)`` after each batch.
        shard_size: Rows per shard.
        sample: Store a posterior sample (as DiT trains) rather than the mean.
        seed: Seed of the posterior samples.
        device: Where the VAE runs.
        dtype: Storage dtype of the latents.

    Returns:
        The index dict.

    Raises:
        DataError: Missing or empty image folder, missing VAE, or a bad image size.

    Example:
        >>> write_latents("imagenet/train", "latents/", "sd-vae-ft-ema", 256)  # doctest: +SKIP
    """
    from dynconvert.calibration.images import (
        encode_images,
        list_image_folder,
        load_image,
        load_vae,
        vae_scaling_factor,
    )

    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1; got {batch_size}")
    paths, labels, classes = list_image_folder(image_folder)
    vae = load_vae(vae_path, device=device)
    factor = 2 ** (len(getattr(vae.config, "block_out_channels", [0])) - 1)
    if image_size < factor or image_size % factor:
        raise DataError(
            f"image_size {image_size} must be a positive multiple of the VAE's downsampling "
            f"factor {factor}"
        )
    meta = {
        "classes": classes,
        "num_classes": len(classes),
        "image_size": image_size,
        "source": str(image_folder),
        "vae": str(vae_path),
    }
    writer = ShardWriter(out_dir, shard_size, vae_scaling_factor(vae), meta)
    generator = torch.Generator(device=next(vae.parameters()).device).manual_seed(seed)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images = torch.stack([load_image(p, image_size) for p in chunk])  # (B, 3, S, S)
        z = encode_images(vae, images, sample=sample, generator=generator).to(dtype)
        writer.add(z, torch.tensor(labels[start : start + batch_size], dtype=torch.long))
        if on_progress is not None:
            on_progress(min(start + batch_size, len(paths)), len(paths))
    return writer.close()
