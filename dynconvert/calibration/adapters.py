"""Model adapters: how to call each model family during calibration, and its training defaults.

A batch is a dict ``{"x": (B, C, H, W), "y": (B,) optional, "cond": (B, L, D) optional,
"cond_mask": (B, L) optional}``. An adapter turns a noisy input, the timestep the model expects,
and the batch into the model's raw output tensor (B, C or 2C, H, W). It also carries the family's
training defaults (objective, beta schedule, timestep offset). ``select_adapter`` picks one from
the model's class; the ``adapter`` config field overrides it.

Example:
    >>> from dynconvert.calibration.adapters import select_adapter
    >>> import torch.nn as nn
    >>> class Net(nn.Module):
    ...     def forward(self, x, t, y): return x
    >>> select_adapter(Net()).name
    'generic'
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from dynconvert.errors import ConfigError

X_NAMES = ("x", "hidden_states", "sample", "latents", "input")
T_NAMES = ("t", "timestep", "timesteps", "time", "sigma", "sigmas")
Y_NAMES = ("y", "class_labels", "labels")


def _output_tensor(out: Any, attr: str | None = "sample") -> torch.Tensor:
    """The prediction tensor of a forward result (a tensor, a ``.sample`` output, or a tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    if attr and hasattr(out, attr):
        return getattr(out, attr)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ConfigError(
        f"cannot read the prediction from a model output of type {type(out).__name__}; set "
        "adapter='generic' with adapter_args={'output': '<attribute name>'}"
    )


@dataclass
class ModelAdapter:
    """Calls one model family and states its training defaults.

    Attributes:
        name: Family name (a value of the ``adapter`` config field).
        objective: Default objective ("eps", "v" or "flow").
        beta_schedule: Default DDPM beta schedule.
        timestep_offset: Added to the 0-based DDPM timestep before the model sees it (U-ViT was
            trained with t in 1..1000).
        call: ``call(model, x_t, t, batch) -> output``.
        needs_cond: Whether batches must carry caption embeddings ``cond``.
    """

    name: str
    call: Callable[[nn.Module, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
    objective: str = "eps"
    beta_schedule: str = "linear"
    timestep_offset: int = 0
    needs_cond: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __call__(
        self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Run the model; returns its raw prediction (B, C or 2C, H, W)."""
        if self.needs_cond and batch.get("cond") is None:
            from dynconvert.errors import DataError

            raise DataError(
                f"the {self.name} adapter needs caption embeddings: give each batch 'cond' "
                "(B, L, D) and 'cond_mask' (B, L)"
            )
        return self.call(model, x_t, t, batch)


def _call_positional(
    model: nn.Module, x: torch.Tensor, t: torch.Tensor, batch: dict
) -> torch.Tensor:
    """Built-in DiT ``model(x, t, y)`` and U-ViT ``model(x, timesteps, y)``."""
    y = batch.get("y")
    out = model(x, t) if y is None else model(x, t, y)
    return _output_tensor(out)


def _call_diffusers_dit(
    model: nn.Module, x: torch.Tensor, t: torch.Tensor, batch: dict
) -> torch.Tensor:
    """diffusers ``DiTTransformer2DModel(hidden_states, timestep, class_labels).sample``."""
    return _output_tensor(model(hidden_states=x, timestep=t, class_labels=batch.get("y")))


def _call_pixart(model: nn.Module, x: torch.Tensor, t: torch.Tensor, batch: dict) -> torch.Tensor:
    """diffusers ``PixArtTransformer2DModel`` with caption embeddings and their mask."""
    out = model(
        hidden_states=x,
        encoder_hidden_states=batch["cond"],
        encoder_attention_mask=batch.get("cond_mask"),
        timestep=t,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )
    return _output_tensor(out)


def generic_adapter(
    model: nn.Module | None = None, args: dict[str, str] | None = None
) -> ModelAdapter:
    """An adapter that calls ``model(**kwargs)`` with configurable keyword names.

    Args:
        model: Used to guess the names from the forward signature when ``args`` lacks them.
        args: Batch key -> forward keyword. "x" and "t" name the noisy input and the timestep;
            any other batch key ("y", "cond", "cond_mask", or your own) is passed under the given
            name; "output" names the attribute holding the prediction (default "sample").

    Returns:
        The adapter.

    Example:
        >>> ad = generic_adapter(args={"x": "sample", "t": "timestep", "y": "class_labels"})
        >>> ad.extra["kwargs"]["y"]
        'class_labels'
    """
    args = dict(args or {})
    output_attr = args.pop("output", "sample")
    params: list[str] = []
    if model is not None:
        try:
            params = list(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):
            params = []
    for key, names in (("x", X_NAMES), ("t", T_NAMES), ("y", Y_NAMES)):
        if key not in args:
            found = next((n for n in names if n in params), None)
            if found is None and key in ("x", "t"):
                if model is None:
                    found = key
                else:
                    raise ConfigError(
                        f"cannot tell which forward argument of {type(model).__name__} takes "
                        f"'{key}' (looked for {', '.join(names)}); set adapter_args, e.g. "
                        "{'x': 'hidden_states', 't': 'timestep', 'y': 'class_labels'}"
                    )
            if found is not None:
                args[key] = found
    kwargs_map = dict(args)

    def call(model: nn.Module, x: torch.Tensor, t: torch.Tensor, batch: dict) -> torch.Tensor:
        kwargs = {kwargs_map["x"]: x, kwargs_map["t"]: t}
        for key, name in kwargs_map.items():
            if key not in ("x", "t") and batch.get(key) is not None:
                kwargs[name] = batch[key]
        return _output_tensor(model(**kwargs), output_attr)

    return ModelAdapter(
        name="generic", call=call, extra={"kwargs": kwargs_map, "output": output_attr}
    )


def _builtin(name: str) -> ModelAdapter:
    if name == "dit":
        return ModelAdapter(name="dit", call=_call_positional)
    if name == "uvit":
        return ModelAdapter(
            name="uvit", call=_call_positional, beta_schedule="scaled_linear", timestep_offset=1
        )
    if name == "diffusers_dit":
        return ModelAdapter(name="diffusers_dit", call=_call_diffusers_dit)
    if name == "pixart":
        return ModelAdapter(name="pixart", call=_call_pixart, needs_cond=True)
    raise ConfigError(f"unknown adapter {name!r}; valid: dit, uvit, diffusers_dit, pixart, generic")


_CLASS_TO_ADAPTER = {
    "DiTTransformer2DModel": "diffusers_dit",
    "PixArtTransformer2DModel": "pixart",
    "DiT": "dit",
    "UViT": "uvit",
}


def model_family(model: nn.Module) -> str:
    """The adapter name for a model's class (or a base class); "generic" when unknown.

    Example:
        >>> model_family(nn.Linear(2, 2))
        'generic'
    """
    for cls in type(model).__mro__:
        if cls.__name__ in _CLASS_TO_ADAPTER:
            return _CLASS_TO_ADAPTER[cls.__name__]
    return "generic"


def select_adapter(
    model: nn.Module, name: str = "auto", args: dict[str, str] | None = None
) -> ModelAdapter:
    """Choose the adapter for a model: by class when ``name`` is "auto", else the named one.

    Args:
        model: The (converted) model.
        name: "auto", "dit", "uvit", "diffusers_dit", "pixart" or "generic".
        args: Keyword names for the generic adapter (see ``generic_adapter``).

    Returns:
        The adapter.

    Example:
        >>> from dynconvert.models import build_model
        >>> select_adapter(build_model("dit-tiny")).name
        'dit'
    """
    family = model_family(model) if name == "auto" else name
    if family == "generic":
        return generic_adapter(model, args)
    return _builtin(family)


@dataclass
class LabelPolicy:
    """How class labels are handled: real classes, the null label, and CFG label dropout.

    Attributes:
        num_classes: Real classes (labels 0..num_classes-1), or None for an unconditional model.
        null_label: The label meaning "no class" (None: the model has none).
        dropout: Probability of replacing a label by ``null_label`` in a training step.
        uses_labels: False for a model that takes no labels (an unconditional U-ViT): batches'
            labels are then not passed.
    """

    num_classes: int | None = None
    null_label: int | None = None
    dropout: float = 0.0
    uses_labels: bool = True


def label_embedders(model: nn.Module) -> list[nn.Module]:
    """Modules that drop labels themselves in training (DiT's LabelEmbedder, diffusers'
    LabelEmbedding): they have ``token_drop``, ``dropout_prob`` and ``num_classes``."""
    return [
        m
        for m in model.modules()
        if hasattr(m, "token_drop") and hasattr(m, "dropout_prob") and hasattr(m, "num_classes")
    ]


def resolve_labels(model: nn.Module, adapter: ModelAdapter, config: Any) -> LabelPolicy:
    """Find the label policy from the model, with config overrides.

    Models that drop labels inside (DiT-style label embedders) give their ``num_classes`` (the
    null label) and ``dropout_prob``. U-ViT's ImageNet-latent checkpoints have 1001 labels, the
    last one null, trained with dropout 0.1. Otherwise only the config sets a null label.

    Example:
        >>> from dynconvert.models import build_model
        >>> from dynconvert.calibration.config import CalibrationConfig
        >>> m = build_model("dit-tiny")
        >>> resolve_labels(m, select_adapter(m), CalibrationConfig(target=0.5))
        LabelPolicy(num_classes=10, null_label=10, dropout=0.1, uses_labels=True)
    """
    policy = LabelPolicy()
    embedders = label_embedders(model)
    if embedders:
        emb = embedders[0]
        policy.num_classes = int(emb.num_classes)
        if float(emb.dropout_prob) > 0:
            policy.null_label = int(emb.num_classes)
            policy.dropout = float(emb.dropout_prob)
    elif adapter.name == "uvit" and int(getattr(model, "num_classes", -1)) > 0:
        n = int(model.num_classes)
        if n == 1001:
            policy.num_classes, policy.null_label, policy.dropout = 1000, 1000, 0.1
        else:
            policy.num_classes = n
    elif adapter.name == "uvit":
        policy.uses_labels = False
    else:
        n = getattr(model, "num_classes", None)
        if n is None:
            n = getattr(getattr(model, "config", None), "num_embeds_ada_norm", None)
        if isinstance(n, int) and n > 0:
            policy.num_classes = n
    if config.num_classes is not None:
        policy.num_classes = config.num_classes
    if config.null_label is not None:
        policy.null_label = config.null_label
        if config.num_classes is None and policy.num_classes is not None:
            policy.num_classes = min(policy.num_classes, config.null_label)
    if config.label_dropout is not None:
        policy.dropout = float(config.label_dropout)
    if policy.dropout > 0 and policy.null_label is None:
        raise ConfigError(
            f"label_dropout={policy.dropout} needs a null label and this model has none known; "
            "set null_label, or label_dropout=0"
        )
    return policy


def drop_labels(y: torch.Tensor, policy: LabelPolicy) -> torch.Tensor:
    """Replace each label by the null label with probability ``policy.dropout`` (global RNG).

    Example:
        >>> y = torch.arange(4)
        >>> drop_labels(y, LabelPolicy(num_classes=4, null_label=4, dropout=0.0)).tolist()
        [0, 1, 2, 3]
    """
    if policy.dropout <= 0 or policy.null_label is None:
        return y
    drop = torch.rand(y.shape[0], device=y.device) < policy.dropout
    return torch.where(drop, torch.full_like(y, policy.null_label), y)
