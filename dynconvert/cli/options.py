"""Options shared by several commands, declared once as ``Annotated`` types."""

from __future__ import annotations

from typing import Annotated, Any

import typer


def unset_option(*names: str, help: str, **kwargs: Any) -> Any:
    """A ``typer.Option`` for a value that is unset unless given: the help shows no default.

    Example:
        >>> Out = Annotated[str | None, unset_option("--out", "-o", help="Run folder.")]
    """
    return typer.Option(*names, help=help, show_default=False, **kwargs)


JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print a JSON object on stdout instead of tables.")
]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="Where to run: auto (cuda when present), cpu or cuda.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the initial noise.", min=0)]
ModelOpt = Annotated[
    str | None,
    unset_option(
        "--model", "-m",
        help="Model: a preset or alias (digits, dit-xl, dit-s, dit-b, U-ViT-H/2, ...) or a "
        "diffusers model (pixart-alpha).",
    ),
]  # fmt: skip
RunOpt = Annotated[
    str | None, unset_option("--run", "-r", help="A run folder written by 'dynconvert convert'.")
]
CheckpointOpt = Annotated[
    str | None,
    unset_option(
        "--checkpoint", "-c",
        help="Weights: a .pt/.pth/.safetensors file (e.g. the official DiT-XL-2-256x256.pt) or a "
        "diffusers folder.",
    ),
]  # fmt: skip
SetOpt = Annotated[
    list[str] | None,
    unset_option(
        "--set",
        "-s",
        help="Override a recipe field, dotted: --set calibration.lr=2e-5 (repeatable).",
    ),
]
