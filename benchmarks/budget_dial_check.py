"""Does a budget-conditioned digits model's dial track its setting, and where does it not?

Calibrates the digits DiT with the range 0.3:1.0 for ``STEPS`` steps (the digits recipe,
seed 0), then at budgets 0.3, 0.5, 0.7 and 0.9 records the sampler's calls (20 samples, 25 DDIM
steps, guidance 1.5, seed 1; no sampler fit) and replays them with evaluation routing (hard
thresholds) and with training routing (Gumbel noise), printing each mean FLOPs ratio and token
keep rate, the token routers' budget offsets and the size of the width routers' budget term.
The numbers in docs/budgets.md ("Why the dial did not track") come from this script, before
and after the budget encoder's input changed::

    python benchmarks/budget_dial_check.py 200
"""

from __future__ import annotations

import sys

import torch

import dynconvert
from dynconvert.calibration.objectives import token_keep
from dynconvert.flops import last_flops_ratio
from dynconvert.runtime.routing import routing
from dynconvert.runtime.state import get_state
from dynconvert.sampling.budget import _record
from dynconvert.sampling.sampler import sample

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from budget_digits import _calibrated  # noqa: E402


def _replay(model: torch.nn.Module, calls: list, mode: str) -> tuple[float, float]:
    """Mean FLOPs ratio and token keep rate of the recorded calls under routing ``mode``."""
    bank, ratios, keeps = get_state(model), [], []
    with torch.no_grad(), routing(model, mode):
        for args, kwargs in calls:
            model(*args, **kwargs)
            ratios.append(float(last_flops_ratio(bank).mean()))
            keeps.append(float(token_keep(bank).mean()))
    return sum(ratios) / len(ratios), sum(keeps) / len(keeps)


def main(steps: int) -> None:
    """Calibrate, then print one line per budget."""
    torch.set_num_threads(1)
    model, cpu, _ = _calibrated((0.3, 1.0), steps, 0)
    bank, labels = get_state(model), torch.arange(10).repeat(2)
    print(f"calibrated {steps} steps, {cpu:.0f} CPU s")
    for b in (0.3, 0.5, 0.7, 0.9):
        with dynconvert.budget(model, b):
            run = lambda: sample(model, labels=labels, steps=25, cfg_scale=1.5, seed=1)  # noqa: E731
            calls, at_sampling = _record(model, run)
            ev, tr = _replay(model, calls, "eval"), _replay(model, calls, "train")
        with torch.no_grad():
            emb = bank.b_embed(torch.tensor([b]))  # (1, embed)
            offsets = [round(float(lin(emb)), 2) for lin in bank.token_budget.values()]
            width = sum(float((r.weight @ emb[0]).abs().mean()) for r in bank.width.values())
        print(f"b={b}: sampling {at_sampling:.3f} | eval {ev[0]:.3f} keep {ev[1]:.3f} | train "
              f"{tr[0]:.3f} keep {tr[1]:.3f} | token offsets {offsets} | mean |W b_emb| "
              f"{width / len(bank.width):.3f}")  # fmt: skip


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
