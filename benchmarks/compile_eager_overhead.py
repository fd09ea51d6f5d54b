"""What the compile-friendly fast path costs eager calls: the per-call time of a converted tiny
DiT on the fast path with and without the ``eager_now`` checks (runtime/compiled.py), measured
in one process, alternating, median.

Run: python benchmarks/compile_eager_overhead.py [--depth 2] [--rounds 60] [--calls 20]

(torch.set_num_threads(1): the thread CPU time then covers the whole call.)

The "before" variant is the same methods with their ``eager_now`` check removed (the source of
each, minus its two check lines, compiled again in its module), so both variants run the same
code otherwise. Prints one JSON object: median seconds per call of each and their ratio.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import textwrap
import time

import torch

import dynconvert
from dynconvert.inputs import default_inputs, split_inputs, with_timestep
from dynconvert.runtime import attention, dynamic, heads
from dynconvert.testing import randomize_routing, tiny_dit

PATCHED = [
    (dynamic, dynamic.DynamicLinear, "forward"),
    (attention, attention.AttentionRuntime, "pre_hook"),
    (attention, attention.AttentionRuntime, "post_hook"),
    (heads, heads._HeadCount, "__get__"),
]


def without_check(module, cls, name):
    """``cls.name`` recompiled from its source without the ``eager_now`` check and its return."""
    lines = textwrap.dedent(inspect.getsource(getattr(cls, name))).splitlines()
    keep, skip = [], False
    for line in lines:
        if "eager_now(" in line:
            skip = True  # the check, then the return line under it
            continue
        if skip:
            skip = False
            continue
        keep.append(line)
    assert "eager_now" not in "\n".join(keep) and len(keep) < len(lines)
    scope = dict(vars(module))
    exec(compile("\n".join(keep), inspect.getsourcefile(module), "exec"), scope)  # noqa: S102
    return scope[name]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = tiny_dit(depth=args.depth)
    inputs = default_inputs(model, batch_size=2)
    dynconvert.convert(model, 0.5, example_inputs=inputs)
    randomize_routing(model, keep=0.5, seed=3, example_inputs=inputs)
    dynconvert.set_routing(model, "eval", "fast")
    call_args, call_kwargs = split_inputs(with_timestep(model, inputs, [500, 500]))
    after = {(cls, name): getattr(cls, name) for _, cls, name in PATCHED}
    before = {(cls, name): without_check(mod, cls, name) for mod, cls, name in PATCHED}
    times = {"before": [], "after": []}
    cpu = {"before": [], "after": []}  # thread CPU time: less disturbed on a shared machine
    with torch.no_grad():
        outs = {}
        for label, variant in (("before", before), ("after", after)):
            for (cls, name), fn in variant.items():
                setattr(cls, name, fn)
            outs[label] = model(*call_args, **call_kwargs)
        assert torch.equal(outs["before"], outs["after"])
        for _ in range(args.rounds):
            for label, variant in (("before", before), ("after", after)):
                for (cls, name), fn in variant.items():
                    setattr(cls, name, fn)
                start, start_cpu = time.perf_counter(), time.thread_time()
                for _ in range(args.calls):
                    model(*call_args, **call_kwargs)
                times[label].append((time.perf_counter() - start) / args.calls)
                cpu[label].append((time.thread_time() - start_cpu) / args.calls)
    for (cls, name), fn in after.items():
        setattr(cls, name, fn)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    result = {
        "model": f"tiny DiT, depth {args.depth}, batch 2, t=500, fast path, keep 0.5",
        "rounds": args.rounds,
        "calls_per_round": args.calls,
        "median_s_per_call": med,
        "ratio_after_over_before": med["after"] / med["before"],
        "median_cpu_s_per_call": med_cpu,
        "cpu_ratio_after_over_before": med_cpu["after"] / med_cpu["before"],
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
