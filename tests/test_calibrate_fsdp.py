"""Two-process FSDP2 calibration on CPU (gloo), launched as users do: ``accelerate launch
--config_file examples/accelerate/fsdp.yaml``. It shards (one unit per block, DTensor
parameters), keeps the EMA sharded, is killed and resumed exactly from sharded checkpoints, and
ends with the weights of the two-process DDP run (``ddp.yaml``); a full checkpoint written by
FSDP is resumed by DDP.

Slow: each launch starts two interpreters (about 20 s on 2 cores).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from _launch import REPO, run_two

pytestmark = pytest.mark.slow

CONFIGS = REPO / "examples" / "accelerate"

SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch
    torch.set_num_threads(1)
    import dynconvert
    from accelerate import PartialState
    from dynconvert.calibration import CalibrationConfig, calibrate
    from dynconvert.testing import tiny_dit

    out, steps = sys.argv[1], int(sys.argv[2])
    resume, kill_at = sys.argv[3] == "1", int(sys.argv[4])
    model = dynconvert.convert(tiny_dit(seed=0), budget=0.5)
    g = torch.Generator().manual_seed(0)
    batches = [
        {"x": torch.randn(8, 4, 8, 8, generator=g), "y": torch.randint(0, 10, (8,), generator=g)}
        for _ in range(8)
    ]

    def on_step(info):
        if info.step == kill_at:  # the kernel's SIGKILL: no cleanup, no last checkpoint
            os.kill(os.getpid(), 9)

    cfg = CalibrationConfig(
        target=0.5, steps=steps, batch_size=8, lambda_hold_steps=0, warmup_steps=0, lr=1e-3,
        ema_decay=0.9, output_dir=out + "/run", checkpoint_every=2, resume=resume,
    )
    result = calibrate(model, batches, cfg, on_step=on_step)
    state = PartialState()
    weight = dict(model.named_parameters())["blocks.0.mlp.fc1.weight"]
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    torch.save({"local_rows": local.shape[0], "rows": weight.shape[0], "world": state.num_processes,
                "is_none": result.model is None}, f"{out}/shape{state.process_index}.pt")
    if state.is_main_process:
        torch.save({"train": result.train_state_dict, "ema": result.model.state_dict(),
                    "losses": result.losses}, f"{out}/result.pt")
    """
)


def launch(config: Path, out: Path, steps: int, resume: bool = False, kill_at: int = 0):
    """``accelerate launch --config_file config --num_processes 2 script out ...`` (900 s: one
    launch took over 300 s on the shared 2-core machine at load 25)."""
    out.mkdir(parents=True, exist_ok=True)
    script = out.parent / "run_calibration.py"
    script.write_text(SCRIPT)
    launcher = ["-m", "accelerate.commands.launch", "--config_file", str(config)]
    launcher += ["--num_processes", "2"]
    args = [str(out), str(steps), "1" if resume else "0", str(kill_at)]
    return run_two(launcher, "--main_process_port", script, args, timeout=900)


def result(out: Path) -> dict:
    return torch.load(out / "result.pt", weights_only=True)


def assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    for part in ("train", "ema"):
        assert set(a[part]) == set(b[part])
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], atol=atol, rtol=0, msg=k)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Four FSDP steps in one go, sharded checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("fsdp") / "straight"
    proc = launch(CONFIGS / "fsdp.yaml", out, 4)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_fsdp_shards_blocks_and_the_ema(straight):
    for rank in (0, 1):
        shape = torch.load(straight / f"shape{rank}.pt", weights_only=True)
        assert shape["world"] == 2 and shape["local_rows"] * 2 == shape["rows"]  # sharded
        assert shape["is_none"] == (rank == 1)  # the result is gathered on the main process
    step = straight / "run" / "checkpoints" / "step-0000004"
    assert (step / "meta.pt").is_file() and len(list(step.glob("*.distcp"))) == 2
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(step)).read_metadata().state_dict_metadata
    ema = {k: v for k, v in metadata.items() if k.startswith("ema.")}
    import dynconvert
    from dynconvert.testing import tiny_dit

    model = dynconvert.convert(tiny_dit(seed=0), budget=0.5)
    trained = {f"ema.{n}" for n, p in model.named_parameters() if p.requires_grad}
    assert ema.keys() == trained
    for key, meta in ema.items():  # every process wrote its own rows: not replicated
        if meta.size[0] >= 2:
            assert len(meta.chunks) == 2, key
            assert sorted(c.offsets[0] for c in meta.chunks)[1] > 0, key


def test_fsdp_killed_and_resumed_ends_exactly_as_straight(straight, tmp_path):
    out = tmp_path / "killed"
    killed = launch(CONFIGS / "fsdp.yaml", out, 4, kill_at=3)
    assert killed.returncode != 0
    assert sorted(p.name for p in (out / "run" / "checkpoints").iterdir()) == ["step-0000002"]
    resumed = launch(CONFIGS / "fsdp.yaml", out, 4, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert_same(result(out), result(straight))
    assert result(out)["losses"] == result(straight)["losses"]


def test_fsdp_matches_ddp_and_its_full_checkpoint_resumes_under_ddp(straight, tmp_path):
    ddp = launch(CONFIGS / "ddp.yaml", tmp_path / "ddp", 4)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    assert_same(result(tmp_path / "ddp"), result(straight), atol=1e-5)
    full = tmp_path / "fsdp_full.yaml"
    full.write_text(
        (CONFIGS / "fsdp.yaml").read_text().replace("SHARDED_STATE_DICT", "FULL_STATE_DICT")
    )
    out = tmp_path / "moved"
    first = launch(full, out, 2)
    assert first.returncode == 0, first.stderr[-4000:]
    assert sorted(p.name for p in (out / "run" / "checkpoints").iterdir()) == ["step-0000002.pt"]
    second = launch(CONFIGS / "ddp.yaml", out, 4, resume=True)  # the same file DDP writes
    assert second.returncode == 0, second.stderr[-4000:]
    assert_same(result(out), result(straight), atol=1e-5)
