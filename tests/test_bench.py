"""benchmark(): the documented result object, synthetic routing at a FLOPs ratio, honest counts."""

from __future__ import annotations

import pytest

import dynconvert
from dynconvert.measure.bench import BenchResult, benchmark
from dynconvert.runtime.synthetic import synthetic_routing
from dynconvert.testing import tiny_dit


def test_benchmark_reports_every_documented_field(bench_keys):
    r = benchmark(tiny_dit(), keep=0.5, batch=2, repeats=2)
    d = r.to_dict()
    assert bench_keys <= set(d)
    assert d["batch"] == 2 and d["device"] == "cpu" and d["dtype"] == "float32"
    assert d["flops_ratio"] == pytest.approx(0.5, abs=0.06)
    assert d["executed_flops_ratio"] == pytest.approx(d["flops_ratio"], rel=0.02)
    assert d["efficiency"] == pytest.approx(d["speedup"] * d["flops_ratio"])
    assert d["peak_mem_static_bytes"] > 0 and d["peak_mem_dynamic_bytes"] > 0
    assert len(d["times_static_s"]) == 2 and d["time_static_s"] > 0


def test_benchmark_of_a_converted_model_uses_its_routing():
    model = dynconvert.convert(tiny_dit(), 0.5)
    r = benchmark(model, batch=2, repeats=1, count=False, memory=False)
    assert isinstance(r, BenchResult) and r.routing == "learned"
    assert r.flops_ratio == pytest.approx(1.0, abs=0.02)  # fresh routers: everything on (+ routers)
    assert r.executed_flops_ratio is None and r.peak_mem_dynamic_bytes is None


@pytest.mark.parametrize("target", [0.35, 0.5, 0.8])
def test_synthetic_routing_hits_the_ratio(target):
    model = tiny_dit()
    inputs = model.example_inputs(batch_size=4)
    dynconvert.convert(model, 0.3, example_inputs=inputs)
    synthetic_routing(model, target, tokens=0.7, inputs=inputs)
    model(*inputs)
    ratio = float(dynconvert.last_flops_ratio(model).mean())
    assert ratio == pytest.approx(target, abs=0.06)


def test_bad_benchmark_arguments():
    with pytest.raises(dynconvert.ConfigError, match="dtype"):
        benchmark(tiny_dit(), keep=0.5, dtype="int8")
    with pytest.raises(dynconvert.ConfigError, match="keep="):
        benchmark(tiny_dit())
