"""Shared fixtures: the four supported families as tiny models with random weights."""

from __future__ import annotations

import pytest
import torch

from dynconvert.inputs import default_inputs
from dynconvert.testing import TINY_BUILDERS

FAMILIES = list(TINY_BUILDERS)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread (small models: no oversubscription under load)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(params=FAMILIES)
def family(request):
    """(name, fresh tiny model, example inputs with 3 samples at 3 different timesteps)."""
    model = TINY_BUILDERS[request.param]()
    return request.param, model, default_inputs(model, batch_size=3)


@pytest.fixture(scope="session")
def bench_keys():
    """The fields every benchmark result holds (``dynconvert bench --json``, ``benchmark``)."""
    return {
        "time_static_s",
        "time_dynamic_s",
        "speedup",
        "flops_ratio",
        "executed_flops_ratio",
        "efficiency",
        "peak_mem_static_bytes",
        "peak_mem_dynamic_bytes",
        "device",
        "dtype",
        "batch",
    }
