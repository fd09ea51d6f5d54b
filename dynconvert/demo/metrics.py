"""Quality metrics of the digits demo: a small digits classifier, its accuracy on samples, and the
Frechet distance between two sets of images in the classifier's penultimate feature space.

The classifier is a two-convolution CNN trained on scikit-learn's digits at 16x16 (the split and
the seed are fixed); its weights ship as ``dynconvert/assets/digits_classifier.safetensors``
(about 80 KB, reproduced by ``train_classifier()`` in a few seconds on a CPU). When the file is
missing it is trained at first use and kept in memory.

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

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dynconvert.errors import ConfigError

CLASSIFIER_WEIGHTS = (
    Path(__file__).resolve().parents[1] / "assets" / "digits_classifier.safetensors"
)
"""The shipped classifier weights (fp16)."""

IMAGE_SIZE = 16
FEATURE_DIM = 64
TEST_FRACTION = 0.2

_CACHE: dict[str, object] = {}


class DigitsClassifier(nn.Module):
    """Two 3x3 conv + max-pool stages, a 64-d feature layer, and a linear head over 10 classes."""

    def __init__(self, width: int = 16, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, 64) of images (N, 1, 16, 16) in [-1, 1]."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (N, W, 8, 8)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (N, 2W, 4, 4)
        return F.relu(self.fc(x.flatten(1)))  # (N, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 1, 16, 16) in [-1, 1] -> class logits (N, 10)."""
        return self.head(self.features(x))  # (N, 10)


def real_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 scikit-learn digits as ``(x (N, 1, 16, 16) in [-1, 1], y (N,))``, cached.

    The same images as ``dynconvert.demo.data.digits(16)``, the data the digits DiT learned.

    Example:
        >>> x, y = real_digits()
        >>> tuple(x.shape), int(y.max())
        ((1797, 1, 16, 16), 9)
    """
    if "real" not in _CACHE:
        from dynconvert.demo.data import digits

        src = digits(IMAGE_SIZE)
        _CACHE["real"] = (src.tensors["x"], src.tensors["y"])
    return _CACHE["real"]  # type: ignore[return-value]


def digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed train / held-out indices into ``real_digits()`` (80% / 20%, permuted by ``seed``).

    Example:
        >>> train, test = digits_split()
        >>> len(train), len(test)
        (1438, 359)
    """
    n = real_digits()[0].shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(n * TEST_FRACTION)
    return order[n_test:], order[:n_test]


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts by up to one pixel, contrast jitter and a little noise (robust to samples)."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)  # (N, 1, 18, 18)
    dx = torch.randint(0, 3, (n,), generator=g)
    dy = torch.randint(0, 3, (n,), generator=g)
    out = torch.stack(
        [padded[i, :, dy[i] : dy[i] + IMAGE_SIZE, dx[i] : dx[i] + IMAGE_SIZE] for i in range(n)]
    )  # (N, 1, 16, 16)
    gain = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=g)
    out = (out + 1.0) * gain - 1.0
    out = out + 0.1 * torch.rand(n, 1, 1, 1, generator=g) * torch.randn(out.shape, generator=g)
    return out.clamp(-1.0, 1.0)


def train_classifier(
    seed: int = 0,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 2e-3,
    on_epoch: Callable[[int, float], None] | None = None,
) -> DigitsClassifier:
    """Train the digits classifier on the training split of ``digits_split()``.

    Args:
        seed: Seed of the initial weights, the batch order and the augmentation.
        epochs: Passes over the training split.
        batch_size: Images per step.
        lr: Adam learning rate (cosine-decayed to 0).
        on_epoch: Called with ``(epoch, held-out accuracy)`` after every epoch.

    Returns:
        The trained classifier, in eval mode, on the CPU.

    Example:
        >>> clf = train_classifier(epochs=1)  # doctest: +SKIP
    """
    x, y = real_digits()
    train, test = digits_split()
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = (len(train) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    for epoch in range(epochs):
        model.train()
        order = train[torch.randperm(len(train), generator=g)]
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(model(_augment(x[idx], g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if on_epoch is not None:
            model.eval()
            with torch.no_grad():
                acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
            on_epoch(epoch + 1, acc)
    return model.eval()


def save_classifier(model: DigitsClassifier, path: str | os.PathLike = CLASSIFIER_WEIGHTS) -> Path:
    """Write the classifier's weights as fp16 safetensors, atomically (temp file, then rename).

    Example:
        >>> import tempfile
        >>> save_classifier(DigitsClassifier(), tempfile.mkdtemp() + "/clf.safetensors").suffix
        '.safetensors'
    """
    from dynconvert.io.save import atomic_save_tensors

    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    return atomic_save_tensors(state, path)


def load_classifier() -> DigitsClassifier:
    """The digits classifier (shipped weights, or trained now if missing), cached in memory.

    Example:
        >>> load_classifier().head.out_features
        10
    """
    if "classifier" not in _CACHE:
        if CLASSIFIER_WEIGHTS.is_file():
            from safetensors.torch import load_file

            model = DigitsClassifier()
            state = load_file(str(CLASSIFIER_WEIGHTS))
            model.load_state_dict({k: v.float() for k, v in state.items()})
            model.eval()
        else:
            model = train_classifier()
        for p in model.parameters():
            p.requires_grad_(False)
        _CACHE["classifier"] = model
    return _CACHE["classifier"]  # type: ignore[return-value]


def _prepare(images: torch.Tensor) -> torch.Tensor:
    """Check images and bring them to (N, 1, 16, 16) float32 in [-1, 1] on the CPU."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 1:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ConfigError(
            f"digits metrics take 1-channel images (N, 1, H, W) in [-1, 1]; got {shape}"
        )
    x = images.detach().float().cpu()
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x.clamp(-1.0, 1.0)


@torch.no_grad()
def features(images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The classifier's penultimate features (N, 64) of digit images (N, 1, H, W) in [-1, 1].

    Example:
        >>> features(torch.zeros(3, 1, 16, 16)).shape
        torch.Size([3, 64])
    """
    x = _prepare(images)
    model = load_classifier()
    return torch.cat([model.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def predict(images: torch.Tensor) -> torch.Tensor:
    """The classifier's predicted class (N,) of digit images (N, 1, H, W) in [-1, 1].

    Example:
        >>> x, y = real_digits()
        >>> predict(x[:3]).shape
        torch.Size([3])
    """
    return load_classifier().head(features(images)).argmax(1)


def classifier_accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of images the classifier labels as ``labels``.

    Args:
        images: (N, 1, H, W) in [-1, 1] (other sizes are resized to 16x16; values clamped).
        labels: (N,) intended classes 0..9.

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
    return float((predict(images) == labels).float().mean())


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


def frechet_distance(images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """Frechet distance between two image sets in the classifier's 64-d feature space.

    Lower is closer; 0 for identical sets. Like FID, it is biased upwards for small sets, so
    compare values computed with the same numbers of images.

    Args:
        images_a: (N_a, 1, H, W) in [-1, 1], N_a >= 2.
        images_b: (N_b, 1, H, W) in [-1, 1], N_b >= 2.

    Returns:
        The distance (float, >= 0).

    Example:
        >>> x, _ = real_digits()
        >>> frechet_distance(x[:300], x[:300]) < 1e-6
        True
    """
    return frechet_from_features(features(images_a), features(images_b))
