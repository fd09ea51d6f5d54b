"""scikit-learn's 8x8 digits as diffusion training and calibration data (the demo's data set).

Registered as the named data set ``"digits"`` (``as_source("digits")``, a recipe's
``data: digits``) when ``dynconvert.demo`` is imported; scikit-learn is needed only here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dynconvert.calibration.data import TensorSource


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
    from sklearn.datasets import load_digits  # only the demo needs scikit-learn

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32).reshape(
        -1, 1, 8, 8
    )  # (1797, 1, 8, 8) in 0..16
    x = x / 16.0 * 2.0 - 1.0  # [-1, 1], the range the DiT was trained on
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return TensorSource(x.clamp(-1.0, 1.0), torch.tensor(data.target, dtype=torch.long))
