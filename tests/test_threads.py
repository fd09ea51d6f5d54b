"""Threads calling one converted model at once get exactly what each call gets alone (issue 23,
item 4): the routing mode, the per-call decisions, the head counts of a sliced call and the
FLOPs records live in the call, and ``with dynconvert.routing(...)`` applies to its own thread."""

from __future__ import annotations

import threading

import pytest
import torch

import dynconvert
from dynconvert.inputs import default_inputs
from dynconvert.testing import call, randomize_routing, tiny_pixart

THREADS, CALLS = 8, 50
# (routing mode, execution): None follows the model's defaults (eval, fast after set_routing).
SETTINGS = [("eval", "fast"), ("eval", "masked"), ("eval", "planned"), ("full", None), (None, None)]
TIMESTEPS = [[999.0, 999.0], [10.0, 10.0], [500.0, 10.0], [250.0, 900.0]]  # mixed within a batch


@pytest.fixture(scope="module")
def routed():
    """A tiny PixArt (diffusers attention: the head count is the module's ``heads``), converted,
    with random routing that changes with t, and its inputs without the timestep."""
    model = tiny_pixart()
    inputs = default_inputs(model, batch_size=2)
    dynconvert.convert(model, 0.5, example_inputs=inputs)
    randomize_routing(model, keep=0.5, example_inputs=inputs)
    dynconvert.set_routing(model, "eval", execution="fast")
    return model, inputs


def _run(model, inputs, job):
    """One call in the job's settings: (output, the FLOPs ratio of that call per sample)."""
    (mode, execution), t = SETTINGS[job[0]], TIMESTEPS[job[1]]
    args, kwargs = inputs
    kwargs = {**kwargs, "timestep": torch.tensor(t)}
    with torch.no_grad(), dynconvert.routing(model, mode, execution):
        out = call(model, (args, kwargs))
        return out, dynconvert.last_flops_ratio(model).tolist()  # per sample


def test_eight_threads_calling_one_model_equal_the_serial_calls(routed, one_thread):
    model, inputs = routed
    jobs = [(s, t) for s in range(len(SETTINGS)) for t in range(len(TIMESTEPS))]
    serial = {job: _run(model, inputs, job) for job in jobs}
    # Different settings really differ, so a call that took another thread's routing shows.
    assert not torch.equal(serial[(0, 0)][0], serial[(3, 0)][0])
    assert max(serial[(0, 0)][1]) < 1.0 and set(serial[(3, 0)][1]) == {1.0}
    assert not torch.equal(serial[(0, 0)][0], serial[(0, 1)][0])

    results: dict[int, list] = {}
    barrier = threading.Barrier(THREADS)

    def worker(k: int) -> None:
        order = [jobs[(k * 7 + 3 * i) % len(jobs)] for i in range(CALLS)]  # each thread its own
        barrier.wait()
        results[k] = [(job, *_run(model, inputs, job)) for job in order]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(results) == list(range(THREADS))  # no thread raised
    wrong = [
        (k, job)
        for k, rows in results.items()
        for job, out, ratio in rows
        if not torch.equal(out, serial[job][0]) or ratio != serial[job][1]
    ]
    assert not wrong, f"{len(wrong)} of {THREADS * CALLS} calls differ from the serial ones"
    bank = dynconvert.get_state(model)
    assert (bank.mode, bank.execution) == ("eval", "fast")  # no thread's override left behind
    heads = [m.heads for m in model.modules() if hasattr(m, "heads") and isinstance(m.heads, int)]
    assert heads and all(h == heads[0] for h in heads)  # the held head counts, none lowered


def test_routing_is_per_thread_and_set_routing_is_for_every_thread(routed):
    model, inputs = routed
    bank = dynconvert.get_state(model)
    inside, entered, leave = [], threading.Event(), threading.Event()

    def other() -> None:
        with dynconvert.routing(model, "full"):
            inside.append(bank.settings_now().mode)
            entered.set()
            leave.wait(10)
        inside.append(bank.settings_now().mode)

    th = threading.Thread(target=other)
    th.start()
    entered.wait(10)
    assert bank.settings_now().mode == "eval"  # this thread does not see the other's block
    with dynconvert.routing(model, "eval", execution="masked"):
        assert bank.settings_now().execution.name == "masked"
        leave.set()
        th.join()
    assert inside == ["full", "eval"]
    assert bank.settings_now()[:2] == (bank.mode, bank._execution)  # (budget: the model's)
    with dynconvert.routing(model, "full"):
        dynconvert.set_routing(model, "eval", execution="masked")  # the default, for all
        assert bank.settings_now().mode == "full"  # the block still wins in its thread
    assert bank.execution == "masked"
    dynconvert.set_routing(model, "eval", execution="fast")
