"""save -> load round trips, and every bad folder raises its RecordError."""

from __future__ import annotations

import json

import pytest
import torch

import dynconvert
from dynconvert.io.save import decode_masks, encode_masks, load, save
from dynconvert.testing import call, randomize_routing, tiny_diffusers_dit, tiny_dit, tiny_uvit


def _converted(builder, **kw):
    model = builder()
    dynconvert.convert(model, 0.5)
    randomize_routing(model, keep=0.5, seed=4)
    return model


def test_round_trip_builtin_preset(tmp_path):
    model = _converted(tiny_dit)
    inputs = model.example_inputs(batch_size=3)
    expected = call(model, inputs)
    save(model, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "dynconvert.json").read_text())
    assert record["preset"] == "dit-tiny" and record["format_version"] == 2
    assert len(record["flops_ratio_per_t"]) == 1000 and 0 < record["mean_flops_ratio"] < 1
    loaded = load(tmp_path / "run")  # base rebuilt from the preset
    torch.testing.assert_close(call(loaded, inputs), expected, atol=0, rtol=0)
    bank, bank2 = dynconvert.get_state(model), dynconvert.get_state(loaded)
    assert torch.equal(bank.always_on, bank2.always_on)
    for i, table in bank.width_table().items():
        assert torch.equal(decode_masks(record["width_masks"][str(i)]), table.cpu())


def test_round_trip_diffusers_model_with_fresh_base(tmp_path):
    model = _converted(tiny_diffusers_dit)
    inputs = {
        "hidden_states": torch.randn(2, 4, 8, 8),
        "timestep": torch.tensor([3, 700]),
        "class_labels": torch.tensor([1, 2]),
    }
    expected = call(model, inputs)
    save(model, tmp_path)
    # No base model: a diffusers model is rebuilt from the config.json save writes beside it.
    torch.testing.assert_close(call(load(tmp_path), inputs), expected, atol=0, rtol=0)
    # Another init: every weight must come from the file.
    loaded = load(tmp_path, tiny_diffusers_dit(seed=123))
    torch.testing.assert_close(call(loaded, inputs), expected, atol=0, rtol=0)


def test_mask_run_length_encoding():
    table = torch.zeros(1000, 3, dtype=torch.bool)
    table[:400, 0] = True
    table[700:, 2] = True
    segments = encode_masks(table)
    assert len(segments) == 3
    assert torch.equal(decode_masks(segments), table)


def test_record_from_another_model(tmp_path):
    save(_converted(tiny_dit), tmp_path)
    with pytest.raises(dynconvert.RecordError, match="is for dynconvert.models.dit.DiT"):
        load(tmp_path, tiny_uvit())
    other_depth = tiny_dit(depth=1)
    with pytest.raises(dynconvert.RecordError, match="another model"):
        load(tmp_path, other_depth)
    assert not dynconvert.is_converted(other_depth)


def test_newer_format_and_corrupt_record(tmp_path):
    save(_converted(tiny_dit), tmp_path)
    path = tmp_path / "dynconvert.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "format_version": 99}))
    with pytest.raises(
        dynconvert.RecordError, match="newer than this dynconvert supports.*upgrade"
    ):
        load(tmp_path)
    path.write_text(json.dumps(record)[: len(json.dumps(record)) // 2])
    with pytest.raises(dynconvert.RecordError, match="corrupt"):
        load(tmp_path)
    path.write_text("{}")
    with pytest.raises(dynconvert.RecordError, match="not a dynconvert record"):
        load(tmp_path)


def test_truncated_or_missing_weights(tmp_path):
    save(_converted(tiny_dit), tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    base = tiny_dit()
    with pytest.raises(dynconvert.RecordError, match="truncated"):
        load(tmp_path, base)
    assert not dynconvert.is_converted(base)
    weights.unlink()
    with pytest.raises(dynconvert.RecordError, match="missing"):
        load(tmp_path)
    with pytest.raises(dynconvert.RecordError, match="no dynconvert.json"):
        load(tmp_path / "nowhere")


def test_save_leaves_no_temporary_files(tmp_path):
    save(_converted(tiny_dit), tmp_path)
    save(_converted(tiny_dit), tmp_path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dynconvert.json", "model.safetensors"]


def test_a_record_may_name_its_class_by_an_older_path(tmp_path):
    # Modules move (dynconvert.models.patterns -> dynconvert.testing.patterns, then split by
    # family): a record written under an older path still names the same class.
    from dynconvert.io.restore import check_base
    from dynconvert.testing.patterns import rotary_dit

    model, _ = rotary_dit()
    here = f"{type(model).__module__}.RotaryDiT"
    for path in ("dynconvert.models.patterns.RotaryDiT", "dynconvert.testing.patterns.RotaryDiT"):
        check_base(model, {"model_class": path}, tmp_path)
    for path in ("dynconvert.testing.patterns.MMDiT", "other.patterns.RotaryDiT", "dynconvert.x.Y"):
        with pytest.raises(
            dynconvert.RecordError, match=f"is for {path}, but base_model is {here}"
        ):
            check_base(model, {"model_class": path}, tmp_path)


def test_load_follows_a_moved_class(tmp_path, monkeypatch):
    import sys
    import types

    model = _converted(tiny_dit)
    save(model, tmp_path)
    path = tmp_path / "dynconvert.json"
    record = json.loads(path.read_text())
    old = types.ModuleType("dynconvert.models.old_dit")  # where DiT lived in an older release
    old.DiT = type(model)
    monkeypatch.setitem(sys.modules, old.__name__, old)
    path.write_text(json.dumps({**record, "model_class": "dynconvert.models.old_dit.DiT"}))
    inputs = model.example_inputs(batch_size=2)
    torch.testing.assert_close(call(load(tmp_path), inputs), call(model, inputs), atol=0, rtol=0)


@pytest.mark.slow  # a fresh interpreter that imports torch and diffusers
def test_a_submodule_import_still_registers_the_diffusers_integration():
    # `from dynconvert.io.save import ...` sets dynconvert.convert without the package's
    # first-use hook: the io package itself registers save_pretrained's record.
    import subprocess
    import sys

    code = (
        "import dynconvert.io.save, dynconvert\n"
        "from dynconvert.testing import tiny_pixart\n"
        "m = dynconvert.convert(tiny_pixart(), 0.5)\n"
        "assert 'save_pretrained' in m.__dict__, 'no diffusers integration'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
