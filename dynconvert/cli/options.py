"""Options shared by several commands, declared once as ``Annotated`` types."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from dynconvert.errors import ConfigError


def unset_option(*names: str, help: str, **kwargs: Any) -> Any:
    """A ``typer.Option`` for a value that is unset unless given: the help shows no default.

    Example:
        >>> Out = Annotated[str | None, unset_option("--out", "-o", help="Run folder.")]
    """
    return typer.Option(*names, help=help, show_default=False, **kwargs)


def comma_list(
    text: str | None, option: str, cast: type, example: str, what: str = "numbers"
) -> list[Any] | None:
    """The values of a comma-separated option (None when it is unset), or one clear error.

    Example:
        >>> comma_list("2, 8", "--batch", int, "2,8")
        [2, 8]
    """
    if text is None:
        return None
    try:
        values = [cast(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise ConfigError(
            f"{option} takes comma-separated {what}, e.g. {example}; got {text!r}"
        ) from None
    if not values:
        raise ConfigError(f"{option} is empty; pass {what}, e.g. {option} {example}")
    return values


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
        help="Model: a preset or alias (digits, dit-xl, dit-s, dit-b, U-ViT-H/2, ...), a "
        "diffusers model (pixart-alpha) or, for inspect, a published configuration (flux-dev, "
        "qwen-image, wan2.1-t2v-14b...).",
    ),
]  # fmt: skip
DiffusersOpt = Annotated[
    str | None,
    unset_option(
        "--diffusers",
        help="A diffusers transformer class (FluxTransformer2DModel...), with --config: its "
        "published config.json, analysed on the meta device (no weights).",
    ),
]
ConfigFileOpt = Annotated[
    str | None, unset_option("--config", help="The config.json of the --diffusers class.")
]
HeightOpt = Annotated[
    int | None, unset_option("--height", help="Image height in pixels (published configs).")
]
WidthOpt = Annotated[
    int | None, unset_option("--width", help="Image width in pixels (published configs).")
]
FramesOpt = Annotated[
    int | None, unset_option("--frames", help="Video frames (published video configs).")
]
RunOpt = Annotated[
    str | None, unset_option("--run", "-r", help="A run folder written by 'dynconvert convert'.")
]
BudgetOpt = Annotated[
    float | None,
    unset_option(
        "--budget",
        help="The FLOPs budget to run a budget-conditioned model at (one inside the range it was "
        "calibrated for, e.g. 0.4; default: the model's).",
    ),
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
