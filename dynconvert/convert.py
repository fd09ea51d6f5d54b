"""convert / revert: attach routers to the sites of a plan, in place, and take them off again."""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import nn

from dynconvert.analysis import FilterFn, analyze
from dynconvert.analysis.importance import always_on_unit
from dynconvert.analysis.meta import is_meta
from dynconvert.config import ConvertConfig
from dynconvert.errors import AlreadyConvertedError, BudgetError, LoraNotRoutedError, NoSitesError
from dynconvert.fields import SEED_MAX, Range, check_value
from dynconvert.flops import min_ratio
from dynconvert.inputs import default_inputs, split_inputs
from dynconvert.plan import AttentionSite, Plan
from dynconvert.runtime.attention import AttentionRuntime
from dynconvert.runtime.bank import RouterBank
from dynconvert.runtime.budgets import BudgetRange, parse_budget
from dynconvert.runtime.conv import ConvMlpRuntime
from dynconvert.runtime.deferred import Deferred, check_weights, weights_pending
from dynconvert.runtime.dynamic import (
    DynamicConv,
    DynamicLinear,
    SiteRuntime,
    make_dynamic,
    make_static,
)
from dynconvert.runtime.heads import restore_head_counts
from dynconvert.runtime.lora import adopt_all, check_adoptable, install_hook, lifted, release_all
from dynconvert.runtime.mlp import MlpRuntime
from dynconvert.runtime.shared_in import SharedInRuntime
from dynconvert.runtime.shared_out import SharedOutRuntime
from dynconvert.runtime.state import ATTR, attach, detach, get_state, is_converted
from dynconvert.verify import verify_fast_path

__all__ = [
    "apply_plan",
    "check_budget",
    "check_plan",
    "convert",
    "get_state",
    "is_converted",
    "revert",
]


def check_budget(budget: Any) -> float:
    """Validate a single FLOPs budget: a number in (0, 1] (a range: runtime/budgets.py)."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise BudgetError(
            f"budget must be a number in (0, 1], e.g. 0.5 for half the FLOPs; got {budget!r}"
        )
    b = float(budget)
    if not 0.0 < b <= 1.0:
        raise BudgetError(
            f"budget must be in (0, 1] (a fraction of the original FLOPs, e.g. 0.5); got {b}"
        )
    return b


def convert(
    model: nn.Module,
    budget: float | tuple[float, float],
    *,
    example_inputs: Any = None,
    config: ConvertConfig | None = None,
    filter_fn: FilterFn | None = None,
    seed: int = 0,
    probe_inputs: Any = None,
) -> nn.Module:
    """Make ``model`` dynamic, in place: routers on every attention and MLP site found.

    Right after convert the model computes what it computed before (every router starts with
    every unit on); calibration then teaches the routers to meet ``budget``.

    A model built on the meta device (``with torch.device("meta")``, accelerate's
    ``init_empty_weights``) is converted without its weights: it stays on meta, and when the
    weights arrive (``load_state_dict(state, assign=True)``, or at its first forward call after
    diffusers' or accelerate's loading) the routers are made from ``seed`` and the always-on
    units chosen, so it then runs exactly as if it had been converted with its weights. Pass
    its example inputs on the CPU: the fast path is checked with them then.

    Args:
        model: a diffusion transformer (built-in DiT/U-ViT, diffusers DiT/PixArt, or any model
            built the same way).
        budget: target FLOPs as a fraction of the original forward pass, in (0, 1]; or a
            range ``(low, high)`` for budget-conditioned routers: calibration then trains one
            model for every budget in it, chosen per call at inference (``set_budget``,
            ``with dynconvert.budget(...)``; docs/budgets.md).
        example_inputs: positional args (tuple) or keyword args (dict) that run the model;
            optional for models that can make their own.
        config: router settings (:class:`ConvertConfig`).
        filter_fn: ``filter_fn(module, name) -> bool`` to leave sites out.
        seed: Seed of the routers' initial weights, in [0, 2**32 - 1]: the same model, budget,
            config and seed give bit-identical routers (a run passes its own seed). Drawn from
            a generator of its own: the global torch RNG is left as it was.
        probe_inputs: the same call at a few tokens, for a big model at its real size: analysis
            decides head-locality there (:func:`dynconvert.analyze`).

    Returns:
        The same model object, converted.

    Example:
        >>> import dynconvert
        >>> from dynconvert.testing import tiny_dit
        >>> model = dynconvert.convert(tiny_dit(), budget=0.5)
        >>> dynconvert.is_converted(model)
        True
    """
    b, budget_range = parse_budget(budget)  # a range's low end is checked against the plan
    check_value("seed", seed, int, Range(0, SEED_MAX))
    config = config or ConvertConfig()
    if is_converted(model):
        raise AlreadyConvertedError(
            f"{type(model).__name__} is already converted; call dynconvert.revert(model) first "
            "to convert it again with other settings"
        )
    # The converted state lives under this attribute: never overwrite one of the model's own.
    if hasattr(model, ATTR):
        raise AlreadyConvertedError(
            f"the model already has an attribute {ATTR!r}; rename it before converting"
        )
    # LoRA layers already on the model are lifted off while it is converted (analysis sees the
    # plain model) and adopted after, routed with the Linears they wrap (runtime/lora.py).
    with lifted(model) as taken:
        _convert(model, (b, budget_range), example_inputs, config, filter_fn, seed, probe_inputs)
        try:
            check_adoptable([layer for _, _, layer in taken])
        except LoraNotRoutedError:  # an adapter kind that is not routed: the model as it was
            revert(model)
            raise
    adopt_all(model)
    return model


def _convert(
    model: nn.Module,
    spec: tuple[float, BudgetRange | None],
    example_inputs: Any,
    config: ConvertConfig,
    filter_fn: FilterFn | None,
    seed: int,
    probe_inputs: Any,
) -> None:
    """Analyse, check, apply the plan; re-apply without the sites the fast-path check fails
    (a model on the meta device: the rest when its weights arrive)."""
    # Resolved once: analysis captures the graph with them, the fast-path check reruns them.
    args, kwargs = (
        split_inputs(example_inputs) if example_inputs is not None else default_inputs(model)
    )
    plan = analyze(model, (args, kwargs), config, filter_fn, probe_inputs)
    check_plan(plan, spec[0], config)  # before any change: a refused plan leaves it untouched
    if is_meta(model):  # no weights yet: the rest waits for them (runtime/deferred.py)
        bank = apply_plan(model, plan, config, spec[0], budget_range=spec[1])
        bank.deferred = Deferred(seed, (args, kwargs), _finish)
        bank.deferred.handle = model.register_load_state_dict_post_hook(_loaded)
        return
    _seeded_apply(model, plan, config, spec, seed)
    _check_fast_path(model, plan, config, spec, seed, (args, kwargs))


def _seeded_apply(
    model: nn.Module, plan: Plan, config: ConvertConfig, spec: tuple, seed: int
) -> None:
    """apply_plan with routers drawn from ``seed`` (``spec``: the budget and its range)."""
    with torch.random.fork_rng(devices=[]):  # router init from the seed, global RNG untouched
        torch.manual_seed(seed)
        apply_plan(model, plan, config, spec[0], budget_range=spec[1])


def _check_fast_path(
    model: nn.Module, plan: Plan, config: ConvertConfig, spec: tuple, seed: int, inputs: tuple
) -> None:
    """Head-count attributes found by a scan, or ops beyond reshapes before the attention:
    compare fast and masked paths once (verify.py). A site whose sliced path differs is not
    converted (routing it would cost accuracy and save nothing): convert again without it."""
    if any(s.fast_reason == "unverified" for s in plan.sites):
        failed = verify_fast_path(model, *inputs)
        if failed:
            revert(model)
            attention = (
                "the sliced fast path did not reproduce the masked path (head-count attributes "
                "the scan did not find, or a per-head input such as a mask built outside the "
                "attention module with every head); not converted. Register the attributes with "
                "dynconvert.analysis.registry.register_attention"
            )
            mlp = (
                "the sliced fast path did not reproduce the masked path (the model splits the "
                "hidden channels at fixed sizes, not from the shape it is given); not converted"
            )
            plan.drop_sites({
                s.index: attention if isinstance(s, AttentionSite) else mlp
                for s in plan.sites if s.index in failed
            })  # fmt: skip
            check_plan(plan, spec[0], config)
            _seeded_apply(model, plan, config, spec, seed)


def _finish(model: nn.Module) -> RouterBank:
    """Convert's work that needed the weights, once they have arrived (a model converted on
    the meta device): the routers from the seed, the always-on units, the fast-path check.
    Returns the model's bank (a new one when the check dropped sites)."""
    bank = get_state(model)
    deferred = bank.deferred
    check_weights(model, bank)
    bank.deferred = None
    deferred.handle.remove()
    device = next(p.device for p in model.parameters() if not p.is_meta)
    with torch.random.fork_rng(devices=[]):  # the same draws as apply_plan with weights
        torch.manual_seed(deferred.seed)
        fresh = RouterBank(bank.plan, bank.config, bank.budget, bank.budget_range)
    bank.load_state_dict(fresh.state_dict(), assign=True)
    bank.to(device)
    _always_on(bank, dict(model.named_modules()), None)
    spec = (bank.budget, bank.budget_range)
    _check_fast_path(model, bank.plan, bank.config, spec, deferred.seed, deferred.inputs)
    return get_state(model)


def _loaded(model: nn.Module, keys: Any) -> None:
    """load_state_dict post hook of a model converted on meta: finish once no weight is
    missing (an original checkpoint has no router keys: they are made here, not missing)."""
    bank = get_state(model)
    if bank.deferred is None or weights_pending(model, bank):
        return
    _finish(model)
    keys.missing_keys[:] = [k for k in keys.missing_keys if not k.startswith(ATTR + ".")]


def check_plan(plan: Plan, budget: float, config: ConvertConfig) -> None:
    """Refuse a plan with no sites, or a budget below what its always-on parts cost."""
    if not plan.sites:
        reasons = (
            "; ".join(f"{s.name}: {s.reason}" for s in plan.skipped[:5])
            or "no attention call found"
        )
        raise NoSitesError(
            f"found no convertible attention or MLP site in {plan.model_class} ({reasons}). "
            "dynconvert converts transformer blocks made of attention and MLP Linears; see "
            "`dynconvert inspect` for what was found"
        )
    low = min_ratio(plan, config.token_reduction)
    if budget < low:
        raise BudgetError(
            f"budget {budget} is below the minimum this model can reach ({low:.3f}): the parts "
            "that are not converted plus one head per attention and the routers already cost "
            "that much. "
            f"Use a budget of at least {low:.3f}"
        )


def apply_plan(
    model: nn.Module,
    plan: Plan,
    config: ConvertConfig,
    budget: float,
    always_on: list[int] | None = None,
    budget_range: BudgetRange | None = None,
) -> RouterBank:
    """Swap the plan's Linears for DynamicLinears and attach the RouterBank (no checks;
    ``budget_range``: a budget-conditioned model's, runtime/budgets.py)."""
    install_hook()  # from now on a LoRA layer put around a routed Linear is routed with it
    modules = dict(model.named_modules())
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if is_meta(model):  # shapes only: values are made when the weights arrive (_finish)
        with torch.device("meta"):
            bank = RouterBank(plan, config, budget, budget_range)
    else:
        bank = RouterBank(plan, config, budget, budget_range).to(
            device
        )  # routers where the weights are
        _always_on(bank, modules, always_on)
    bank.model_params = sum(p.numel() for p in model.parameters())  # sizes the slice cache
    runtimes: list[SiteRuntime] = []
    hooks: list[Any] = []
    for site in plan.sites:
        if isinstance(site, AttentionSite):
            module = modules[site.name] if site.name else model
            rt: SiteRuntime = AttentionRuntime(site, bank, module)
            for m in site.in_maps:  # every stream's q/k/v Linears (a fused qkv once)
                make_dynamic(modules[m.linear], rt, "in", m.linear)
            for m in site.out_maps:  # every stream's out-projection
                make_dynamic(modules[m.linear], rt, "out", m.linear)
            hooks.extend(rt.attach_parts(modules))  # what the site's forms hook (dynconvert/sites)
            # The pre-hook decides a sliced call (the module's head counts read it, for this
            # thread: runtime/heads.py) and the post-hook ends it, also when the forward raises.
            hooks.append(module.register_forward_pre_hook(rt.pre_hook, with_kwargs=True))
            hooks.append(
                module.register_forward_hook(rt.post_hook, with_kwargs=True, always_call=True)
            )
        else:
            rt = ConvMlpRuntime(site, bank) if site.conv else MlpRuntime(site, bank)
            for name in site.fc1:
                make_dynamic(modules[name], rt, "mlp_in", name)
            for m in site.mid_maps:  # depthwise convolutions of a convolutional MLP
                make_dynamic(modules[m.linear], rt, "mlp_mid", m.linear)
            make_dynamic(modules[site.fc2], rt, "mlp_out", site.fc2)
            if site.width_attrs:  # a fused projection split by the hidden width (Flux 2)
                hooks.extend(rt.attach(modules[site.name] if site.name else model))
        runtimes.append(rt)
    # A parallel block's out-projection belongs to its attention and its MLP at once (or to
    # one of them, the other's columns computed in full when it is not converted).
    owners: dict[str, list[Any]] = {}
    for rt in runtimes:
        for m in rt.site.out_maps:
            owners.setdefault(m.linear, []).append(rt)
    for name, rts in owners.items():
        if len(rts) > 1 or any(m.keep for rt in rts for m in rt.site.out_maps if m.linear == name):
            cols = modules[name].weight.shape[1]
            make_dynamic(modules[name], SharedOutRuntime(rts, name, cols), "out", name)
    # An input projection whose rows are the units of two sites, or partly of none (Flux 2's
    # fused q, k, v and MLP projection): each owner's active rows, and the others in full.
    in_owners: dict[str, list[Any]] = {}
    for rt in runtimes:
        for m in rt.site.in_maps:
            in_owners.setdefault(m.linear, []).append(rt)
    for name, rts in in_owners.items():
        rows = modules[name].weight.shape[0]
        if len(rts) > 1 or sum(rt.tables[name].numel() for rt in rts) < rows:
            make_dynamic(modules[name], SharedInRuntime(rts, name, rows), "in", name)
    bank.runtimes = runtimes
    bank.set_timestep_spec(model)
    # Every forward of the model starts here: read t from its arguments, set the call's masks.
    hooks.append(model.register_forward_pre_hook(bank.root_pre_hook, with_kwargs=True))
    bank.hook_ids = [h.id for h in hooks]  # revert removes exactly these, no one else's
    attach(model, bank)
    return bank


def _always_on(
    bank: RouterBank, modules: dict[str, nn.Module], always_on: list[int] | None
) -> None:
    """The unit each width router can never switch off: the recorded one when load replays a
    record, else the most important unit (docs/method.md, "The always-on unit": chosen by
    importance, not by index)."""
    for site in bank.plan.sites:
        linears = {m.linear: modules[m.linear] for m in site.maps()}
        if always_on is not None:
            bank.always_on[site.index] = always_on[site.index]
        elif site.units > 1:
            bank.always_on[site.index] = always_on_unit(site, linears, bank.config.importance)


def revert(model: nn.Module) -> nn.Module:
    """Take the routers off: every DynamicLinear becomes an nn.Linear again (same parameters).

    LoRA layers stay, as the peft layers they were (their adapters unchanged).

    Example:
        >>> model = revert(model)                # doctest: +SKIP
    """
    bank = get_state(model)
    release_all(model)
    if bank.deferred is not None:  # converted on meta, never finished
        bank.deferred.handle.remove()
    for m in model.modules():
        if isinstance(m, (DynamicLinear, DynamicConv)):
            make_static(m)  # the class only: the Parameters (and state-dict keys) never changed
        restore_head_counts(m)  # an attention module's own class again (runtime/heads.py)
        # Our hooks by id, from every dict PyTorch files a hook in (kwargs, always-called).
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for hid in [h for h in hooks if h in bank.hook_ids]:
                del hooks[hid]
                m._forward_hooks_with_kwargs.pop(hid, None)
                m._forward_pre_hooks_with_kwargs.pop(hid, None)
                m._forward_hooks_always_called.pop(hid, None)
    detach(model)
    return model
