"""Refusing up front a calibration that will not fit, and saying what would.

Before the first step, ``calibrate`` (and ``dynconvert convert``, before it builds the weights)
compares the memory plan (``calibration/memory.py``) with the device: CUDA's free memory on a
GPU, the machine's available RAM on CPU (shared by the processes of this machine). When the
plan does not fit it stops with one message: the estimate by term, what is free, and settings
that fit, each checked with the same plan: a smaller micro-batch with gradient accumulation
(the global batch is kept), gradient checkpointing, ``trainable=routers``, FSDP over N GPUs.
``check_memory=False`` (``--force``) skips the check.

Example:
    >>> from dynconvert.calibration.memory import MemorySettings
    >>> describe(MemorySettings(batch_size=256, grad_accum_steps=32, gradient_checkpointing=True))
    'calibration.grad_accum_steps=32 calibration.gradient_checkpointing=true'
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import torch

from dynconvert.calibration.memory import (
    CPU_RUNTIME_BYTES,
    GIB,
    TRAINABLE_MODES,
    MemoryEstimate,
    MemorySettings,
    ModelFacts,
    estimate,
)
from dynconvert.errors import MemoryPlanError

FSDP_SIZES = (2, 4, 8, 16, 32, 64)
"""GPU counts tried for an FSDP suggestion."""

HEADROOM = 1.25
"""A suggestion's estimate times this must fit: the plan has been measured within 25% of the
peak (docs/large-models.md), mostly under it, so a suggestion is not sized to the last byte."""


def device_free(device: torch.device | str) -> tuple[int, str]:
    """Bytes free for this process on ``device``, and what they are.

    On CUDA: the device's free memory (``torch.cuda.mem_get_info``). On CPU: the machine's
    available RAM divided among the processes launched on it (``LOCAL_WORLD_SIZE``).

    Example:
        >>> free, what = device_free("cpu")
        >>> free > 0 and "RAM" in what
        True
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free on {torch.cuda.get_device_name(device)} (cuda:{device.index or 0})"
    import psutil

    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    available = int(psutil.virtual_memory().available)
    share = f", shared by {local} processes" if local > 1 else ""
    return available // local, f"available RAM{share}"


def gib(n: int | float) -> str:
    """Bytes as GiB with one decimal (two below 1 GiB).

    Example:
        >>> gib(3 * 2**30), gib(2**29)
        ('3.0 GiB', '0.50 GiB')
    """
    value = n / GIB
    return f"{value:.1f} GiB" if value >= 1 else f"{value:.2f} GiB"


def describe(settings: MemorySettings, base: MemorySettings | None = None) -> str:
    """The recipe overrides (``--set``) that turn ``base``'s settings into ``settings``."""
    base = base or MemorySettings(batch_size=settings.batch_size)
    parts = []
    if settings.trainable != base.trainable:
        parts.append(f"calibration.trainable={settings.trainable}")
    if settings.grad_accum_steps != base.grad_accum_steps:
        parts.append(f"calibration.grad_accum_steps={settings.grad_accum_steps}")
    if settings.gradient_checkpointing and not base.gradient_checkpointing:
        parts.append("calibration.gradient_checkpointing=true")
    return " ".join(parts)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def suggestions(
    facts: ModelFacts, settings: MemorySettings, free: int, resident: int = 0
) -> list[tuple[MemorySettings, MemoryEstimate]]:
    """Settings that fit in ``free`` bytes (plus ``resident`` already held) with ``HEADROOM``,
    cheapest change first.

    Tried in order, each with the fewest accumulation steps that fit: accumulation alone, with
    gradient checkpointing, then every other trainable mode likewise. At most one suggestion per
    (mode, checkpointing) pair.
    """
    per_process = settings.batch_size // settings.processes
    found = []
    modes = [settings.trainable] + [m for m in TRAINABLE_MODES if m != settings.trainable]
    for mode in modes:
        for ckpt in sorted({settings.gradient_checkpointing, True}):
            for accum in _divisors(per_process):
                if accum < settings.grad_accum_steps:
                    continue
                s = replace(settings, trainable=mode, grad_accum_steps=accum,
                            gradient_checkpointing=ckpt)  # fmt: skip
                if s == settings:
                    continue
                est = estimate(facts, s)
                if (est.total - resident) * HEADROOM <= free:
                    found.append((s, est))
                    break
            if found and found[-1][0].trainable == mode:
                break  # the cheapest change for this mode: do not also suggest checkpointing
    return found


def fsdp_size(facts: ModelFacts, settings: MemorySettings, free: int) -> tuple[int, int] | None:
    """The fewest GPUs (of ``FSDP_SIZES``) whose FSDP per-GPU peak fits ``free``: (GPUs, bytes)."""
    for n in FSDP_SIZES:
        if settings.batch_size % (n * settings.grad_accum_steps):
            continue
        est = estimate(facts, replace(settings, processes=n, sharding="fsdp", device="cuda"))
        if est.total * HEADROOM <= free:
            return n, est.total
    return None


def _nothing_fits(facts: ModelFacts, settings: MemorySettings, free: int, resident: int) -> str:
    """Why no setting fits: the smallest one tried (one row at a time, checkpointed, the
    cheapest trainable mode) and what it needs."""
    per_process = settings.batch_size // settings.processes
    floor = min(
        (replace(settings, trainable=m, grad_accum_steps=per_process, gradient_checkpointing=True)
         for m in TRAINABLE_MODES),
        key=lambda s: estimate(facts, s).total,
    )  # fmt: skip
    need = (estimate(facts, floor).total - resident) * HEADROOM + resident
    flags = describe(floor, settings).replace(" ", " --set ")
    return (
        f"Nothing fits on this device: the smallest setting, --set {flags}, needs about "
        f"{gib(need)} with headroom; free memory (other processes hold it) or use a GPU."
    )


def refusal(
    facts: ModelFacts, settings: MemorySettings, free: int, what: str, resident: int = 0
) -> str | None:
    """The message refusing ``settings`` when their peak exceeds ``free`` (None when it fits).

    Args:
        facts: The model's facts (``memory.model_facts``).
        settings: The run's settings.
        free: Bytes free for this process (``device_free``).
        what: What ``free`` is, for the message.
        resident: Bytes of the estimate this process already holds (the model's weights and
            the interpreter on CPU), not counted again against ``free``.

    Example:
        >>> from dynconvert.calibration.memory import ModelFacts
        >>> f = ModelFacts(4 * 2**30, 4, 2**30, 2**20, 2**30, 2**25, 2**25,
        ...                {"all": (2**22, 0), "routers": (2**21, 0)},
        ...                {"all": (2**18, 0), "routers": (2**17, 0)}, 2**10)
        >>> refusal(f, MemorySettings(256, device="cuda"), 8 * 2**30, "free")[:44]
        'calibration needs about 20.0 GiB per process'
    """
    est = estimate(facts, settings)
    if est.total - resident <= free:
        return None
    terms = ", ".join(f"{k.replace('_', ' ')} {gib(v)}" for k, v in est.terms.items() if v)
    parts = [
        f"calibration needs about {gib(est.total)} per process ({terms}; micro-batch "
        f"{settings.micro_batch}, trainable={settings.trainable}, mixed_precision="
        f"{settings.mixed_precision}) but {gib(free + resident)} is {what}."
    ]
    found = suggestions(facts, settings, free, resident)
    fits = [f"--set {describe(s, settings).replace(' ', ' --set ')} (about {gib(e.total)})"
            for s, e in found]  # fmt: skip
    if fits:
        parts.append(
            f"What fits here, global batch {settings.batch_size} kept: {'; or '.join(fits)}."
        )
    else:
        parts.append(_nothing_fits(facts, settings, free, resident))
    gpu_free = free if settings.device == "cuda" else 80 * GIB
    n = fsdp_size(facts, settings, gpu_free)
    if n is not None:
        where = "such GPUs" if settings.device == "cuda" else "80 GiB GPUs"
        parts.append(
            f"Or shard over {n[0]} {where} (about {gib(n[1])} each): accelerate launch "
            f"--config_file examples/accelerate/fsdp.yaml --num_processes {n[0]} -m dynconvert "
            "convert (these options)."
        )
    parts.append(
        "`force=True` (calibration.check_memory=false) skips this check; `dynconvert inspect "
        "--model NAME --calibration` shows the plan."
    )
    return " ".join(parts)


def check_fits(
    facts: ModelFacts, settings: MemorySettings, device: Any, resident: int = 0
) -> MemoryEstimate:
    """Raise ``MemoryPlanError`` when the plan exceeds the device's free memory.

    Returns:
        The estimate, when it fits.

    Raises:
        MemoryPlanError: The message gives the estimate and what would fit.
    """
    free, what = device_free(device)
    message = refusal(facts, settings, free, what, resident)
    if message is not None:
        raise MemoryPlanError(message)
    return estimate(facts, settings)


def settings_for(cfg: Any, processes: int, sharding: str, device: Any) -> MemorySettings:
    """The memory settings of a ``CalibrationConfig`` run on ``processes`` processes.

    Example:
        >>> from dynconvert.calibration.config import CalibrationConfig
        >>> settings_for(CalibrationConfig(target=0.5, batch_size=64), 2, "fsdp", "cpu").micro_batch
        32
    """
    return MemorySettings(
        batch_size=cfg.batch_size, processes=processes, sharding=sharding,
        mixed_precision=cfg.mixed_precision, grad_accum_steps=cfg.grad_accum_steps,
        gradient_checkpointing=cfg.gradient_checkpointing, trainable=cfg.trainable,
        device="cuda" if torch.device(device).type == "cuda" else "cpu",
        teacher=cfg.distill_weight > 0,
    )  # fmt: skip


def resident_bytes(facts: ModelFacts, settings: MemorySettings, model_on_cpu: bool) -> int:
    """What this process already holds of the estimate: on CPU the interpreter, and the model's
    weights when they are already loaded on the CPU."""
    if settings.device != "cpu":
        return 0
    return CPU_RUNTIME_BYTES + (facts.param_bytes if model_on_cpu else 0)


def check_before_start(model: Any, cfg: Any, accelerator: Any) -> MemoryEstimate | None:
    """``calibrate``'s check: the converted model's plan at ``cfg``'s settings on the
    accelerator's device and processes (None when ``cfg.check_memory`` is off).

    Raises:
        MemoryPlanError: It does not fit; the message says what would.
    """
    if not cfg.check_memory:
        return None
    from dynconvert.calibration.distributed import sharding_of
    from dynconvert.calibration.memory_facts import model_facts
    from dynconvert.calibration.trainable import adapter_numel
    from dynconvert.runtime.state import get_state

    facts = model_facts(model, get_state(model).plan, adapter_numel=adapter_numel(model, cfg))
    device = accelerator.device
    settings = settings_for(cfg, accelerator.num_processes, sharding_of(accelerator), device)
    first = next(model.parameters(), None)
    on_cpu = first is not None and first.device.type == "cpu"
    return check_fits(facts, settings, device, resident_bytes(facts, settings, on_cpu))
