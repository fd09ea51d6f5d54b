"""Options shared by several commands, declared once as ``Annotated`` types."""

from __future__ import annotations

from typing import Annotated

import typer

JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print a JSON object on stdout instead of tables.")
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", "-m",
        help="Model: a preset or alias (digits, dit-xl, dit-s, dit-b, U-ViT-H/2, ...) or a diffusers "
        "model (pixart-alpha).",
        show_default=False,
    ),
]  # fmt: skip
RunOpt = Annotated[
    str | None,
    typer.Option(
        "--run", "-r", help="A run folder written by 'dynconvert convert'.", show_default=False
    ),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="Where to run: auto (cuda when present), cpu or cuda.")
]
CheckpointOpt = Annotated[
    str | None,
    typer.Option(
        "--checkpoint", "-c",
        help="Weights: a .pt/.pth/.safetensors file (e.g. the official DiT-XL-2-256x256.pt) or a "
        "diffusers folder.",
        show_default=False,
    ),
]  # fmt: skip
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the initial noise.", min=0)]
