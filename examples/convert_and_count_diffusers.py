"""Convert a tiny diffusers DiT (built from a config, no download) and print its FLOPs table.

    python examples/convert_and_count_diffusers.py

The same three calls work on a real model, e.g. ``DiTTransformer2DModel.from_pretrained(
"facebook/DiT-XL-2-256", subfolder="transformer")``; counts are MACs (1 MAC = 2 FLOPs).
"""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel

import dynconvert
from dynconvert.testing import randomize_routing


def main() -> None:
    torch.manual_seed(0)
    # A DiT-XL/2-shaped transformer, scaled down: 4 heads x 16 dims, 4 layers, 16x16x4 latents.
    model = DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=4,
        sample_size=16, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero",
    ).eval()  # fmt: skip
    inputs = {
        "hidden_states": torch.randn(2, 4, 16, 16),
        "timestep": torch.tensor([100, 800]),
        "class_labels": torch.tensor([1, 2]),
    }
    model = dynconvert.convert(model, budget=0.5, example_inputs=inputs)
    # Calibration would teach the routers the budget; here about half of every unit is switched
    # off by hand so that the table shows a dynamic count.
    randomize_routing(model, keep=0.5, example_inputs=inputs)
    report = dynconvert.count_flops(model, inputs)

    print(f"{'site':<38} {'kind':<9} {'static':>10} {'dynamic':>10} {'ratio':>6}")
    for s in report.sites:
        print(
            f"{s.name:<38} {s.kind:<9} {s.static_macs:>10,.0f} "
            f"{s.dynamic_macs:>10,.0f} {s.ratio:>6.2f}"
        )
    per = report.static_macs_per_sample
    print(
        f"\nwhole model: {per:,.0f} MACs per sample static, "
        f"{report.dynamic_macs_per_sample:,.0f} dynamic "
        f"(ratio {report.ratio:.3f}; blocks only {report.blocks_ratio:.3f})"
    )
    print(f"unit: {report.unit}")


if __name__ == "__main__":
    main()
