"""The demos' metrics classifier: a small CNN per demo, its data split, training and weights.

One architecture for both demos: 3x3 conv + max-pool stages down to 4x4 (two stages for the
16x16 digits, three for the 32x32 translated digits), a 64-d feature layer and a linear head over
10 classes. The split is by digit: 80% of the 1797 digits train it, the other 20% (at the
reference positions, for the translated canvas) measure its held-out accuracy. Its weights ship
as ``dynconvert/assets/<demo>_classifier.safetensors`` (reproduced by ``train_classifier`` in
seconds to minutes on a CPU); when the file is missing it is trained at first use and kept in
memory.

Example:
    >>> x, y = real_digits("translated")
    >>> tuple(x.shape)
    (1797, 1, 32, 32)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynconvert.demo.models import demo_spec

FEATURE_DIM = 64
TEST_FRACTION = 0.2

_CACHE: dict[tuple[str, str], object] = {}


class DigitsClassifier(nn.Module):
    """``stages`` 3x3 conv + max-pool stages, a 64-d feature layer, and a linear head over 10
    classes; takes one-channel images of side ``4 * 2**stages`` in [-1, 1]."""

    def __init__(self, width: int = 16, feature_dim: int = FEATURE_DIM, stages: int = 2):
        super().__init__()
        self.stages = stages
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        for i in range(2, stages + 1):  # conv2 (and conv3): to 2 * width channels
            setattr(
                self, f"conv{i}", nn.Conv2d(width if i == 2 else 2 * width, 2 * width, 3, padding=1)
            )
        self.fc = nn.Linear(2 * width * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, 64) of images (N, 1, S, S) in [-1, 1]."""
        for i in range(1, self.stages + 1):
            x = F.max_pool2d(F.relu(getattr(self, f"conv{i}")(x)), 2)  # (N, C, S / 2**i, ...)
        return F.relu(self.fc(x.flatten(1)))  # (N, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 1, S, S) in [-1, 1] -> class logits (N, 10)."""
        return self.head(self.features(x))  # (N, 10)


def new_classifier(benchmark: str = "digits") -> DigitsClassifier:
    """An untrained classifier for a demo's image size.

    Example:
        >>> new_classifier("translated").stages
        3
    """
    return DigitsClassifier(stages=int(math.log2(demo_spec(benchmark).image_size // 4)))


def real_digits(benchmark: str = "digits") -> tuple[torch.Tensor, torch.Tensor]:
    """A demo's reference images as ``(x (1797, 1, S, S) in [-1, 1], y (1797,))``, cached.

    The same images as the demo's named data set (``dynconvert.demo.data.digits(16)``, or
    ``translated()`` for ``"translated"``).

    Example:
        >>> x, y = real_digits()
        >>> tuple(x.shape), int(y.max())
        ((1797, 1, 16, 16), 9)
    """
    key = ("real", demo_spec(benchmark).name)
    if key not in _CACHE:
        src = demo_spec(benchmark).data()
        _CACHE[key] = (src.tensors["x"], src.tensors["y"])
    return _CACHE[key]  # type: ignore[return-value]


def digits_split(seed: int = 0, benchmark: str = "digits") -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed train / held-out indices into ``real_digits(benchmark)`` (80% / 20%, permuted by
    ``seed``); row i of every demo's reference set is digit i, so the split is by digit.

    Example:
        >>> train, test = digits_split()
        >>> len(train), len(test)
        (1438, 359)
    """
    n = real_digits(benchmark)[0].shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(n * TEST_FRACTION)
    return order[n_test:], order[:n_test]


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts by up to one pixel, contrast jitter and a little noise (robust to samples)."""
    n, size = x.shape[0], x.shape[-1]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)  # (N, 1, S + 2, S + 2)
    dx = torch.randint(0, 3, (n,), generator=g)
    dy = torch.randint(0, 3, (n,), generator=g)
    out = torch.stack(
        [padded[i, :, dy[i] : dy[i] + size, dx[i] : dx[i] + size] for i in range(n)]
    )  # (N, 1, S, S)
    gain = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=g)
    out = (out + 1.0) * gain - 1.0
    out = out + 0.1 * torch.rand(n, 1, 1, 1, generator=g) * torch.randn(out.shape, generator=g)
    return out.clamp(-1.0, 1.0)


def train_classifier(
    seed: int = 0,
    epochs: int | None = None,
    batch_size: int = 64,
    lr: float = 2e-3,
    on_epoch: Callable[[int, float], None] | None = None,
    benchmark: str = "digits",
) -> DigitsClassifier:
    """Train a demo's classifier on the training digits of ``digits_split()``, every placement
    of them in the demo's ``train_data``.

    Args:
        seed: Seed of the initial weights, the batch order and the augmentation.
        epochs: Passes over the training rows (default: the demo's ``classifier_epochs``).
        batch_size: Images per step.
        lr: Adam learning rate (cosine-decayed to 0).
        on_epoch: Called with ``(epoch, held-out accuracy)`` after every epoch.
        benchmark: The demo (``digits``, ``translated``).

    Returns:
        The trained classifier, in eval mode, on the CPU.

    Example:
        >>> clf = train_classifier(epochs=1)  # doctest: +SKIP
    """
    spec = demo_spec(benchmark)
    epochs = spec.training["classifier_epochs"] if epochs is None else epochs
    x_ref, y_ref = real_digits(benchmark)
    data = spec.train_data().tensors
    x, y = data["x"], data["y"]
    split, test = digits_split(benchmark=benchmark)
    n = len(x_ref)
    train = torch.cat([split + c * n for c in range(len(x) // n)])  # every copy of those digits
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = new_classifier(benchmark)
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
                acc = (model(x_ref[test]).argmax(1) == y_ref[test]).float().mean().item()
            on_epoch(epoch + 1, acc)
    return model.eval()


def save_classifier(
    model: DigitsClassifier, path: str | os.PathLike | None = None, benchmark: str = "digits"
) -> Path:
    """Write a classifier's weights as fp16 safetensors, atomically (temp file, then rename),
    to ``path`` (default: the demo's shipped classifier file).

    Example:
        >>> import tempfile
        >>> save_classifier(DigitsClassifier(), tempfile.mkdtemp() + "/clf.safetensors").suffix
        '.safetensors'
    """
    from dynconvert.io.save import atomic_save_tensors

    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    return atomic_save_tensors(state, demo_spec(benchmark).classifier if path is None else path)


def load_classifier(benchmark: str = "digits") -> DigitsClassifier:
    """A demo's classifier (shipped weights, or trained now if missing), cached in memory.

    Example:
        >>> load_classifier().head.out_features
        10
    """
    spec = demo_spec(benchmark)
    key = ("classifier", spec.name)
    if key not in _CACHE:
        if spec.classifier.is_file():
            from safetensors.torch import load_file

            model = new_classifier(spec.name)
            state = load_file(str(spec.classifier))
            model.load_state_dict({k: v.float() for k, v in state.items()})
            model.eval()
        else:
            model = train_classifier(benchmark=spec.name)
        model.requires_grad_(False)
        _CACHE[key] = model
    return _CACHE[key]  # type: ignore[return-value]
