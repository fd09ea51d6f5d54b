"""Per-GPU calibration memory of DiT-XL/2 and a 12B transformer (Flux.1-dev's published shape) on
1, 8 and 64 GPUs, from the memory plan (``dynconvert.calibration.memory``); nothing is allocated.

Run: python benchmarks/memory_estimates.py [--out benchmarks/results/memory_estimates.json]

Both models are built on the meta device and analysed there (Flux.1-dev from its published
transformer config shipped in dynconvert/testing/configs, at 1024x1024: 4096 image tokens and
512 text tokens; about 1 GB resident and 2-3 min of CPU). Settings: the global batch of the
DiT-XL recipe (256; 32 for Flux, a fine-tuning batch), bf16 mixed precision, at most 32 rows
per GPU at once (gradient accumulation above that), DDP or FSDP2, with and without gradient
checkpointing, trainable all / routers / lora.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dynconvert.calibration.memory import MemorySettings, calibration_memory
from dynconvert.calibration.memory_facts import skeleton_facts

GIB = 2**30


def dit_xl() -> tuple[torch.nn.Module, object]:
    from dynconvert.models import build_model

    with torch.device("meta"):
        model = build_model("DiT-XL/2")
    return model, skeleton_facts(model)[1]


def flux_dev() -> tuple[torch.nn.Module, object]:
    """Flux.1-dev as ``dynconvert inspect --model flux-dev --calibration`` plans it: its
    published config on meta, inputs at 1024x1024, head-locality decided on the probe's few
    tokens (analysing at 4608 tokens instead grew past 5.6 GB and was killed)."""
    from dynconvert.cli.inspect_models import real_size_model

    model, inputs, probe = real_size_model("flux-dev", None, None, (None, None, None))
    return model, skeleton_facts(model, inputs=inputs, probe_inputs=probe)[1]


def rows(name: str, facts: object, batch: int) -> list[dict]:
    out = []
    for gpus in (1, 8, 64):
        per_gpu = max(1, batch // gpus)
        accum = max(1, per_gpu // 32)
        for sharding in ("none", "fsdp") if gpus > 1 else ("none",):
            for ckpt in (False, True):
                s = MemorySettings(
                    batch_size=per_gpu * gpus,
                    processes=gpus,
                    sharding=sharding,
                    mixed_precision="bf16",
                    grad_accum_steps=accum,
                    gradient_checkpointing=ckpt,
                    device="cuda",
                )
                plans = calibration_memory(facts, s)
                out.append(
                    {
                        "model": name,
                        "gpus": gpus,
                        "sharding": sharding,
                        "checkpointing": ckpt,
                        "global_batch": s.batch_size,
                        "micro_batch": s.micro_batch,
                        **{f"{m}_gib": round(e.total / GIB, 1) for m, e in plans.items()},
                    }
                )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = []
    for name, build, batch in (("DiT-XL/2", dit_xl, 256), ("Flux.1-dev (12B)", flux_dev, 32)):
        model, facts = build()
        params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {params / 1e9:.2f}B parameters, routers {facts.router_numel / 1e6:.1f}M")
        results += rows(name, facts, batch)
    print(
        "| model | GPUs | sharding | checkpointing | global batch | micro-batch | all (GiB/GPU) "
        "| routers (GiB/GPU) | lora (GiB/GPU) |\n|---|---|---|---|---|---|---|---|---|"
    )
    for r in results:
        print(
            f"| {r['model']} | {r['gpus']} | {r['sharding']} | "
            f"{'on' if r['checkpointing'] else 'off'} "
            f"| {r['global_batch']} | {r['micro_batch']} | {r['all_gib']} | {r['routers_gib']} "
            f"| {r['lora_gib']} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
