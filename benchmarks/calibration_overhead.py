"""Cost of a calibration step against a plain fine-tuning step of the original model.

Run: python benchmarks/calibration_overhead.py [--model DiT-S/2] [--batch 8] [--steps 6]

Both steps use the same batch, the same objective (DiT's eps + VB loss), AdamW and gradient
clipping; the calibration step adds the routers (Gumbel masks at full width, token routers) and
the FLOPs term. Steps alternate (plain, calibration, ...) and the median is reported.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

import dynconvert
from dynconvert.calibration import CalibrationConfig, build_objective, flops_loss, select_adapter
from dynconvert.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    torch.manual_seed(0)
    plain = build_model(args.model).train()
    dynamic = dynconvert.convert(copy.deepcopy(plain), 0.5)
    x0, _, y = plain.example_inputs(batch_size=args.batch)
    x0 = torch.randn_like(x0)
    cfg = CalibrationConfig(target=0.5, steps=1, batch_size=args.batch)
    adapter = select_adapter(plain)
    objective = build_objective(cfg, adapter)
    batch = {"x": x0, "y": y}
    opts = {
        id(m): torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0) for m in (plain, dynamic)
    }

    def step(model: torch.nn.Module, with_flops: bool) -> float:
        torch.manual_seed(1)
        t0 = time.perf_counter()
        noisy = objective.noise(x0)
        out = adapter(model, noisy.x_t, noisy.t, batch).float()
        loss = objective.loss(out, x0, noisy)["loss"].mean()
        if with_flops:
            loss = loss + flops_loss(dynconvert.last_flops_ratio(model), 0.5, 2.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt = opts[id(model)]
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step(plain, False)
    step(dynamic, True)
    tp, td = [], []
    for _ in range(args.steps):
        tp.append(step(plain, False))
        td.append(step(dynamic, True))
    result = {
        "model": args.model,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "plain_step_s": statistics.median(tp),
        "calibration_step_s": statistics.median(td),
        "overhead": statistics.median(td) / statistics.median(tp),
        "plain_steps_s": tp,
        "calibration_steps_s": td,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
