"""The translated-digits demo: a digit at a random position on an empty 32x32 canvas.

The 8x8 digits upsampled to 16x16 and pasted at a seeded random position on a 32x32 canvas
(``dynconvert.demo.data.translated``): most of every image is empty background, so a model that
routes tokens has something easy to skip, unlike the 16x16 digits where every token is part of
the digit. The model is the built-in ``DiT`` at 32x32 with patch 4, so it has 64 tokens like the
digits model (of which a digit covers about 16 to 25) and costs about as much to calibrate;
otherwise it is the digits model (hidden size 64, 4 blocks of 4 heads, learned sigma, class
dropout 0.1 for guidance). Its weights ship as ``dynconvert/assets/translated_dit.safetensors``
and its classifier as ``translated_classifier.safetensors``; ``examples/train_translated.py``
retrains both with a fixed seed.

The shipped DiT is under-trained: after its 2000 steps it denoises a lightly noised digit but
does not yet generate one (200 DDIM-50 samples, guidance 1.5: classifier accuracy 0.120, Frechet
distance 277.75 against 13.08 for 200 real images; docs/quality.md). The classifier is fine
(0.972 on held-out digits). Retraining longer is open (issue 25).

Importing ``dynconvert.demo`` registers the preset ``translated`` (alias ``dit-translated``),
the calibration data ``translated`` and the run evaluation ``evaluate.kind: translated``.

Example:
    >>> import dynconvert.demo
    >>> from dynconvert.models import build_model
    >>> model = build_model("translated")
    >>> model.input_size, model.x_embedder.num_patches
    (32, 64)
"""

from __future__ import annotations

from functools import partial

from dynconvert.demo import data
from dynconvert.demo.models import DemoModel

TRANSLATED_CONFIG: dict = dict(
    input_size=data.CANVAS, patch_size=4, in_channels=1,  # 32x32 pixels, 64 tokens of 4x4
    hidden_size=64, depth=4, num_heads=4, mlp_ratio=4.0,  # 4 blocks of 4 heads
    class_dropout_prob=0.1, num_classes=10, learn_sigma=True,  # CFG with null label 10
)  # fmt: skip
"""Constructor arguments of ``DiT`` for the translated-digits model."""

TRANSLATED = DemoModel(
    "translated",
    TRANSLATED_CONFIG,
    dict(steps=50, cfg_scale=1.5, scheduler="ddim", clip_sample=True),
    data=partial(data.translated, 1, 0),  # the reference set: every digit once, seed 0
    train_data=partial(data.translated, 8, 1),  # eight other placements of every digit
    training=dict(steps=2000, batch_size=64, lr=2e-3, classifier_epochs=6),  # shipped
    aliases=("dit-translated",),
    script="examples/train_translated.py",
)
"""The translated-digits demo."""
