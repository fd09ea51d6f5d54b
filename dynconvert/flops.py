"""The one FLOPs accountant of dynconvert, in MACs: what each site costs under a routing, and
what a model executes.

Convention: **MACs** (one multiply-accumulate = 1), the unit DiT and DyDiT call "FLOPs"
(DiT-XL/2 at 256 px: 118.69 G). Hardware FLOPs are twice these numbers; PyTorch's
``FlopCounterMode`` counts 2 per MAC.

Sources of the formulas:

- a site's full cost is :meth:`AttentionSite.macs` (sites/attention.py: ``tokens x in x out``
  per Linear, QK^T ``N x M x H x d`` and AV ``N x M x H x d_v``, which fvcore and PyTorch's CPU
  counter miss unless attention is decomposed) plus the terms of its forms' parts
  (sites/<form>.py), or :meth:`MlpSite.macs` (plan.py);
- under routing (DyDiT, docs/method.md "What the FLOPs term counts"): attention scales with the
  fraction of heads on (but for what a part computes at full width, ``fixed_macs``); the MLP
  with the fraction of channel groups on times the fraction of tokens kept; a token router
  (D -> D/r -> 1) runs on every token whenever tokens are routed;
- the rest of the model (patch embedding, conditioning, final layer) is summed op by op over the
  captured graph at analysis time (``Plan.other_macs``) and never changes.

Everything that reports or trains toward a FLOPs figure goes through :func:`site_cost`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from dynconvert.analysis import analyze, capture
from dynconvert.analysis.costs import eager_macs, node_macs
from dynconvert.inputs import batch_of, default_inputs, shapes_of, split_inputs
from dynconvert.plan import TOKEN_REDUCTION, AttentionSite, Plan, Site, site_kind
from dynconvert.runtime.bank import RouterBank
from dynconvert.runtime.deferred import weights_pending
from dynconvert.runtime.routing import routing
from dynconvert.runtime.state import get_state, is_converted

Fraction = Any
"""A fraction in [0, 1]: a number, or a tensor (per sample (B,), or per timestep (T,))."""

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
        """dynamic_macs / static_macs of this site, router MACs excluded (1.0 if static is 0)."""
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
        """static_macs / batch: the original model's MACs for one sample."""
        return self.static_macs / self.batch

    @property
    def dynamic_macs_per_sample(self) -> float:
        """dynamic_macs / batch: the mean MACs of one sample under routing (routers included)."""
        return self.dynamic_macs / self.batch

    @property
    def ratio(self) -> float:
        """Dynamic / static of the whole forward pass (the budget's reference)."""
        return self.dynamic_macs / self.static_macs

    @property
    def blocks_ratio(self) -> float:
        """Dynamic / static of the converted attention and MLP sites only (the paper's figure)."""
        return (
            self.blocks_dynamic_macs / self.blocks_static_macs if self.blocks_static_macs else 1.0
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields (sites as dicts) plus the derived per-sample MACs, ratio and blocks_ratio."""
        derived = ("static_macs_per_sample", "dynamic_macs_per_sample", "ratio", "blocks_ratio")
        return {**asdict(self), **{k: getattr(self, k) for k in derived}}


# -- the accountant ------------------------------------------------------------------------
class SiteCost(NamedTuple):
    """MACs of one site for one sample: full cost, cost under routing, token-router cost."""

    static: float
    dynamic: Fraction
    router: float


def site_cost(
    site: Site,
    width: Fraction | None = None,
    tokens: Fraction | None = None,
    token_reduction: int = TOKEN_REDUCTION,
    n: int | None = None,
    seen: Mapping[str, int] | None = None,
    fold: int | None = None,
) -> SiteCost:
    """The cost of one site for one sample under routing (the one place this is computed).

    Args:
        site: an attention or MLP site of a plan.
        width: fraction of heads or channel groups on (None: all on).
        tokens: fraction of tokens that run the MLP (None: tokens are not routed; ignored for
            attention, which always sees every token).
        token_reduction: the token router's bottleneck ratio r (D -> D/r -> 1).
        n: tokens per sample of an MLP call (None: the plan's).
        seen: tokens per sample each Linear of an attention site ran on in a call (missing
            ones: the plan's).
        fold: rows per sample in a call (video blocks folding frames into the batch; None: the
            plan's).

    Example:
        >>> from dynconvert.testing import tiny_dit
        >>> from dynconvert.analysis import analyze
        >>> mlp = analyze(tiny_dit()).mlp[0]
        >>> c = site_cost(mlp, width=0.5, tokens=0.5)
        >>> c.dynamic == c.static * 0.25, c.router > 0
        (True, True)
    """
    if isinstance(site, AttentionSite):
        cost = float(site.macs(dict(seen or {}), fold))
        fixed = float(site.fixed_macs(dict(seen or {}), fold))  # a partial site's full-width part
        return SiteCost(cost, fixed + (cost - fixed) * (1.0 if width is None else width), 0.0)
    cost = float(site.macs(n, fold))
    frac: Fraction = 1.0 if width is None else width
    if tokens is None or not site.token:
        return SiteCost(cost, cost * frac, 0.0)
    return SiteCost(cost, cost * frac * tokens, float(site.router_macs(n, token_reduction, fold)))


def other_macs_per_sample(plan: Plan) -> float:
    """MACs of everything outside the converted sites, for one sample (never routed)."""
    return plan.other_macs / max(plan.batch, 1)


def _pick(value: Fraction | Mapping[int, Fraction] | None, site: Site) -> Fraction | None:
    """A per-site fraction from one value for every site, or a {site index: value} map."""
    if isinstance(value, Mapping):
        return value.get(site.index)
    return value


def routed_ratio(
    plan: Plan,
    token_reduction: int,
    width: Fraction | Mapping[int, Fraction] | None = None,
    tokens: Fraction | Mapping[int, Fraction] | None = None,
    blocks_only: bool = False,
) -> Fraction:
    """F_dyn / F_static of a plan under the given routing fractions.

    ``width`` applies to sites that have a width router (more than one unit), ``tokens`` to
    token-routed MLP sites; each is one value for every site or a ``{site index: value}`` map,
    and values may be tensors (per sample or per timestep: the result has their shape).
    ``blocks_only`` restricts both sides to the converted sites (the paper's convention);
    otherwise the whole forward pass counts, routers included.

    Example:
        >>> from dynconvert.analysis import analyze
        >>> from dynconvert.testing import tiny_dit
        >>> plan = analyze(tiny_dit())
        >>> routed_ratio(plan, 16)
        1.0
    """
    other = 0.0 if blocks_only else other_macs_per_sample(plan)
    static, dynamic = other, other
    for s in plan.sites:
        w = _pick(width, s) if s.units > 1 else None
        c = site_cost(s, w, _pick(tokens, s), token_reduction)
        static += c.static
        dynamic = dynamic + c.dynamic + c.router
    return dynamic / static


def min_ratio(plan: Plan, token_reduction: int) -> float:
    """Lowest reachable whole-model ratio: one head per attention, one channel group per MLP
    (no token at all where tokens are routed), plus the routers and the parts not converted.

    Example:
        >>> from dynconvert.analysis import analyze
        >>> from dynconvert.testing import tiny_dit
        >>> 0 < min_ratio(analyze(tiny_dit()), 16) < 1
        True
    """
    width = {s.index: 1.0 / s.units for s in plan.sites}
    return float(routed_ratio(plan, token_reduction, width, tokens=0.0))


def solve_keep(
    plan: Plan, token_reduction: int, ratio: float, tokens: float
) -> tuple[float, float]:
    """Width and token keep fractions, the same at every site, whose ratio is about ``ratio``.

    The ratio is linear in each fraction, so both are solved exactly from two evaluations of
    :func:`routed_ratio`: first the width for ``tokens`` of the tokens kept, then (after the
    width is rounded to whole heads and groups per site) the token keep rate. Both are clamped
    to [0, 1]; returns ``(width, tokens)``.
    """

    def solve(f: Any, lo_at: Any, hi_at: Any) -> float:  # f linear in x: f(x) = ratio
        lo, hi = float(f(lo_at)), float(f(hi_at))
        return min(1.0, max(0.0, (ratio - lo) / (hi - lo))) if hi != lo else 1.0

    width = solve(lambda w: routed_ratio(plan, token_reduction, w, tokens), 0.0, 1.0)
    rounded = {s.index: max(1, round(width * s.units)) / s.units for s in plan.sites}
    keep = solve(lambda k: routed_ratio(plan, token_reduction, rounded, k), 0.0, 1.0)
    return width, keep


def call_costs(bank: RouterBank) -> list[tuple[Site, SiteCost]]:
    """Per site, its cost in the model's last forward call, from the masks that call recorded
    (per sample, differentiable in training mode)."""
    out = []
    batch = bank.current_call().batch  # the model's batch in that call (0 if unknown)
    for s in bank.plan.sites:
        rec = bank.records.get(s.index, {})
        w, tk = rec.get("width"), rec.get("tokens")
        # Rows per sample: more than 1 where a block folds frames or tokens into the batch.
        rows = rec.get("rows")
        fold = rows // batch if rows and batch and rows % batch == 0 else None
        width = w.float().mean(-1) if w is not None else None  # (B,) fraction of units on
        kept = tk.float().flatten(1).mean(1) if tk is not None else None  # (rows,) tokens kept
        if kept is not None and fold and fold > 1:
            kept = kept.reshape(-1, fold).mean(1)  # (B,)
        seen = rec.get("seen")
        if "executed_tokens" in rec:  # planned path: the MLP ran on its capacity (or all tokens)
            kept = rec["executed_tokens"]
        out.append(
            (s, site_cost(s, width, kept, bank.config.token_reduction, rec.get("n"), seen, fold))
        )
    return out


def last_flops_ratio(model: nn.Module | RouterBank, blocks_only: bool = False) -> torch.Tensor:
    """F_dyn / F_static of each sample of the model's last forward call, shape (B,).

    Differentiable in training-mode routing: this is the quantity the calibration loss pulls
    toward the budget. ``blocks_only`` restricts it to the converted sites.

    Example:
        >>> import dynconvert
        >>> from dynconvert.testing import tiny_dit
        >>> model = dynconvert.convert(tiny_dit(), 0.5).eval()
        >>> _ = model(*model.example_inputs(2))
        >>> last_flops_ratio(model).shape
        torch.Size([2])
    """
    bank = model if isinstance(model, RouterBank) else get_state(model)
    other = 0.0 if blocks_only else other_macs_per_sample(bank.plan)
    static, dynamic = other, other
    for _, c in call_costs(bank):
        static += c.static
        dynamic = dynamic + c.dynamic + c.router
    out = torch.as_tensor(dynamic, dtype=torch.float32, device=bank.always_on.device) / static
    return out.reshape(-1)


# -- counting a model --------------------------------------------------------------------------
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
    args, kwargs = (
        split_inputs(example_inputs) if example_inputs is not None else default_inputs(model)
    )
    batch = batch_of(args, kwargs)
    if not is_converted(model):
        plan = analyze(model, (args, kwargs))
        macs = [float(s.macs()) for s in plan.sites]
        sites = [SiteFlops(s.name, site_kind(s), s.block, m, m) for s, m in zip(plan.sites, macs)]
        blocks = sum(s.static_macs for s in sites) * batch
        return FlopsReport(
            batch=batch,
            static_macs=float(plan.static_macs),
            dynamic_macs=float(plan.static_macs),
            blocks_static_macs=blocks,
            blocks_dynamic_macs=blocks,
            other_macs=float(plan.other_macs),
            router_macs=0.0,
            per_sample_ratio=[1.0] * batch,
            sites=sites,
        )
    bank = get_state(model)
    if bank.deferred is not None and weights_pending(model, bank):  # converted on meta, no
        # weights yet: a fresh conversion's cost (every unit and token on, token routers run)
        kept = {s.index: None if isinstance(s, AttentionSite) else 1.0 for s in bank.plan.sites}
        r = bank.config.token_reduction
        costs = [(s, site_cost(s, None, kept[s.index], r)) for s in bank.plan.sites]
    else:
        with torch.no_grad():
            model(*args, **kwargs)
        costs = call_costs(bank)
    other = _other_macs(model, bank.plan, args, kwargs, costs)
    sites: list[SiteFlops] = []
    dyn_per_sample: Any = other / batch
    for s, c in costs:
        dyn_t = torch.as_tensor(c.dynamic, dtype=torch.float64).reshape(-1)  # (B,) or (1,)
        if dyn_t.numel() == 1:
            dyn_t = dyn_t.expand(batch)
        sites.append(
            SiteFlops(s.name, site_kind(s), s.block, c.static, float(dyn_t.mean()), c.router)
        )
        dyn_per_sample = dyn_per_sample + dyn_t + c.router
    blocks_static = sum(s.static_macs for s in sites) * batch
    blocks_dynamic = sum(s.dynamic_macs + s.router_macs for s in sites) * batch
    static = other + blocks_static
    per_sample = torch.as_tensor(dyn_per_sample, dtype=torch.float64).reshape(-1).expand(batch)
    return FlopsReport(
        batch=batch,
        static_macs=static,
        dynamic_macs=float(per_sample.sum()),
        blocks_static_macs=blocks_static,
        blocks_dynamic_macs=blocks_dynamic,
        other_macs=other,
        router_macs=sum(s.router_macs for s in sites) * batch,
        per_sample_ratio=(per_sample / (static / batch)).tolist(),
        sites=sites,
    )


def _other_macs(model: nn.Module, plan: Plan, args: tuple, kwargs: dict, costs: list) -> float:
    """MACs outside the converted sites for this batch (re-captured when the shapes changed)."""
    batch = batch_of(args, kwargs)
    if shapes_of(args, kwargs) == plan.input_shapes:
        return float(plan.other_macs)
    if batch != plan.batch and _same_but_batch(
        shapes_of(args, kwargs), plan.input_shapes, plan.batch, batch
    ):
        return float(plan.other_macs) * batch / plan.batch
    with routing(model, "full"):
        graph = capture(model, args, kwargs, "export", any_linear=True)
    total = sum(node_macs(n) for n in graph.nodes)
    return float(total) - sum(c.static for _, c in costs) * batch


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
    args, kwargs = (
        split_inputs(example_inputs) if example_inputs is not None else default_inputs(model)
    )
    return eager_macs(model, args, kwargs)
