"""Image grids of samples: one PNG, or original and dynamic side by side under their titles,
written atomically."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynconvert.errors import ConfigError


def grid_array(
    images: torch.Tensor,
    nrow: int | None = None,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
    upscale: int = 1,
    padding: int = 1,
) -> np.ndarray:
    """Tile images (N, C, H, W) with C in (1, 3) into one uint8 array (H', W', C).

    ``nrow`` is the number of images per row (default ``ceil(sqrt(N))``); cells are separated by
    ``padding`` grey pixels (after upscaling each image ``upscale`` times, nearest neighbour).

    Example:
        >>> grid_array(torch.zeros(4, 1, 8, 8)).shape
        (19, 19, 1)
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ConfigError(f"images must be a non-empty (N, C, H, W) tensor; got {shape}")
    n, c, h, w = images.shape
    if c not in (1, 3):
        raise ConfigError(
            f"images must have 1 or 3 channels to be saved; got {c} (decode latents with the "
            "model's VAE first, or pass images[:, :1] to view one channel)"
        )
    if isinstance(upscale, bool) or not isinstance(upscale, int) or upscale < 1:
        raise ConfigError(f"upscale must be an integer >= 1; got {upscale!r}")
    low, high = float(value_range[0]), float(value_range[1])
    if not high > low:
        raise ConfigError(f"value_range must be (low, high) with high > low; got {value_range!r}")
    x = images.detach().float().cpu()
    x = ((x - low) / (high - low)).clamp(0.0, 1.0)
    x = (x * 255.0).round().to(torch.uint8)  # (N, C, H, W)
    if upscale > 1:
        x = x.repeat_interleave(upscale, dim=2).repeat_interleave(upscale, dim=3)
        h, w = h * upscale, w * upscale
    cols = nrow if nrow else math.ceil(math.sqrt(n))
    cols = max(1, min(int(cols), n))
    rows = math.ceil(n / cols)
    grid = torch.full(
        (c, rows * (h + padding) + padding, cols * (w + padding) + padding), 128, dtype=torch.uint8
    )
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, top : top + h, left : left + w] = x[i]
    return grid.permute(1, 2, 0).numpy()


def comparison_titles(flops_ratio: float | None = None) -> tuple[str, str]:
    """The titles of a side-by-side grid: ``original`` and ``dynamic`` with its FLOPs ratio.

    Args:
        flops_ratio: The dynamic model's whole-model FLOPs ratio over the calls that drew its
            samples (None: not known, the title says ``dynamic`` alone).

    Example:
        >>> comparison_titles(0.514)
        ('original', 'dynamic, 0.51x FLOPs')
    """
    if flops_ratio is None:
        return "original", "dynamic"
    return "original", f"dynamic, {flops_ratio:.2f}x FLOPs"


def titled(arrays: list[np.ndarray], titles: Sequence[str], size: int = 14) -> list[np.ndarray]:
    """Each array (H, W, C) under a white strip holding its title in black, centred.

    The strips have one height. The text is drawn with Pillow's default font at ``size``
    pixels; a title too wide for its grid breaks after its commas, then gets smaller (down to
    8 pixels, then is cut).

    Example:
        >>> [a.shape for a in titled([np.zeros((19, 80, 1), np.uint8)], ["original"])]
        [(37, 80, 1)]
    """
    from PIL import Image, ImageDraw

    layouts = [_fit(title, array.shape[1], size) for array, title in zip(arrays, titles)]
    height = max([size + 4] + [box[3] - box[1] + 6 for _, _, box in layouts])
    out = []
    for array, (text, font, box) in zip(arrays, layouts):
        strip = Image.new("L", (array.shape[1], height), 255)
        xy = ((strip.width - box[2] - box[0]) // 2, (height - box[3] - box[1]) // 2)
        ImageDraw.Draw(strip).multiline_text(xy, text, fill=0, font=font, align="center")
        head = np.repeat(np.asarray(strip, dtype=np.uint8)[:, :, None], array.shape[2], axis=2)
        out.append(np.concatenate([head, array], axis=0))
    return out


def _fit(title: str, width: int, size: int) -> tuple[str, Any, tuple[int, int, int, int]]:
    """(text, font, bounding box) of the largest layout of ``title`` that fits ``width``."""
    from PIL import Image, ImageDraw, ImageFont

    draw = ImageDraw.Draw(Image.new("L", (1, 1)))
    tries = [(title, px) for px in range(size, 9, -1)]
    tries += [(title.replace(", ", "\n"), px) for px in range(size, 7, -1)]
    for text, px in tries:
        font = ImageFont.load_default(size=px)
        box = draw.multiline_textbbox((0, 0), text, font=font, align="center")
        if box[2] - box[0] <= width - 4:
            break
    return text, font, box


def _write_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a uint8 (H, W, 1 or 3) array as a PNG, atomically (temp file, then rename)."""
    from PIL import Image

    from dynconvert.io.save import atomic_write_bytes

    path = Path(path)
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    os.chmod(path, 0o644)
    return path


def save_grid(
    images: torch.Tensor,
    path: str | os.PathLike,
    nrow: int | None = None,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
    upscale: int = 1,
) -> Path:
    """Save images (N, C, H, W), C in (1, 3), as one PNG grid, written atomically.

    Args:
        images: Samples, e.g. from ``sample`` (pixel space; decode latents first).
        path: The PNG file; parent folders are created.
        nrow: Images per row (default ``ceil(sqrt(N))``).
        value_range: The values mapped to black and white.
        upscale: Integer nearest-neighbour magnification of each image.

    Returns:
        The path written.

    Example:
        >>> import tempfile, torch
        >>> images = torch.rand(10, 1, 16, 16) * 2 - 1
        >>> p = save_grid(images, tempfile.mkdtemp() + "/grid.png", nrow=5)
        >>> p.suffix
        '.png'
    """
    return _write_png(grid_array(images, nrow, value_range=value_range, upscale=upscale), path)


def compare_grid(
    original: torch.Tensor,
    dynamic: torch.Tensor,
    path: str | os.PathLike,
    nrow: int | None = None,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
    upscale: int = 1,
    separator: int = 3,
    titles: tuple[str, str] | None = None,
) -> Path:
    """Save two grids side by side (original left, dynamic right) with a thin white separator.

    Args:
        original: Samples of the original model (N, C, H, W).
        dynamic: Samples of the converted model, same shape (same seeds: same noise per cell).
        path: The PNG file.
        nrow: Images per row of each grid.
        value_range: The values mapped to black and white.
        upscale: Integer magnification of each image.
        separator: Width in pixels of the white bar between the grids.
        titles: Text drawn above each grid, e.g. :func:`comparison_titles` (default: none).

    Returns:
        The path written.

    Example:
        >>> import tempfile, torch
        >>> x = torch.rand(4, 1, 8, 8)
        >>> path = tempfile.mkdtemp() + "/cmp.png"
        >>> compare_grid(x, x, path, value_range=(0, 1), titles=comparison_titles(0.5)).name
        'cmp.png'
    """
    if tuple(original.shape) != tuple(dynamic.shape):
        raise ConfigError(
            f"original {tuple(original.shape)} and dynamic {tuple(dynamic.shape)} samples must "
            "have the same shape (sample both with the same labels and seed)"
        )
    left = grid_array(original, nrow, value_range=value_range, upscale=upscale)
    right = grid_array(dynamic, nrow, value_range=value_range, upscale=upscale)
    if titles is not None:
        left, right = titled([left, right], titles)
    bar = np.full((left.shape[0], max(0, int(separator)), left.shape[2]), 255, dtype=np.uint8)
    return _write_png(np.concatenate([left, bar, right], axis=1), path)
