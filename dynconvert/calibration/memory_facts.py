"""The facts the memory plan (``calibration/memory.py``) reads from a model and its plan.

``model_facts`` reads a converted model (or a model about to be converted, with its router count
from ``count_routers``); ``skeleton_facts`` analyses a meta-device skeleton, so a model is
planned before its weights exist. ``site_saved`` is what autograd keeps per routed site.

Example:
    >>> import dynconvert
    >>> from dynconvert.runtime.state import get_state
    >>> from dynconvert.testing import tiny_dit
    >>> m = dynconvert.convert(tiny_dit(), 0.5)
    >>> sorted(model_facts(m, get_state(m).plan).saved)
    ['all', 'lora', 'routers']
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dynconvert.calibration.memory import TRAINABLE_MODES, ModelFacts
from dynconvert.plan import AttentionSite, MlpSite, Plan


def site_saved(site: AttentionSite | MlpSite, weights_train: bool) -> tuple[int, int]:
    """Elements autograd saves for one sample at one routed site in training: ``(half, full)``.

    Read from traces of converted DiTs (saved-tensor hooks; docs/large-models.md): attention
    saves q, k, v and its output, the projections' inputs (when their weights train), the
    head-masked out-projection input and the branch output a residual gate multiplies; an MLP
    saves the activation's input and output (the width mask multiplies the latter), fc1's and
    the masked fc2's inputs, and with token routing the router's input and hidden state and
    the output the token mask multiplies. The norm before a site keeps its input (and its
    modulated output when weights train) in float32.

    Example:
        >>> from dynconvert.plan import MlpSite, UnitMap
        >>> um = UnitMap("fc1", "rows", 1)
        >>> mlp = MlpSite("mlp", "b0", "Mlp", ["fc1"], "fc2", 4, 16, 4, False, 1, 2, [um], um,
        ...               width=False, token=False)
        >>> site_saved(mlp, weights_train=True)  # 2 tokens: fc1 in, activation in and out, out
        (80, 16)
    """
    if isinstance(site, AttentionSite):
        f = site.fold
        h, hk, dq, dv = site.heads, site.units, site.head_dim, site.v_head_dim
        # (query tokens, key tokens, q input width, k/v input width) of every stream
        streams = [(site.tokens_q, site.tokens_kv, site.q_in, site.kv_in)]
        streams += [(s.tokens_q, s.tokens_kv, s.q_in, s.kv_in) for s in site.streams]
        n = sum(s[0] for s in streams) * f
        m = sum(s[1] for s in streams) * f
        width = max(s[2] for s in streams)
        half = n * h * dq + m * hk * (dq + dv) + n * h * dv  # q, k, v and the attention output
        full = n * width  # the norm's input
        if weights_train:
            half += sum(s[0] * s[2] for s in streams) * f  # the projections' input
            if site.kind == "cross":
                half += sum(s[1] * s[3] for s in streams) * f  # the context
            half += n * h * dv + n * site.out_features  # masked out-proj input, branch output
            full += n * width  # the modulated (normalised) input
        return half, full
    n = site.tokens * site.fold
    d, hid, out = site.in_features, site.hidden, site.out_features
    half = n * site.fc1_out + (n * hid if site.gated else 0)  # activation input (and gate)
    if site.width:
        half += n * hid  # the activation's output, which the width mask multiplies
    full = n * d  # the norm's input
    if site.token:
        r = max(1, d // 16)
        half += n * d + 2 * n * r + n * out  # router input and hidden, output before the mask
    if weights_train:
        half += n * d + n * hid + n * out  # fc1's input, fc2's input, branch output
        full += n * d
    return half, full


def _sum(pairs: list[tuple[int, int]]) -> tuple[int, int]:
    return sum(p[0] for p in pairs), sum(p[1] for p in pairs)


def model_facts(
    model: nn.Module, plan: Plan, router_numel: int | None = None, adapter_numel: int = 0
) -> ModelFacts:
    """Collect the facts of ``model`` (real or on the meta device) and its plan.

    Args:
        model: The model, converted or not (then ``router_numel`` counts the routers to come).
        plan: Its plan (``get_state(model).plan``, or ``analyze`` of a meta-device model).
        router_numel: Router parameters; None: read from the converted model.
        adapter_numel: Parameters of the LoRA adapter ``trainable="lora"`` would train
            (``trainable.adapter_numel``).

    Example:
        >>> import dynconvert
        >>> from dynconvert.runtime.state import get_state
        >>> from dynconvert.testing import tiny_dit
        >>> m = dynconvert.convert(tiny_dit(), 0.5)
        >>> model_facts(m, get_state(m).plan).router_numel > 0
        True
    """
    from dynconvert.runtime.state import ATTR, get_state, is_converted

    bank = get_state(model) if is_converted(model) else None
    if router_numel is None:
        router_numel = sum(p.numel() for p in bank.parameters()) if bank is not None else 0
    params = list(model.parameters())
    tensors = params + list(model.buffers())
    param_bytes = sum(t.numel() * t.element_size() for t in tensors)
    if bank is None:
        param_bytes += router_numel * 4
    size = params[0].element_size() if params else 4
    trainable = sum(p.numel() for p in params if p.requires_grad)
    if bank is None:
        trainable += router_numel
    blocks = [model.get_submodule(b) for b in plan.blocks if b]
    block_numel = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
    in_blocks = sum(sum(p.numel() for p in b.parameters()) for b in blocks)
    root_numel = sum(p.numel() for p in params) - in_blocks  # routers are outside the blocks
    if bank is None:
        root_numel += router_numel
    weight_numel = sum(
        p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith(ATTR)
    )
    saved, block_saved = {}, {}
    by_block: dict[str, list] = {}
    for s in plan.sites:
        by_block.setdefault(s.block, []).append(s)
    for name, mode in TRAINABLE_MODES.items():
        per_block = [
            _sum([site_saved(s, mode.saves_like == "all") for s in ss]) for ss in by_block.values()
        ]
        half, full = _sum(per_block)
        outside = _outside(plan)  # the final norm's input and output
        saved[name] = (half, full + outside)
        block_saved[name] = max(per_block, key=sum, default=(0, 0))
    boundary = sum(_block_width(ss) for ss in by_block.values())
    return ModelFacts(
        param_bytes=param_bytes, param_size=size, trainable_numel=trainable,
        router_numel=router_numel, weight_numel=weight_numel, block_numel=block_numel,
        root_numel=root_numel, saved=saved, block_saved=block_saved, boundary=boundary,
        adapter_numel=adapter_numel,
    )  # fmt: skip


def _block_width(sites: list) -> int:
    """Elements per sample of a block's input: tokens x width of its first site."""
    s = sites[0]
    if isinstance(s, AttentionSite):
        return s.tokens_q * s.fold * s.q_in
    return s.tokens * s.fold * s.in_features


def _outside(plan: Plan) -> int:
    """Elements per sample saved outside the blocks: the final norm's input and output."""
    last = plan.sites[-1] if plan.sites else None
    if last is None:
        return 0
    if isinstance(last, AttentionSite):
        return 2 * last.tokens_q * last.fold * last.out_features
    return 2 * last.tokens * last.fold * last.out_features


def count_routers(plan: Plan, convert_config: Any = None) -> int:
    """Parameters the routers of ``plan`` will have, counted on a meta-device RouterBank.

    Example:
        >>> from dynconvert.plan import Plan
        >>> count_routers(Plan("m", "t", "fx", "", 1, {}, [], [], [], 0, 0))  # t-embedding only
        131584
    """
    from dynconvert.config import ConvertConfig
    from dynconvert.runtime.bank import RouterBank

    with torch.device("meta"):
        bank = RouterBank(plan, convert_config or ConvertConfig(), 1.0)
    return sum(p.numel() for p in bank.parameters())


def block_adapter_numel(model: nn.Module, plan: Plan, rank: int = 16) -> int:
    """A rank-``rank`` LoRA adapter's parameters on every Linear of the plan's blocks (the
    default ``lora_rank`` and targets, near enough before convert routes them): what
    ``trainable="lora"`` adds to the routers in a skeleton's memory plan."""
    blocks = [model.get_submodule(b) for b in plan.blocks if b]
    lins = [m for b in blocks for m in b.modules() if isinstance(m, nn.Linear)]
    return sum(rank * (m.in_features + m.out_features) for m in lins)


def _on(value: Any, device: torch.device) -> Any:
    """Example inputs moved onto the skeleton's device (meta)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_on(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _on(v, device) for k, v in value.items()}
    return value


def skeleton_facts(
    model: nn.Module, convert_config: Any = None, inputs: Any = None, probe_inputs: Any = None
) -> tuple[Plan, ModelFacts]:
    """The plan and facts of a model not converted yet: a meta-device skeleton is enough.

    Analysis runs on the skeleton (no weights are needed) and the routers its plan will get are
    counted on a meta-device RouterBank, so a 12B model is planned without allocating it.

    Args:
        model: The skeleton (meta device) or a real model, not converted.
        convert_config: Convert settings the plan would be made with.
        inputs: Example inputs at the size the run trains on; None: the model's own.
        probe_inputs: The same call at a few tokens (``analyze``'s probe, for real sizes).

    Example:
        >>> import torch
        >>> from dynconvert.models import build_model
        >>> with torch.device("meta"):
        ...     skeleton = build_model("dit-tiny")
        >>> plan, facts = skeleton_facts(skeleton)
        >>> len(plan.blocks), facts.router_numel > 0
        (2, True)
    """
    from dynconvert.analysis import analyze
    from dynconvert.inputs import default_inputs, split_inputs

    args, kwargs = default_inputs(model) if inputs is None else split_inputs(inputs)
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    example = (_on(args, device), _on(kwargs, device))
    plan = analyze(model, example, config=convert_config, probe_inputs=probe_inputs)
    routers, adapters = count_routers(plan, convert_config), block_adapter_numel(model, plan)
    return plan, model_facts(model, plan, routers, adapters)
