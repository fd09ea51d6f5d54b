"""The memory plan of a calibration run: what one process holds, term by term, before it starts.

One source of truth for "will this calibration fit": ``dynconvert inspect --calibration`` prints
it, ``calibrate`` and ``dynconvert convert`` refuse with it (``calibration/fit.py``), and
docs/large-models.md quotes it. It is computed from the plan (site shapes), the model's
parameters (a meta-device model is enough) and the run's settings; nothing is allocated.

Per process, in bytes (W: parameters, T: trainable parameters, P: processes):

- weights W, gradients T, AdamW moments 2T (in the parameters' dtype), EMA T in float32;
  divided by P under FSDP (``fully_shard`` shards all four), plus FSDP's working set: the root
  unit's parameters and two blocks' unsharded (current and prefetched), one block's unsharded
  gradients, in the compute dtype;
- DDP (P > 1, no sharding) keeps a second copy of the gradients in its buckets;
- activations: what autograd saves for one micro-batch, summed over the sites (``site_saved``):
  projections' inputs, q/k/v and the attention output, the MLP hidden state, the routers' mask
  products, the norms' inputs. Under mixed precision the projections save half-size tensors and
  autocast keeps a half-size copy of every weight for the step; with gradient checkpointing
  only each block's input is kept, plus one block's activations while it is recomputed;
- activations and gradients do not peak together (backward frees one as it fills the other),
  so a step needs ``max(gradients, activations)`` above the rest; with gradient accumulation
  the gradients of the first micro-batches are kept while the next one runs (both count);
- on CPU: the raw trained weights are copied beside the EMA at the end of ``calibrate`` (one
  more T; frozen weights are shared),
  and the interpreter with torch and dynconvert imported (``CPU_RUNTIME_BYTES``). The plan
  counts tensors: it holds for the process because ``calibrate`` makes glibc give freed
  tensors back (``memory_release.py``; with the default, the checkpointing row held 46% more).

Trainable modes are entries of ``TRAINABLE_MODES`` (how many parameters train, and whether the
projections' weights need their inputs saved); a new mode is one entry.

:func:`memory_plan` is the floor without activations from the parameter counts alone (weights, a
distillation teacher, gradients, AdamW, EMA), for ``inspect``'s summary and the real-size table;
:func:`estimate` is the peak of a run with its settings.

Example:
    >>> from dynconvert.calibration.memory import MemorySettings
    >>> MemorySettings(batch_size=256, processes=8, grad_accum_steps=4).micro_batch
    8
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from dynconvert.errors import ConfigError

CPU_RUNTIME_BYTES = 750 * 2**20
"""Resident memory of a calibrating process before its model: torch, diffusers (imported by the
run pipeline and the adapters) and accelerate. Measured on the 2-core CPU machine with torch
2.14: 509 MiB after ``import torch``, 709 MiB with dynconvert's run pipeline and accelerate
imported, 753 MiB once a tiny model is converted (benchmarks/memory_plan.py)."""

SHARDING = ("none", "fsdp")
GIB = 2**30
EMA_BYTES = 4  # the EMA shadow is float32 whatever the weights are (ema.py)


@dataclass(frozen=True)
class TrainableMode:
    """How a value of ``calibration.trainable`` trains: which parameters, whether the
    projections' weights train (then every Linear keeps its input for the weight gradient), and
    whether a LoRA adapter trains beside the routers (its A needs the same inputs kept)."""

    name: str
    description: str
    weights_train: bool
    adapters: bool = False

    def trainable(self, facts: ModelFacts) -> int:
        """Parameters this mode trains."""
        if self.weights_train:
            return facts.trainable_numel
        return facts.router_numel + (facts.adapter_numel if self.adapters else 0)

    @property
    def saves_like(self) -> str:
        """The mode whose saved activations this one has: an adapter's A needs the Linear's
        input, as a trained weight does."""
        return "all" if self.weights_train or self.adapters else self.name


TRAINABLE_MODES: dict[str, TrainableMode] = {
    "all": TrainableMode("all", "routers and every weight (the paper)", True),
    "routers": TrainableMode("routers", "routers only, base weights frozen", False),
    "lora": TrainableMode("lora", "LoRA adapters and routers, base weights frozen", False, True),
}
"""Trainable modes by name (``CalibrationConfig.trainable``'s values)."""


@dataclass(frozen=True)
class MemorySettings:
    """The run settings the plan depends on.

    Attributes:
        batch_size: Global batch over all processes and accumulation steps.
        processes: Processes (GPUs) sharing the batch.
        sharding: "none" (one process, or DDP) or "fsdp".
        mixed_precision: "no", "bf16" or "fp16".
        grad_accum_steps: Micro-batches per optimiser step.
        gradient_checkpointing: Recompute each block in backward.
        trainable: A key of ``TRAINABLE_MODES``.
        device: "cpu" or "cuda" (CPU adds the interpreter and the result's copy).
        teacher: A frozen copy of the weights to distil from (``distill_weight`` > 0).
    """

    batch_size: int
    processes: int = 1
    sharding: str = "none"
    mixed_precision: str = "no"
    grad_accum_steps: int = 1
    gradient_checkpointing: bool = False
    trainable: str = "all"
    device: str = "cpu"
    teacher: bool = False

    def __post_init__(self) -> None:
        if self.sharding not in SHARDING:
            raise ConfigError(
                f"sharding must be one of {', '.join(SHARDING)}; got {self.sharding!r}"
            )
        if self.trainable not in TRAINABLE_MODES:
            raise ConfigError(
                f"trainable must be one of {', '.join(TRAINABLE_MODES)}; got {self.trainable!r}"
            )
        if min(self.batch_size, self.processes, self.grad_accum_steps) < 1:
            raise ConfigError("batch_size, processes and grad_accum_steps must be at least 1")
        if self.batch_size % (self.processes * self.grad_accum_steps):
            raise ConfigError(
                f"batch_size {self.batch_size} must be divisible by processes x grad_accum_steps "
                f"({self.processes} x {self.grad_accum_steps})"
            )

    @property
    def micro_batch(self) -> int:
        """Rows one process runs forward and backward at once."""
        return self.batch_size // (self.processes * self.grad_accum_steps)

    @property
    def half(self) -> bool:
        """Whether autocast computes in a 16-bit type."""
        return self.mixed_precision in ("bf16", "fp16")


@dataclass(frozen=True)
class ModelFacts:
    """What the plan needs from a converted (or about-to-be-converted) model.

    Attributes:
        param_bytes: Bytes of every parameter and buffer (routers included).
        param_size: Bytes per element of the parameters (4 for float32).
        trainable_numel: Parameters that train with ``trainable="all"`` (requires_grad).
        router_numel: Parameters of the routers.
        weight_numel: Elements of the 2-D+ weights autocast copies (Linear and conv weights).
        block_numel: Parameters of the largest transformer block.
        root_numel: Parameters outside every block (embedders, final layer, routers).
        saved: Elements autograd saves per sample, per mode: ``{mode: (half, full)}``, where
            "half" tensors are 16-bit under mixed precision and "full" ones stay float32.
        block_saved: The same for the largest block alone (what a checkpointed block recomputes).
        boundary: Elements per sample of the blocks' inputs (what checkpointing keeps).
        adapter_numel: Parameters of the LoRA adapter ``trainable="lora"`` trains (its TD-LoRA
            gates included; 0 when unknown).
    """

    param_bytes: int
    param_size: int
    trainable_numel: int
    router_numel: int
    weight_numel: int
    block_numel: int
    root_numel: int
    saved: dict[str, tuple[int, int]]
    block_saved: dict[str, tuple[int, int]]
    boundary: int
    adapter_numel: int = 0


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one process needs, by term, and their peak (``total``)."""

    settings: MemorySettings
    terms: dict[str, int]
    total: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: settings, terms and total, in bytes.

        Example:
            >>> MemoryEstimate(MemorySettings(8), {"weights": 1}, 1).to_dict()["total"]
            1
        """
        return {"settings": asdict(self.settings), "terms": dict(self.terms), "total": self.total}


def estimate(facts: ModelFacts, settings: MemorySettings) -> MemoryEstimate:
    """The peak bytes one process needs for calibration with these settings (module docstring).

    Example:
        >>> from dynconvert.calibration.memory import ModelFacts
        >>> f = ModelFacts(400, 4, 100, 10, 80, 30, 10, {"all": (0, 0), "routers": (0, 0)},
        ...                {"all": (0, 0), "routers": (0, 0)}, 0)
        >>> estimate(f, MemorySettings(8, device="cuda")).total  # 400 + 100 x (4 + 8) + 400
        2000
    """
    s, mode = settings, TRAINABLE_MODES[settings.trainable]
    p = s.processes
    shard = p if s.sharding == "fsdp" else 1
    t = mode.trainable(facts)
    compute = 2 if s.half else facts.param_size
    half_size = 2 if s.half else facts.param_size
    full_size = max(4, facts.param_size) if s.half else facts.param_size
    terms = state_terms(facts.param_bytes, t, facts.param_size, shard, s.teacher)
    if s.sharding == "fsdp" and p > 1:
        unsharded = facts.root_numel + 2 * facts.block_numel
        grads = facts.block_numel if mode.weights_train else 0
        terms["fsdp_unsharded"] = (unsharded + grads) * compute
    if s.sharding == "none" and p > 1:
        terms["ddp_buckets"] = t * facts.param_size
    kind = mode.saves_like
    saved = facts.block_saved[kind] if s.gradient_checkpointing else facts.saved[kind]
    per_sample = saved[0] * half_size + saved[1] * full_size
    if s.gradient_checkpointing:
        per_sample += facts.boundary * full_size
    activations = s.micro_batch * per_sample
    if s.half and s.sharding == "none":
        activations += facts.weight_numel * 2  # autocast's 16-bit copies of the weights
    terms["activations"] = activations
    step = sum(terms.values()) - terms["gradients"] - activations
    if s.grad_accum_steps > 1:  # the gradients of the first micro-batches wait for the others
        step += terms["gradients"] + activations
    else:
        step += max(terms["gradients"], activations)
    peak = step
    if s.device == "cpu":
        terms["runtime"] = CPU_RUNTIME_BYTES
        raw = math.ceil(t * facts.param_size / shard)  # the raw trained weights, copied
        finish = terms["weights"] + terms["optimizer"] + terms["ema"] + raw
        peak = max(step, finish - terms.get("fsdp_unsharded", 0)) + CPU_RUNTIME_BYTES
        terms["result_copy"] = raw if finish > step else 0
    return MemoryEstimate(settings=s, terms=terms, total=int(peak))


def calibration_memory(facts: ModelFacts, settings: MemorySettings) -> dict[str, MemoryEstimate]:
    """The estimate for every trainable mode, keyed by mode (``inspect --calibration --json``).

    Example:
        >>> f = ModelFacts(400, 4, 100, 10, 80, 30, 10, {"all": (0, 0), "routers": (0, 0)},
        ...                {"all": (0, 0), "routers": (0, 0)}, 0)
        >>> sorted(calibration_memory(f, MemorySettings(8, device="cuda")))
        ['all', 'lora', 'routers']
    """
    return {m: estimate(facts, replace(settings, trainable=m)) for m in TRAINABLE_MODES}


def state_terms(
    param_bytes: int, trained: int, param_size: int, shard: int = 1, teacher: bool = False
) -> dict[str, int]:
    """Bytes of the run's state per process: the one formula for weights, a frozen teacher,
    gradients, AdamW's two moments (in the parameters' dtype) and the float32 EMA shadow.

    Example:
        >>> state_terms(400, 10, 4)  # 100 float32 parameters, 10 of them trained
        {'weights': 400, 'gradients': 40, 'optimizer': 80, 'ema': 40}
    """
    terms = {"weights": math.ceil(param_bytes / shard)}
    if teacher:
        terms["teacher"] = terms["weights"]
    terms["gradients"] = math.ceil(trained * param_size / shard)
    terms["optimizer"] = math.ceil(2 * trained * param_size / shard)
    terms["ema"] = math.ceil(EMA_BYTES * trained / shard)
    return terms


def memory_plan(
    params: int, router_params: int, weight_bytes: int = 2, teacher: bool = False
) -> dict[str, int]:
    """The state a calibration run holds without activations, from parameter counts alone
    (a model on the meta device, ``inspect``'s quick table): :func:`state_terms` summed.

    Args:
        params: parameters of the converted model (routers included).
        router_params: parameters of its routers.
        weight_bytes: bytes per parameter (2: bf16 or fp16 weights, 4: float32).
        teacher: a frozen copy of the weights to distil from (``distill_weight`` > 0).

    Returns:
        ``{"all": bytes, "routers": bytes}``, one per setting of ``trainable``.

    Example:
        >>> memory_plan(100, 10, weight_bytes=4)["routers"]  # 400 + 10 x (4 + 8 + 4)
        560
    """
    held = params * weight_bytes
    counts = {"all": params, "routers": router_params}
    return {
        mode: sum(state_terms(held, n, weight_bytes, teacher=teacher).values())
        for mode, n in counts.items()
    }
