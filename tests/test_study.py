"""The quality study runner (benchmarks/quality_digits.py and the quality_* modules beside it): its
rows, schedules and smoke run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dynconvert.models import build_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location(
        "quality_digits", ROOT / "benchmarks" / "quality_digits.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_covers_every_method_seed_zero_first(study):
    settings = study.study_settings(study.main.__globals__["argparse"].Namespace(
        smoke=False, targets=[0.3, 0.5, 0.7], seeds_at_half=3, seeds=None, calibration_steps=400,
        batch_size=64, samples=1000, sample_steps=25))  # fmt: skip
    rows = study.plan_rows(settings, list(study.METHODS))
    assert len(rows) == len(set(rows))
    assert {m for m, _, _ in rows} == set(study.METHODS)
    first = [("original", 1.0, 0), ("fine-tuned", 1.0, 0)] + [
        (m, 0.5, 0) for m in study.METHODS[2:]
    ]
    assert rows[: len(first)] == first
    trained_at_half = len(study.TRAINED) - 1  # fine-tuned runs at 1.0
    seed1 = rows[len(first) : len(first) + 1 + trained_at_half]
    assert seed1[0] == ("fine-tuned", 1.0, 1) and {r[1:] for r in seed1[1:]} == {(0.5, 1)}
    assert ("dynamic", 0.5, 2) in rows and ("dynamic", 0.3, 1) not in rows
    assert ("cache", 0.5, 1) not in rows  # training-free methods are deterministic: one seed


def test_rows_have_the_issue_schema(study):
    settings = {"sample_steps": 25, "samples": 1000}
    row = study.infeasible_row("tokens-only", 0.3, 0, settings, "unreachable")
    assert set(study.ROW_KEYS) <= set(row)
    rows = [
        {"method": "dynamic", "target_flops": 0.5, "flops_ratio": 0.5, "seed": s, "steps": 25,
         "samples": 1000, "accuracy": 0.9 + s / 100, "frechet_distance": 10.0 + s}
        for s in range(3)
    ] + [row]  # fmt: skip
    (s,) = study.summary(rows)
    assert (s["seeds"], s["fd_mean"], s["fd_min"], s["fd_max"]) == (3, 11.0, 10.0, 12.0)
    assert "| dynamic | 0.5 |" in study.table(rows)
    json.dumps(rows)


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_cache_schedule_matches_the_budget(study, target):
    reuse = study.cache_schedule(25, target, 0.26)
    assert not reuse[0]  # the first step always runs in full
    ratio = (reuse.count(False) + 0.26 * reuse.count(True)) / 25
    assert abs(ratio - target) <= 0.74 / 25 / 2 + 1e-9


def test_first_block_cache_is_exact_without_reuse_and_reuses_the_residual(study):
    model = build_model("digits").eval()
    x, t, y = torch.randn(4, 1, 16, 16), torch.full((4,), 500), torch.arange(4)
    with torch.no_grad():
        ref = model(x, t, y)
        with study.first_block_cache(model, [False, False]):
            assert torch.allclose(model(x, t, y), ref, atol=1e-6)
        with study.first_block_cache(model, [False, True]):
            model(x, t, y)
            again = model(x, t, y)  # same input: the reused residual is exact
        assert torch.allclose(again, ref, atol=1e-5)
    assert len(model.blocks) == 4  # restored
    cost = study.cached_step_cost(model)
    assert 0.2 < cost < 0.4  # one of four blocks plus embeddings and the final layer


def test_smoke_study_runs_and_writes_rows(study, tmp_path):
    # The issue's smoke version, in the default suite: one method of each kind (training-free,
    # routed, statically pruned, cached), about 6 s; every method and the plots run in the slow
    # set (below).
    out = tmp_path / "q.json"
    methods = ["original", "dynamic", "static-pruning", "cache"]
    data = study.main(
        ["--smoke", "--out", str(out), "--quiet", "--no-plots", "--methods", *methods]
    )
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} == set(methods)
    for r in rows:
        assert set(study.ROW_KEYS) <= set(r), r
    assert data["summary"]
    (dyn,) = [r for r in rows if r["method"] == "dynamic"]  # thresholds fitted to the sampler
    assert dyn["sampling_budget"]["target"] == 0.5 and dyn["sampling_budget"]["kind"] == "token"
    assert "sampling_budget" not in next(r for r in rows if r["method"] == "static-pruning")
    again = study.main(
        ["--smoke", "--out", str(out), "--quiet", "--no-plots", "--methods", *methods]
    )
    assert len(again["rows"]) == len(rows)  # resumed: nothing ran twice


def test_a_cached_call_of_a_converted_model_counts_what_ran(study):
    # All routers on (a fresh conversion): a cached call of the converted model must cost what
    # the first-block cache costs on the original, counted by the flop counter (plus the tiny
    # token routers of the first block).
    import dynconvert

    original = build_model("digits").eval()
    model = dynconvert.convert(build_model("digits").eval(), budget=0.5)
    x, t, y = torch.randn(2, 1, 16, 16), torch.full((2,), 500), torch.arange(2)
    with torch.no_grad(), dynconvert.routing(model, "eval"):
        with study.first_block_cache(model, [False, True]) as rest:
            model(x, t, y)
            assert not rest.last_reused
            model(x, t, y)
            assert rest.last_reused
            ratio = study.cached_call_ratio(model)
    assert abs(ratio - study.cached_step_cost(original)) < 0.01, ratio


@pytest.mark.slow
def test_smoke_dynamic_cache_row_spends_its_budget(study, tmp_path):
    out = tmp_path / "dc.json"
    study.main(
        ["--smoke", "--out", str(out), "--quiet", "--no-plots", "--methods", "dynamic+cache"]
    )
    (row,) = json.loads(out.read_text())["rows"]
    assert row["dynamic_target"] == 0.6667 and row["cached_steps"] > 0  # routed at 0.5 / 0.75
    assert row["full_step_target"] > 0.5 and abs(row["flops_ratio"] - 0.5) < 0.05


@pytest.mark.slow
def test_smoke_study_in_parallel_gives_the_same_rows_and_plots(study, tmp_path):
    import subprocess
    import sys

    serial = study.main(["--smoke", "--out", str(tmp_path / "a.json"), "--quiet", "--no-plots"])
    out = tmp_path / "b.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality_digits.py"), "--smoke", "--jobs", "2",
           "--out", str(out), "--quiet"]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=600)
    parallel = json.loads(out.read_text())
    assert {r["method"] for r in parallel["rows"]} == set(study.METHODS)
    for r in parallel["rows"]:
        assert set(study.ROW_KEYS) <= set(r), r
    assert (tmp_path / "b_fd.png").is_file() and (tmp_path / "b_profile.png").is_file()

    def key(rows):
        return sorted((r["method"], r["seed"], r["accuracy"], r["frechet_distance"]) for r in rows)

    assert key(parallel["rows"]) == key(serial["rows"])  # rows do not depend on the process


@pytest.mark.slow
def test_smoke_study_runs_on_translated_digits(study, tmp_path):
    out = tmp_path / "t.json"
    data = study.main(["--smoke", "--benchmark", "translated", "--out", str(out), "--quiet",
                       "--no-plots", "--methods", "original", "dynamic", "cache"])  # fmt: skip
    assert data["settings"]["benchmark"] == "translated"
    assert {r["method"] for r in data["rows"]} == {"original", "dynamic", "cache"}
