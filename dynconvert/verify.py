"""Check the fast path of attention classes dynconvert has no registry entry for.

For such classes the attributes that hold the head count were found by a scan (registry.py).
Convert runs the model on the masked path and on the fast path with some heads off (half of
them at random, then all but the always-on one);
sites whose fast path does not reproduce the masked result keep the masked path in evaluation
(correct, not faster) and say so in the plan.
"""

from __future__ import annotations

import torch
from torch import nn

from dynconvert.runtime.routing import routing
from dynconvert.runtime.state import get_state


def _out(model: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    out = model(*args, **kwargs)
    out = out.sample if hasattr(out, "sample") else out
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def verify_fast_path(model: nn.Module, args: tuple, kwargs: dict, atol: float = 1e-4) -> list[int]:
    """Compare fast and masked paths for every unverified site; returns the indices that failed."""
    bank = get_state(model)
    todo = [s for s in bank.plan.sites if s.fast_reason == "unverified" and s.units > 1]
    if not todo:
        return []
    saved = {k: (r.weight.clone(), r.bias.clone()) for k, r in bank.width.items()}
    g = torch.Generator().manual_seed(0)
    failed: list[int] = []
    try:
        # Two patterns: half the units off at random, then only the always-on unit. A layout
        # that happens to map a symmetric set of units onto itself (a table cut in reversed
        # positions, say) passes one random half, hardly both.
        for pattern in ("half", "one"):
            for s in todo:
                r = bank.width[str(s.index)]
                r.weight.zero_()
                keep = int(bank.always_on[s.index])
                others = [u for u in torch.randperm(s.units, generator=g).tolist() if u != keep]
                bias = torch.ones(s.units)  # never the always-on one off: slicing must happen
                bias[others[: max(1, s.units // 2)] if pattern == "half" else others] = -1.0
                r.bias.copy_(bias)
            bank.clear_cache()
            with routing(model, "eval", "masked"):
                ref = _out(model, args, kwargs)
            for s in todo:  # one site at a time on the fast path, the others masked
                for other in todo:
                    other.fast = other is s
                bank.clear_cache()
                try:
                    with routing(model, "eval", "fast"):
                        got = _out(model, args, kwargs)
                    ok = got.shape == ref.shape and torch.allclose(got, ref, atol=atol, rtol=1e-3)
                except Exception:  # noqa: BLE001 - a crash on the fast path is a failed check
                    ok = False
                if not ok and s.index not in failed:
                    failed.append(s.index)
        for s in todo:
            s.fast = s.index not in failed
            s.fast_reason = (
                "fast path verified at convert time"
                if s.fast
                else "the sliced fast path did not reproduce the masked path"
            )
    finally:
        for k, (w, b) in saved.items():
            bank.width[k].weight.copy_(w)
            bank.width[k].bias.copy_(b)
        bank.clear_cache()
    return failed
