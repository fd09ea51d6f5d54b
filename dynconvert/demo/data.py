"""scikit-learn's 8x8 digits as diffusion training and calibration data (the demos' data sets).

Two data sets, registered by name when ``dynconvert.demo`` is imported (``as_source("digits")``,
a recipe's ``data: translated``); scikit-learn is needed only here:

- ``digits``: the digits scaled to [-1, 1] and upsampled to 16x16: every pixel is the digit's.
- ``translated``: each digit upsampled to 16x16 and pasted at a random (seeded) position on an
  empty 32x32 canvas: about three quarters of every image is background, the spatial redundancy
  that token routing is meant to find (the classic test of spatial attention).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from dynconvert.calibration.data import TensorSource
from dynconvert.errors import ConfigError

CANVAS = 32
"""Side of the translated digits' canvas."""

GLYPH = 16
"""Side of a digit on the canvas (the 8x8 digit upsampled)."""

BACKGROUND = -1.0
"""Pixel value of the empty canvas (the digits' own background in [-1, 1])."""


@functools.cache
def _load() -> tuple:
    """scikit-learn's digits as (pixels (1797, 64) in 0..16, labels), read once per process."""
    from sklearn.datasets import load_digits  # only the demos need scikit-learn

    data = load_digits()
    data.data.setflags(write=False)  # shared by every caller
    return data.data, data.target


def digits(image_size: int = 16) -> TensorSource:
    """scikit-learn's 8x8 digits (1797 images, labels 0..9) scaled to [-1, 1] and resized.

    Args:
        image_size: Side of the output images (bilinear upsampling), 1 channel.

    Returns:
        A ``TensorSource`` with x (1797, 1, image_size, image_size) and y (1797,).

    Example:
        >>> src = digits(16)
        >>> len(src), tuple(src.get_batch([0])["x"].shape)
        (1797, (1, 1, 16, 16))
    """
    pixels, labels = _load()
    x = torch.tensor(pixels, dtype=torch.float32).reshape(-1, 1, 8, 8)  # (1797, 1, 8, 8), 0..16
    x = x / 16.0 * 2.0 - 1.0  # [-1, 1], the range the DiT was trained on
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return TensorSource(x.clamp(-1.0, 1.0), torch.tensor(labels, dtype=torch.long))


def place(
    glyphs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, canvas: int
) -> torch.Tensor:
    """Paste glyphs (N, C, g, g) on empty canvases (N, C, canvas, canvas), glyph i with its top-left
    corner at (rows[i], cols[i]).

    Example:
        >>> out = place(torch.ones(1, 1, 2, 2), torch.tensor([1]), torch.tensor([0]), 4)
        >>> out[0, 0].tolist()[1]
        [1.0, 1.0, -1.0, -1.0]
    """
    n, c, g, _ = glyphs.shape
    if g > canvas or int(rows.max()) + g > canvas or int(cols.max()) + g > canvas:
        raise ConfigError(
            f"a {g}x{g} glyph at those positions does not fit a {canvas}x{canvas} canvas"
        )
    ar = torch.arange(g)
    r = (rows[:, None] + ar).reshape(n, 1, g, 1).expand(n, c, g, g)  # canvas row of each pixel
    k = (cols[:, None] + ar).reshape(n, 1, 1, g).expand(n, c, g, g)  # canvas column
    flat = (r * canvas + k).reshape(n, c, -1)  # (N, C, g * g)
    out = torch.full((n, c, canvas * canvas), BACKGROUND, dtype=glyphs.dtype)
    out.scatter_(2, flat, glyphs.reshape(n, c, -1))
    return out.reshape(n, c, canvas, canvas)


def translated(copies: int = 1, seed: int = 0, canvas: int = CANVAS) -> TensorSource:
    """The digits at 16x16, each pasted at a random position on an empty ``canvas`` square.

    Row i (of ``copies * 1797``) is digit ``i % 1797`` at a position drawn uniformly (every
    position where the whole 16x16 digit fits) from a generator seeded with ``seed``.

    Args:
        copies: Placements of every digit (1: the reference set; more for training).
        seed: Seed of the positions.
        canvas: Side of the canvas (at least 16).

    Returns:
        A ``TensorSource`` with x (copies * 1797, 1, canvas, canvas) in [-1, 1] and y.

    Example:
        >>> src = translated()
        >>> x = src.tensors["x"]
        >>> tuple(x.shape), float((x > -1).float().mean()) < 0.3
        ((1797, 1, 32, 32), True)
    """
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ConfigError(f"copies must be an integer >= 1; got {copies!r}")
    if canvas < GLYPH:
        raise ConfigError(f"canvas must be at least {GLYPH} pixels; got {canvas}")
    base = digits(GLYPH).tensors
    glyphs, labels = base["x"].repeat(copies, 1, 1, 1), base["y"].repeat(copies)
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, canvas - GLYPH + 1, (len(glyphs),), generator=g)
    cols = torch.randint(0, canvas - GLYPH + 1, (len(glyphs),), generator=g)
    return TensorSource(place(glyphs, rows, cols, canvas), labels)
