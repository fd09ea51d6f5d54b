"""The reliability catalogue: a run killed with SIGKILL at each file operation resumes exactly.

A child process runs a 4-step calibration and kills itself (SIGKILL: no handler, no cleanup)
just before its N-th file operation (``dynconvert.io.files.fault_hook``), for every N among the
operations of a checkpoint (each create, write, fsync and rename of both checkpoints, and the
pruning of the first) and at the save and report after the last one; then a resume runs to the
end. Every resumed run must hold the uninterrupted run's weights bit for bit, whatever the
instant. (All 37 operations of this run were checked once by hand the same way on 2026-12-08,
the run.json writes before the first checkpoint included: those leave nothing to resume, the
resume is refused in one line and a fresh start works.)

The runs are forked from one process that imported torch once (about 2.5 CPU s per kill and
resume on a tiny DiT); slow set.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from test_reliability import SETS

pytestmark = pytest.mark.slow

KILLS = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    from safetensors.torch import load_file
    from dynconvert.errors import DynconvertError
    from dynconvert.io import files
    from dynconvert.runs import RunRequest, convert_run

    root, sets = sys.argv[1], sys.argv[2:]

    def request(out, resume=False):
        return RunRequest(model="dit-tiny", target_flops=0.5, data="synthetic", steps=4,
                          random_init=True, device="cpu", out=out, resume=resume,
                          overrides=sets)

    def forked(fn):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                fn()
            except DynconvertError as e:
                print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
                code = 1
            except BaseException:
                code = 2
            os._exit(code)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    ops = []
    def count():
        files.fault_hook = lambda op, path: ops.append((op, os.path.relpath(path, root + "/a")))
        convert_run(request(root + "/a"))
        with open(root + "/ops.json", "w") as f:
            json.dump(ops, f)
    assert forked(count) == 0
    ops = json.load(open(root + "/ops.json"))
    straight = load_file(root + "/a/model.safetensors")
    # Every operation on a checkpoint (its writes and the pruning), the first of the save that
    # follows the last checkpoint, the save's commit, and the report: each instant kind once.
    last_ckpt = max(i for i, (_, p) in enumerate(ops) if p.startswith("checkpoints"))
    chosen = [i for i, (op, p) in enumerate(ops)
              if p.startswith("checkpoints") or i == last_ckpt + 1
              or (op == "rename" and p in ("model.safetensors", "report.json"))]
    results = []
    for n in chosen:
        op, path = ops[n]
        out = f"{root}/k{n}"
        def killed(n=n):
            seen = []
            def hook(op, path):
                if len(seen) == n:
                    os.kill(os.getpid(), signal.SIGKILL)
                seen.append(op)
            files.fault_hook = hook
            convert_run(request(out))
        killed_code = forked(killed)
        resumed = forked(lambda: convert_run(request(out, resume=True)))
        weights = out + "/model.safetensors"
        same = None
        if os.path.exists(weights):
            w = load_file(weights)
            same = w.keys() == straight.keys() and all(torch.equal(w[k], straight[k]) for k in w)
            differ = [k for k in w if k not in straight or not torch.equal(w[k], straight[k])]
        results.append({"n": n, "op": op, "path": path, "killed": killed_code,
                        "resumed": resumed, "same": same,
                        "differ": differ[:4] if same is False else []})
    print(json.dumps(results))
    """
)


def test_a_kill_at_each_file_operation_of_a_run_resumes_to_the_uninterrupted_weights(tmp_path):
    sets = [f"{k}={v}" for k, v in SETS.items()] + ["calibration.keep_checkpoints=1"]
    done = subprocess.run(
        [sys.executable, "-c", KILLS, str(tmp_path), *sets],
        capture_output=True, text=True, timeout=1500, env={"OMP_NUM_THREADS": "1", **_env()},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    ops = [(r["op"], r["path"]) for r in results]
    # Every kind of instant is covered: both checkpoints, the pruning, the save, the report.
    wanted = [("rename", "checkpoints/step-0000002.pt"), ("write", "checkpoints/step-0000004.pt"),
              ("remove", "checkpoints/step-0000002.pt"), ("rename", "model.safetensors"),
              ("rename", "report.json")]  # fmt: skip
    assert set(wanted) <= set(ops), ops
    for r in results:
        assert (r["killed"], r["resumed"], r["same"]) == (-9, 0, True), r


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
