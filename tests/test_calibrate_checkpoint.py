"""Checkpoint files (atomic, latest, prune, corrupt), RNG capture, per-step seeding, and the EMA."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from dynconvert.calibration.checkpoint import (
    capture_rng,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
    seed_step,
)
from dynconvert.calibration.ema import EMA
from dynconvert.errors import CheckpointError


def test_save_is_atomic_and_latest_is_found(tmp_path):
    for step in (5, 20, 10):
        save_checkpoint(
            checkpoint_path(tmp_path, step), {"step": step, "w": torch.full((2,), float(step))}
        )
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 10, 20]
    assert latest_checkpoint(tmp_path).name == "step-0000020.pt"
    payload = load_checkpoint(latest_checkpoint(tmp_path))
    assert payload["step"] == 20 and payload["format"] == "dynconvert-calibration"
    assert torch.equal(payload["w"], torch.full((2,), 20.0))
    # No temporary files are left behind, and a stray temp file is not taken for a checkpoint.
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [
        "step-0000005.pt",
        "step-0000010.pt",
        "step-0000020.pt",
    ]
    (folder / ".step-0000030.pt.123.tmp").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).name == "step-0000020.pt"
    assert [p.name for p in prune_checkpoints(tmp_path, keep=2)] == ["step-0000005.pt"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10, 20]


def test_save_failure_leaves_no_file(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(checkpoint_path(tmp_path, 1), {"step": 1})
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_corrupt_and_foreign_checkpoints(tmp_path):
    bad = checkpoint_path(tmp_path, 1)
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(bad)
    torch.save({"step": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a dynconvert"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    save_checkpoint(tmp_path / "new.pt", {"step": 1})
    payload = torch.load(tmp_path / "new.pt", weights_only=True)
    payload["version"] = 99
    torch.save(payload, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(tmp_path / "new.pt")


def test_rng_capture_survives_a_checkpoint(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    save_checkpoint(tmp_path / "r.pt", {"rng": [capture_rng()]})
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    restore_rng(load_checkpoint(tmp_path / "r.pt")["rng"][0])
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_seed_step_depends_on_seed_rank_and_step():
    def draw(seed, rank, step):
        seed_step(seed, rank, step)
        return torch.rand(4), random.random(), float(np.random.rand())

    a = draw(0, 0, 10)
    assert torch.equal(a[0], draw(0, 0, 10)[0]) and a[1:] == draw(0, 0, 10)[1:]
    for other in (draw(1, 0, 10), draw(0, 1, 10), draw(0, 0, 11)):
        assert not torch.equal(a[0], other[0])


def test_ema_matches_dit_update_and_round_trips():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[1].bias.requires_grad_(False)
    ema = EMA(model, decay=0.9)
    assert set(ema.shadow) == {"0.weight", "0.bias", "1.weight"}
    start = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for name, p in model.named_parameters():
        if name in start:
            assert torch.allclose(ema.shadow[name], 0.9 * start[name] + 0.1 * p, atol=1e-6)
    state = ema.state_dict()
    other = EMA(model, decay=0.5)
    other.load_state_dict(state)
    assert other.decay == 0.9 and other.num_updates == 1
    assert all(torch.equal(other.shadow[k], ema.shadow[k]) for k in ema.shadow)
    target = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    other.copy_to(target)
    assert torch.equal(target[0].weight, ema.shadow["0.weight"])
    with pytest.raises(CheckpointError, match="EMA"):
        EMA(nn.Linear(3, 4)).load_state_dict(state)


def test_ema_warmup_decay():
    ema = EMA(nn.Linear(1, 1), decay=0.9999, warmup=True)
    assert ema.current_decay() == pytest.approx(0.1)
    ema.num_updates = 90
    assert ema.current_decay() == pytest.approx(91 / 100)
    ema.num_updates = 10**7
    assert ema.current_decay() == 0.9999
