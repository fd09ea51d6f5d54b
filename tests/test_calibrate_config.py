"""CalibrationConfig: paper defaults, validation naming the field, unknown keys, round trip."""

from __future__ import annotations

import dataclasses

import pytest

from dynconvert.calibration.config import CalibrationConfig, as_config
from dynconvert.errors import ConfigError


def test_defaults_are_the_papers():
    cfg = CalibrationConfig(target=0.5)
    assert cfg.batch_size == 256 and cfg.lr == 1e-4 and cfg.weight_decay == 0.0
    assert cfg.flops_weight == 2.0
    assert cfg.lambda_hold_steps == 100 and cfg.warmup_steps == 1000
    assert cfg.ema_decay == 0.9999 and cfg.grad_clip == 1.0
    assert cfg.timestep_strata == 4 and cfg.trainable == "all"
    assert cfg.complete_model_steps == 0 and cfg.max_nonfinite_in_a_row == 5
    assert cfg.adam_betas == (0.9, 0.999) and cfg.version == 1


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        CalibrationConfig.from_dict({"target": 0.5, "learning_rate": 1e-4})
    msg = str(err.value)
    assert "learning_rate" in msg and "valid keys" in msg
    for name in ("lr", "flops_weight", "warmup_steps", "ema_decay", "target"):
        assert name in msg


def test_missing_target():
    with pytest.raises(ConfigError, match="target"):
        CalibrationConfig.from_dict({"steps": 10})


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("target", 0.0, "target"),
        ("target", 1.5, "target"),
        ("target", "half", "target"),
        ("steps", 0, "steps"),
        ("batch_size", 2.5, "batch_size"),
        ("lr", -1.0, "lr"),
        ("ema_decay", 1.0, "ema_decay"),
        ("mixed_precision", "fp8", "no, bf16, fp16"),
        ("objective", "x0", "auto, eps, v, flow"),
        ("beta_schedule", "cosine", "linear, scaled_linear"),
        ("trainable", "base", "all, routers"),
        ("adapter", "sd3", "pixart"),
        ("flow_t_dist", "beta", "logit_normal"),
        ("label_dropout", 1.0, "label_dropout"),
        ("adam_betas", (0.9,), "adam_betas"),
        ("grad_clip", 0.0, "grad_clip"),
        ("max_nonfinite_in_a_row", 0, "max_nonfinite_in_a_row"),
        ("version", 99, "newer"),
    ],
)
def test_bad_values_name_the_field(field, value, needle):
    with pytest.raises(ConfigError, match=needle):
        CalibrationConfig(**{"target": 0.5, field: value})


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="distill_weight"):
        CalibrationConfig(target=0.5, diffusion_weight=0.0)
    with pytest.raises(ConfigError, match="output_dir"):
        CalibrationConfig(target=0.5, resume=True)
    CalibrationConfig(target=0.5, diffusion_weight=0.0, distill_weight=1.0)
    CalibrationConfig(target=0.5, grad_clip=None, skip_grad_norm=None)


def test_round_trip_and_as_config():
    cfg = CalibrationConfig(target=0.7, lr=2.5e-5, warmup_steps=5000, adapter_args={"x": "sample"})
    again = CalibrationConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert as_config(cfg.to_dict()) == cfg and as_config(cfg) is cfg
    with pytest.raises(ConfigError):
        as_config(0.5)
    assert {f.name for f in dataclasses.fields(cfg)} == set(cfg.to_dict())


def test_resume_mismatch_allows_only_run_length_and_io():
    base = CalibrationConfig(target=0.5, steps=10, output_dir="a")
    same = CalibrationConfig(target=0.5, steps=50, output_dir="b", resume=True, checkpoint_every=7)
    assert same.resume_mismatch(base.to_dict()) == []
    other = CalibrationConfig(target=0.4, steps=10, seed=3, output_dir="a")
    assert other.resume_mismatch(base.to_dict()) == ["seed", "target"]
