"""Small DiT-like models written the way other codebases write them, one per pattern of today's
diffusion transformers: rotary embeddings in every form and per-head qk-norm (``rotary.py``),
joint attention over two streams (MM-DiT) and parallel single-stream blocks (``joint.py``),
frames folded into the batch (video) and projections that are ``nn.Linear`` subclasses or
written by hand (``video.py``), built from shared pieces (``parts.py``).

None of their classes is in any registry: every site is found from the graph. Each builder
returns ``(model, example_inputs)`` with random weights; the inputs are keyword arguments.
Every name of the modules above is importable from here (saved records and tests name them so).

Example:
    >>> model, inputs = rotary_dit(rope="complex", qk_norm="head_rms")
    >>> model(**inputs).shape
    torch.Size([2, 16, 4])
"""

from __future__ import annotations

from dynconvert.testing.patterns.joint import (
    FusedParallelBlock,
    JointAttention,
    JointBlock,
    MMDiT,
    ParallelBlock,
    SharedMlpBlock,
    SlicedSwiGLU,
    mmdit,
)
from dynconvert.testing.patterns.parts import (
    QK_NORMS,
    ROPE_FORMS,
    FeedForward,
    HandRMSNorm,
    ScaleShift,
    apply_rope,
    rope_tables,
    sequence_inputs,
    time_embedding,
)
from dynconvert.testing.patterns.rotary import (
    ConvFeedForward,
    GroupedQueryAttention,
    ReLULinearAttention,
    RotaryBlock,
    RotaryDiT,
    RotarySelfAttention,
    rotary_dit,
)
from dynconvert.testing.patterns.video import (
    CustomLinear,
    Dense,
    ScaledDense,
    SpaceTimeAttention,
    VideoBlock,
    VideoDiT,
    video_dit,
)

__all__ = [
    "PATTERNS", "QK_NORMS", "ROPE_FORMS", "ConvFeedForward", "CustomLinear", "Dense",
    "FeedForward", "FusedParallelBlock", "GroupedQueryAttention", "HandRMSNorm", "JointAttention",
    "JointBlock", "MMDiT",
    "ParallelBlock", "ReLULinearAttention", "RotaryBlock", "RotaryDiT", "RotarySelfAttention",
    "ScaleShift", "ScaledDense", "SharedMlpBlock", "SlicedSwiGLU", "SpaceTimeAttention",
    "VideoBlock", "VideoDiT", "apply_rope", "mmdit", "rope_tables", "rotary_dit",
    "sequence_inputs", "time_embedding", "video_dit",
]  # fmt: skip

PATTERNS = {
    "rotary-rotate-half": lambda: rotary_dit("rotate_half"),
    "rotary-interleaved": lambda: rotary_dit("interleaved", "head_layernorm"),
    "rotary-complex": lambda: rotary_dit("complex", "head_rms"),
    "rotary-table-manual": lambda: rotary_dit("table", "head_rms", manual=True),
    "rotary-matrix": lambda: rotary_dit("matrix", "head_rms"),
    "qknorm-all-heads": lambda: rotary_dit("rotate_half", "all"),
    "gqa-repeat-kv": lambda: rotary_dit(gqa=(2, "repeat_kv")),
    "gqa-enable-gqa": lambda: rotary_dit(gqa=(2, "enable_gqa")),
    "gated-gqa": lambda: rotary_dit(gqa=(2, "repeat_kv", "channel")),
    "gated-per-head": lambda: rotary_dit(gqa=(4, "enable_gqa", "head")),
    "conv-mlp": lambda: rotary_dit(conv_mlp=True),
    "sana-like": lambda: rotary_dit("linear", conv_mlp=True),
    "mmdit": mmdit,
    "mmdit-shared-mlp": lambda: mmdit(shared_mlp=True),
    "fused-parallel": lambda: mmdit(joint=1, single=2, fused=True),
    "video": video_dit,
    "video-own-projections": lambda: video_dit(linear=Dense),
}
"""Builders of the pattern models by name, each returning ``(model, example_inputs)``."""
