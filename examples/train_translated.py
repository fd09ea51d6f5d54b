"""Train the translated-digits DiT from scratch on a CPU and write the weights dynconvert ships.

    python examples/train_translated.py   # reproduces dynconvert/assets/translated_dit.safetensors
    python examples/train_translated.py --classifier     # also retrain its metrics classifier
    python examples/train_translated.py --out /tmp/translated.safetensors --steps 500

The digits, upsampled to 16x16, at a random position on an empty 32x32 canvas; the DiT has patch
4 (64 tokens, most of them background). Fixed seed; the same loop, options and final check as
``examples/train_digits.py`` (this script runs it with the translated demo).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_digits import main  # noqa: E402 - the shared script, found beside this one

if __name__ == "__main__":
    sys.exit(main(benchmark="translated", doc=__doc__))
