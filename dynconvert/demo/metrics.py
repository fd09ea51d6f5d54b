"""Quality metrics of the demos: a small digits classifier's accuracy on samples, and the
Frechet distance between two sets of images in the classifier's penultimate feature space.

Each demo (``digits``, ``translated``) has its own classifier (``dynconvert.demo.classifier``: a
small CNN trained on that demo's images with a fixed split and seed, shipped as
``dynconvert/assets/<demo>_classifier.safetensors``); every function here takes the demo as
``benchmark`` (default ``"digits"``).

The Frechet distance is the FID formula on these 64-dimensional features (not Inception
features, so its values are not comparable to published FIDs):
``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)``, where the last trace
equals ``tr((S_a S_b)^1/2)`` and is computed from two symmetric eigen decompositions (negative
round-off eigenvalues clipped to 0), in float64.

Example:
    >>> from dynconvert.demo.metrics import classifier_accuracy, real_digits
    >>> x, y = real_digits()
    >>> classifier_accuracy(x[:200], y[:200]) > 0.9
    True
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dynconvert.demo.classifier import (  # noqa: F401 - re-exported, the metrics' classifier
    DigitsClassifier,
    digits_split,
    load_classifier,
    real_digits,
    save_classifier,
    train_classifier,
)
from dynconvert.demo.digits import DIGITS
from dynconvert.demo.models import demo_spec
from dynconvert.errors import ConfigError

CLASSIFIER_WEIGHTS = DIGITS.classifier
"""The shipped digits classifier weights (fp16); ``demo_spec(name).classifier`` for any demo."""


def _prepare(images: torch.Tensor, size: int) -> torch.Tensor:
    """Check images and bring them to (N, 1, size, size) float32 in [-1, 1] on the CPU."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 1:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ConfigError(
            f"digits metrics take 1-channel images (N, 1, H, W) in [-1, 1]; got {shape}"
        )
    x = images.detach().float().cpu()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(-1.0, 1.0)


@torch.no_grad()
def features(
    images: torch.Tensor, batch_size: int = 1024, benchmark: str = "digits"
) -> torch.Tensor:
    """The classifier's penultimate features (N, 64) of digit images (N, 1, H, W) in [-1, 1]
    (resized to the demo's image size).

    Example:
        >>> features(torch.zeros(3, 1, 16, 16)).shape
        torch.Size([3, 64])
    """
    x = _prepare(images, demo_spec(benchmark).image_size)
    model = load_classifier(benchmark)
    return torch.cat([model.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def predict(images: torch.Tensor, benchmark: str = "digits") -> torch.Tensor:
    """The classifier's predicted class (N,) of digit images (N, 1, H, W) in [-1, 1].

    Example:
        >>> x, y = real_digits()
        >>> predict(x[:3]).shape
        torch.Size([3])
    """
    return load_classifier(benchmark).head(features(images, benchmark=benchmark)).argmax(1)


def classifier_accuracy(
    images: torch.Tensor, labels: torch.Tensor, benchmark: str = "digits"
) -> float:
    """The fraction of images the classifier labels as ``labels``.

    Args:
        images: (N, 1, H, W) in [-1, 1] (other sizes are resized to the demo's; values clamped).
        labels: (N,) intended classes 0..9.
        benchmark: The demo whose classifier judges them (``digits``, ``translated``).

    Returns:
        Accuracy in [0, 1].

    Example:
        >>> x, y = real_digits()
        >>> classifier_accuracy(x[:100], y[:100]) > 0.9
        True
    """
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    if labels.shape[0] != images.shape[0]:
        raise ConfigError(
            f"got {images.shape[0]} images but {labels.shape[0]} labels; pass one label per image"
        )
    return float((predict(images, benchmark) == labels).float().mean())


def _moments(feats: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = feats.double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigen decomposition."""
    w, v = np.linalg.eigh((m + m.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_from_features(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D).

    Example:
        >>> f = torch.randn(100, 8, generator=torch.Generator().manual_seed(0))
        >>> round(frechet_from_features(f, f), 6), frechet_from_features(f, f + 1.0) > 7.9
        (0.0, True)
    """
    if feats_a.shape[0] < 2 or feats_b.shape[0] < 2:
        raise ConfigError("the Frechet distance needs at least 2 images in each set")
    mu_a, cov_a = _moments(feats_a)
    mu_b, cov_b = _moments(feats_b)
    root_a = _sqrt_psd(cov_a)
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)  # eigenvalues of (S_a S_b), all >= 0
    tr_cross = float(np.sqrt(np.clip(cross, 0.0, None)).sum())
    diff = mu_a - mu_b
    value = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_cross)
    return max(value, 0.0)


def frechet_distance(
    images_a: torch.Tensor, images_b: torch.Tensor, benchmark: str = "digits"
) -> float:
    """Frechet distance between two image sets in the classifier's 64-d feature space.

    Lower is closer; 0 for identical sets. Like FID, it is biased upwards for small sets, so
    compare values computed with the same numbers of images.

    Args:
        images_a: (N_a, 1, H, W) in [-1, 1], N_a >= 2.
        images_b: (N_b, 1, H, W) in [-1, 1], N_b >= 2.
        benchmark: The demo whose classifier's features to compare in.

    Returns:
        The distance (float, >= 0).

    Example:
        >>> x, _ = real_digits()
        >>> frechet_distance(x[:300], x[:300]) < 1e-6
        True
    """
    fa, fb = features(images_a, benchmark=benchmark), features(images_b, benchmark=benchmark)
    return frechet_from_features(fa, fb)
