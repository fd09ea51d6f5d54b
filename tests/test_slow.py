"""Full-size and CUDA checks, out of the default run (``pytest -m slow``, ``pytest -m gpu``)."""

from __future__ import annotations

import time

import pytest
import torch

import dynconvert
from dynconvert.flops import count_flops, measure_macs
from dynconvert.inputs import default_inputs
from dynconvert.models import build_model
from dynconvert.runtime.synthetic import synthetic_routing
from dynconvert.testing import TINY_BUILDERS, call, randomize_routing


@pytest.mark.slow
def test_dit_xl_converts_quickly_and_fast_path_matches():
    torch.manual_seed(0)
    model = build_model("DiT-XL/2").eval()
    x, _, y = model.example_inputs(batch_size=2)
    inputs = (x, torch.tensor([500.0, 500.0]), y)
    start = time.perf_counter()
    dynconvert.convert(model, 0.5, example_inputs=inputs)
    assert time.perf_counter() - start < 60  # about 7 s on 2 cores
    synthetic_routing(model, 0.5, tokens=0.7, inputs=inputs)
    with torch.no_grad():
        fast = model(*inputs)
        with dynconvert.routing(model, "eval", "masked"):
            masked = model(*inputs)
    torch.testing.assert_close(fast, masked, atol=1e-4, rtol=1e-3)
    report = count_flops(model, inputs)
    assert report.ratio == pytest.approx(0.5, abs=0.01)
    assert measure_macs(model, inputs) == pytest.approx(report.dynamic_macs, rel=0.02)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(TINY_BUILDERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_equals_masked_on_cuda(name, dtype):
    model = TINY_BUILDERS[name]().cuda().to(dtype)
    inputs = default_inputs(model, batch_size=3)
    args, kwargs = inputs

    def move(v):
        """To CUDA; floating tensors also to ``dtype`` (labels and timesteps keep theirs)."""
        if not torch.is_tensor(v):
            return v
        return v.cuda().to(dtype) if v.is_floating_point() else v.cuda()

    inputs = (tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()})
    dynconvert.convert(model, 0.5, example_inputs=inputs)
    randomize_routing(model, keep=0.5, example_inputs=inputs)
    with torch.no_grad():
        fast = call(model, inputs)
        with dynconvert.routing(model, "eval", "masked"):
            masked = call(model, inputs)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(fast.float(), masked.float(), atol=tol, rtol=tol)
