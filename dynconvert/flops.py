"""count_flops: the static and dynamic cost of a model, per site and in total, in MACs.

Convention: **MACs** (one multiply-accumulate = 1), the unit DiT and DyDiT call "FLOPs"
(DiT-XL/2 at 256 px: 118.69 G). Hardware FLOPs are twice these numbers; PyTorch's
``FlopCounterMode`` counts 2 per MAC.

Sources of the formulas: projections and MLPs are ``tokens x in x out`` per Linear; attention
adds QK^T (``N x M x H x d``) and AV (``N x M x H x d_v``), which fvcore and PyTorch's CPU
counter miss unless attention is decomposed (``sdpa_kernel(SDPBackend.MATH)``). The rest of the
model (patch embedding, conditioning, final layer) is summed op by op over the captured graph.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from dynconvert.analysis import analyze, capture
from dynconvert.analysis.costs import node_macs
from dynconvert.convert import get_state, is_converted
from dynconvert.inputs import batch_of, default_inputs, shapes_of, split_inputs
from dynconvert.plan import AttentionSite, Plan

UNIT = "MACs (multiply-accumulates; 1 MAC = 2 hardware FLOPs)"


@dataclass
class SiteFlops:
    """Cost of one site for one sample (mean over the batch for the dynamic part)."""

    name: str
    kind: str
    block: str
    static_macs: float
    dynamic_macs: float
    router_macs: float = 0.0

    @property
    def ratio(self) -> float:
        return self.dynamic_macs / self.static_macs if self.static_macs else 1.0


@dataclass
class FlopsReport:
    """Static and dynamic cost of one forward call, in MACs."""

    batch: int
    static_macs: float
    dynamic_macs: float
    blocks_static_macs: float
    blocks_dynamic_macs: float
    other_macs: float
    router_macs: float
    per_sample_ratio: list[float]
    sites: list[SiteFlops] = field(default_factory=list)
    unit: str = UNIT

    @property
    def static_macs_per_sample(self) -> float:
        return self.static_macs / self.batch

    @property
    def dynamic_macs_per_sample(self) -> float:
        return self.dynamic_macs / self.batch

    @property
    def ratio(self) -> float:
        """Dynamic / static of the whole forward pass (the budget's reference)."""
        return self.dynamic_macs / self.static_macs

    @property
    def blocks_ratio(self) -> float:
        """Dynamic / static of the converted attention and MLP sites only (the paper's figure)."""
        return self.blocks_dynamic_macs / self.blocks_static_macs if self.blocks_static_macs else 1.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            static_macs_per_sample=self.static_macs_per_sample,
            dynamic_macs_per_sample=self.dynamic_macs_per_sample,
            ratio=self.ratio,
            blocks_ratio=self.blocks_ratio,
        )
        return d


def count_flops(model: nn.Module, example_inputs: Any = None) -> FlopsReport:
    """Static cost of the original model and dynamic cost under the current routing, in MACs.

    For a converted model, one forward call runs (no grad) at the current routing mode to read
    the masks; for a plain model the dynamic cost equals the static cost.

    Example:
        >>> import dynconvert
        >>> from dynconvert.testing import tiny_dit
        >>> r = dynconvert.count_flops(tiny_dit())
        >>> r.ratio
        1.0
    """
    args, kwargs = split_inputs(example_inputs) if example_inputs is not None else default_inputs(model)
    batch = batch_of(args, kwargs)
    if not is_converted(model):
        plan = analyze(model, (args, kwargs))
        sites = [SiteFlops(s.name, _kind(s), s.block, float(s.macs()), float(s.macs())) for s in plan.sites]
        blocks = sum(s.static_macs for s in sites) * batch
        return FlopsReport(
            batch=batch, static_macs=float(plan.static_macs), dynamic_macs=float(plan.static_macs),
            blocks_static_macs=blocks, blocks_dynamic_macs=blocks, other_macs=float(plan.other_macs),
            router_macs=0.0, per_sample_ratio=[1.0] * batch, sites=sites,
        )
    bank = get_state(model)
    with torch.no_grad():
        out = model(*args, **kwargs)
    del out
    costs = bank.site_costs()
    other = _other_macs(model, bank.plan, args, kwargs, costs)
    sites: list[SiteFlops] = []
    dyn_per_sample: Any = other / batch
    for s, stat, dyn, router in costs:
        dyn_t = torch.as_tensor(dyn, dtype=torch.float64).reshape(-1)
        if dyn_t.numel() == 1:
            dyn_t = dyn_t.expand(batch)
        sites.append(SiteFlops(s.name, _kind(s), s.block, stat, float(dyn_t.mean()), router))
        dyn_per_sample = dyn_per_sample + dyn_t + router
    blocks_static = sum(s.static_macs for s in sites) * batch
    blocks_dynamic = sum(s.dynamic_macs + s.router_macs for s in sites) * batch
    static = other + blocks_static
    per_sample = torch.as_tensor(dyn_per_sample, dtype=torch.float64).reshape(-1).expand(batch)
    return FlopsReport(
        batch=batch, static_macs=static, dynamic_macs=float(per_sample.sum()),
        blocks_static_macs=blocks_static, blocks_dynamic_macs=blocks_dynamic, other_macs=other,
        router_macs=sum(s.router_macs for s in sites) * batch,
        per_sample_ratio=(per_sample / (static / batch)).tolist(), sites=sites,
    )


def _kind(site: Any) -> str:
    return "attention" if isinstance(site, AttentionSite) else "mlp"


def _other_macs(model: nn.Module, plan: Plan, args: tuple, kwargs: dict, costs: list) -> float:
    """MACs outside the converted sites for this batch (re-captured when the shapes changed)."""
    batch = batch_of(args, kwargs)
    same = shapes_of(args, kwargs) == plan.input_shapes
    if same:
        return float(plan.other_macs)
    if batch != plan.batch and _same_but_batch(shapes_of(args, kwargs), plan.input_shapes, plan.batch, batch):
        return float(plan.other_macs) * batch / plan.batch
    from dynconvert.routing import routing

    with routing(model, "full"):
        graph = capture(model, args, kwargs, "export", any_linear=True)
    total = sum(node_macs(n) for n in graph.nodes)
    return float(total) - sum(stat for _, stat, _, _ in costs) * batch


def _same_but_batch(a: dict, b: dict, nb: int, na: int) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = list(a[k]), list(b[k])
        if x and y and x[0] == na and y[0] == nb:
            x, y = x[1:], y[1:]
        if x != y:
            return False
    return True


def measure_macs(model: nn.Module, example_inputs: Any = None) -> float:
    """MACs the model actually executes, counted by torch.utils.flop_counter (math attention).

    This is the ground truth the analytic counts are checked against: attention runs through
    the math backend so QK^T and AV appear as counted matmuls.

    Example:
        >>> from dynconvert.testing import tiny_dit
        >>> measure_macs(tiny_dit()) > 0
        True
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    args, kwargs = split_inputs(example_inputs) if example_inputs is not None else default_inputs(model)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(*args, **kwargs)
    return counter.get_total_flops() / 2
