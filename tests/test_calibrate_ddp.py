"""Two-process DDP calibration on CPU (gloo): torchrun, with accelerate inside ``calibrate``.

Slow: two fresh interpreters import torch and dynconvert, rendezvous and calibrate (about 15 s
on 2 cores), so it runs with ``pytest -m slow``.
"""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
from _launch import run_two

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    torch.set_num_threads(1)
    import dynconvert
    from accelerate import PartialState
    from dynconvert.calibration import CalibrationConfig, calibrate
    from dynconvert.testing import tiny_dit

    out = sys.argv[1]
    model = dynconvert.convert(tiny_dit(seed=0), budget=0.5)
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(8):
        x = torch.randn(8, 4, 8, 8, generator=g)
        if i == 2:
            x[5, 0, 0, 0] = float("nan")  # a row of rank 1 only: both ranks must skip together
        batches.append({"x": x, "y": torch.randint(0, 10, (8,), generator=g)})
    cfg = CalibrationConfig(
        target=0.5, steps=6, batch_size=8, lambda_hold_steps=0, warmup_steps=0, lr=1e-3,
        ema_decay=0.9, complete_model_steps=2, output_dir=out + "/run", checkpoint_every=3,
    )
    result = calibrate(model, batches, cfg)
    state = PartialState()
    torch.save(
        {
            "world": state.num_processes,
            "train": result.train_state_dict,
            "ema": result.model.state_dict(),
            "losses": result.losses,
            "skipped": result.skipped_nonfinite,
        },
        f"{out}/rank{state.process_index}.pt",
    )
    """
)


def test_two_process_ddp_on_cpu_ends_with_identical_weights(tmp_path):
    # torchrun (what `accelerate launch` uses for several GPUs); on CPU `accelerate launch --cpu`
    # needs mpirun for several processes, so the library asks accelerate for CPU itself.
    script = tmp_path / "run_ddp.py"
    script.write_text(SCRIPT)
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launcher += ["--master_addr", "127.0.0.1"]
    proc = run_two(launcher, "--master_port", script, [str(tmp_path)], timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["world"] == 2 and r1["world"] == 2
    for key in r0["train"]:
        assert torch.equal(r0["train"][key], r1["train"][key]), key
        assert torch.equal(r0["ema"][key], r1["ema"][key]), key
    assert len(r0["losses"]) == 6 and math.isnan(r0["losses"][2]) and math.isnan(r1["losses"][2])
    assert [v for i, v in enumerate(r0["losses"]) if i != 2] == [
        v for i, v in enumerate(r1["losses"]) if i != 2
    ]
    assert r0["skipped"] == r1["skipped"] == 1  # the non-finite step was skipped on both ranks
    # Training happened, and only rank 0 wrote the checkpoints (no temporary files left).
    from dynconvert.testing import tiny_dit

    start = tiny_dit(seed=0).state_dict()
    assert any(not torch.equal(start[k], r0["train"][k]) for k in start)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-0000006.pt"]  # step 3 was the non-finite one: no checkpoint then
