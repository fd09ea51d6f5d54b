"""Routed LoRA at run time: a routed Linear's output plus its adapters' updates, cut alike.

A peft ``LoraLayer`` around a routed Linear (adopted by ``lora.py``) adds, per active adapter,
``s_a * B_a A_a dropout(x)`` to ``W x + b``. Routing computes only part of ``W``: the active
units' rows (q, k, v, fc1: output features) or columns (out-projection, fc2: input features).
:func:`routed_linear` cuts each adapter the same way, so a switched-off head or channel group
gets no update either:

- rows cut: ``B_a``'s rows (and its bias) follow the Linear's output rows, ``A_a`` stays whole;
- columns cut: ``A_a``'s columns follow the Linear's input columns, ``B_a`` stays whole;
- a skipped token is never computed on a sliced path; on the masked path the update is added
  before fc2's output is multiplied by the token mask, so it is zeroed with the rest.

The cut copies of ``A_a`` and ``B_a`` come from the same place as the Linear's (the slice cache,
or the planned path's store), keyed by their own weights and versions. The scale, the active
adapters, ``disable_adapters`` and merged adapters are read at every call, as peft reads them.

DoRA: the magnitude divided by the norm of each output row of ``W + s B A`` scales each output
feature. The norm is taken over the full weights (the value a merged DoRA weight carries, so
routing a merged and an unmerged DoRA agree) and cut to the computed rows.

TD-LoRA (optional, calibration's ``td_lora``): the rank components of the calibration adapter are
scaled by ``1 + g(e(t))``, ``g`` a Linear per routed Linear in ``RouterBank.lora_gates`` reading
the embedding ``e(t)`` the width routers read (zero-initialised: plain LoRA at the start).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynconvert.runtime.dynamic import column_multiplier, per_row
from dynconvert.runtime.routers import COMPUTE_DTYPES, RouterLinear

TD_ADAPTER = "dynconvert"
"""Name of the adapter calibration trains (the one TD-LoRA gates scale)."""


def gate_key(name: str) -> str:
    """The ``RouterBank.lora_gates`` key of the routed Linear ``name`` (no dots in module keys).

    Example:
        >>> gate_key("blocks.0.attn.qkv")
        'blocks:0:attn:qkv'
    """
    return name.replace(".", ":")


def add_gates(bank: Any, names: list[str], rank: int) -> None:
    """Give the routed Linears ``names`` a TD-LoRA gate each in ``bank.lora_gates``: a Linear
    from the width routers' timestep embedding to ``rank`` values, zero (plain LoRA) at first.

    Example:
        >>> add_gates(get_state(model), ["blocks.0.attn.qkv"], rank=4)  # doctest: +SKIP
    """
    device = bank.always_on.device
    for name in names:
        gate = RouterLinear(bank.config.router_embed_dim, rank)
        nn.init.zeros_(gate.weight)
        nn.init.zeros_(gate.bias)
        bank.lora_gates[gate_key(name)] = gate.to(device)


def lora_of(lin: nn.Module) -> Any:
    """The adopted peft LoRA layer around routed Linear ``lin``, or None."""
    return lin.__dict__.get("_dc_lora")


def base_of(module: nn.Module) -> nn.Module:
    """The routed module under a LoRA layer (``module`` itself when it is not one)."""
    get = getattr(module, "get_base_layer", None)
    return get() if get is not None else module


def _apply(
    mod: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
) -> torch.Tensor:
    """``mod``'s own op with weight ``w`` and bias ``b``: a Linear, or a convolution."""
    if w.dim() == 2:
        return F.linear(x, w, b)
    return mod._conv_forward(x, w, b)


def _computed(w: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``w`` in ``dtype`` if its own is a storage dtype (float8), else as it is."""
    return w if w is None or w.dtype in COMPUTE_DTYPES else w.to(dtype)


def routed_linear(
    bank: Any,
    lin: nn.Module,
    x: torch.Tensor,
    axis: str | None = None,
    units: tuple[int, ...] = (),
    index: torch.Tensor | None = None,
    gather: tuple[torch.Tensor, torch.Size] | None = None,
    part: slice | None = None,
) -> torch.Tensor:
    """x -> ``lin``'s output as this call routes it, its adapters' updates included.

    Args:
        bank: the RouterBank (its ``sliced`` gives the cut weights of the call's mode).
        lin: a routed Linear (or pointwise convolution).
        x: its input, already cut to the computed columns / tokens.
        axis: "rows" or "cols" to cut the weight to ``index`` (``units`` names the unit set);
            None: full width.
        gather: (rows of the flattened B * N computed, (B, N)) when the MLP gathered tokens:
            maps each computed row to its sample for per-sample TD-LoRA gates.
        part: with ``axis="rows"``, only these of the ``index`` rows (a fused input projection
            computes its MLP's rows on the gathered tokens and the others on every token:
            shared_in.py); the cut weights stay one cache entry, the part is a view of them.

    Returns:
        The output (..., rows computed) of the Linear plus every active adapter's update.
    """
    if axis is None:
        w, b = lin.weight, lin.bias
    else:
        w, b = bank.sliced(lin, axis, units, index)
    if part is not None:  # rows only: (rows of the part, in)
        w, b = w[part], None if b is None else b[part]
    y = _apply(lin, x, w, b)
    wrapper = lora_of(lin)
    if wrapper is None or wrapper.merged or wrapper.disable_adapters:
        return y
    cut = (axis, units, index, part)
    return _with_updates(bank, lin, wrapper, x, y, (w, b), cut, gather)


def _with_updates(
    bank: Any,
    lin: nn.Module,
    wrapper: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    wb: tuple[torch.Tensor, torch.Tensor | None],
    cut: tuple[str | None, tuple[int, ...], torch.Tensor | None, slice | None],
    gather: tuple[torch.Tensor, torch.Size] | None,
) -> torch.Tensor:
    """``y`` plus the update of each active adapter of ``wrapper``, cut like ``lin`` (peft's
    loop over ``active_adapters``, with A's columns / B's rows cut to ``cut``)."""
    axis, units, index, part = cut
    out = y
    for name in wrapper.active_adapters:
        if name not in wrapper.lora_A:
            continue
        A, B = wrapper.lora_A[name], wrapper.lora_B[name]
        xa = x.to(A.weight.dtype) if getattr(wrapper, "cast_input_dtype_enabled", True) else x
        wa = bank.sliced(A, "cols", units, index)[0] if axis == "cols" else A.weight  # (r, in')
        w_b, b_b = bank.sliced(B, "rows", units, index) if axis == "rows" else (B.weight, B.bias)
        if part is not None:  # (rows of the part, r): B's rows follow the Linear's
            w_b, b_b = w_b[part], None if b_b is None else b_b[part]
        # diffusers' layerwise casting on the peft layers themselves stores A and B in float8
        # and casts them in their forward hooks, which a cut weight never runs: cast here.
        wa, w_b, b_b = (_computed(v, xa.dtype) for v in (wa, w_b, b_b))
        drop = wrapper.lora_dropout[name]
        if name in wrapper.lora_magnitude_vector:  # DoRA
            out = _dora(wrapper, name, lin, xa, out, wb, (wa, w_b, b_b), axis, index, part)
            continue
        h = _apply(A, drop(xa), wa, None)  # (..., r)
        if name == TD_ADAPTER:
            h = _gate(bank, lin, h, gather)
        out = out + _apply(B, h, w_b, b_b) * wrapper.scaling[name]
    return out.to(y.dtype)


def _dora(
    wrapper: Any,
    name: str,
    lin: nn.Module,
    x: torch.Tensor,
    out: torch.Tensor,
    wb: tuple[torch.Tensor, torch.Tensor | None],
    lora_w: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    axis: str | None,
    index: torch.Tensor | None,
    part: slice | None = None,
) -> torch.Tensor:
    """``out`` plus one DoRA adapter's term, as peft's ``DoraLinearLayer`` computes it, cut.

    peft: ``(m / n - 1) * (out - bias) + (m / n) * s * B A x`` with ``n`` the norm of each
    output row of ``W + s B A`` (detached) and ``out`` the result so far; under training-mode
    dropout the base term is ``W dropout(x)`` instead of ``out - bias``.
    """
    A, B = wrapper.lora_A[name], wrapper.lora_B[name]
    wa, w_b, b_b = lora_w
    s = wrapper.scaling[name]
    scale = wrapper.lora_magnitude_vector[name].weight / _row_norm(wrapper, name, lin, s, x.dtype)
    if axis == "rows":
        scale = scale.index_select(0, index)  # (rows computed,)
        scale = scale if part is None else scale[part]
    drop = wrapper.lora_dropout[name]
    w, b = wb
    if isinstance(drop, nn.Identity) or not wrapper.training:
        base = out if b is None else out - b
    else:
        x = drop(x)
        base = F.linear(x, w)
    lora = _apply(B, _apply(A, x, wa, None), w_b, b_b)
    return out + (scale - 1) * base + scale * lora * s


@torch.compiler.disable
def _row_norm(
    wrapper: Any, name: str, lin: nn.Module, s: float, dtype: torch.dtype
) -> torch.Tensor:
    """(out,) norm of each output row of ``W + s B A`` over the full weights, no gradient.

    Kept while the weights' versions, ``s`` and the dtype are unchanged (evaluation computes it
    once; a training step's new A and B recompute it, as peft does every call).
    """
    A, B = wrapper.lora_A[name].weight, wrapper.lora_B[name].weight
    w = lin.weight
    stamp = (w._version, w.data_ptr(), A._version, A.data_ptr(), B._version, B.data_ptr(), s, dtype)
    cache = wrapper.__dict__.setdefault("_dc_norms", {})
    hit = cache.get(name)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    with torch.no_grad():
        full = w.to(dtype) + s * (B.to(dtype) @ A.to(dtype))  # (out, in)
        norm = torch.linalg.norm(full, dim=1).to(dtype)
    cache[name] = (stamp, norm)
    return norm


def _gate(
    bank: Any, lin: nn.Module, h: torch.Tensor, gather: tuple[torch.Tensor, torch.Size] | None
) -> torch.Tensor:
    """h (..., r) times its TD-LoRA gate ``1 + g(e(t))`` per sample (h itself without a gate)."""
    gates = bank.lora_gates
    key = gate_key(lin._dc_name)
    call = bank.current_call()  # this thread's forward call (call.py)
    if key not in gates or call.t is None:
        return h
    if call.emb is None:  # the width routers' timestep embedding of this call, made once
        call.emb = bank.t_embed(call.t)
    g = 1 + gates[key](call.emb).to(h.dtype)  # (Bt, r)
    if gather is not None and g.shape[0] > 1:  # gathered tokens: each row's own sample
        idx, lead = gather
        n = math.prod(lead[1:]) if len(lead) > 1 else 1
        return h * per_row(g, lead[0]).index_select(0, idx // n)  # (K, r)
    return h * column_multiplier(g, h, channels_first=h.dim() > 2 and lin.weight.dim() > 2)


def adapter_cuts(lin: nn.Module, axis: str) -> list[nn.Module]:
    """The adapter modules of routed Linear ``lin`` cut along ``axis`` with it: every adapter's
    B for "rows", its A for "cols" (what the planned path pre-slices with the Linear)."""
    wrapper = lora_of(lin)
    if wrapper is None:
        return []
    table = wrapper.lora_B if axis == "rows" else wrapper.lora_A
    return list(table.values())


def adapters_stamp(lins: list[nn.Module]) -> tuple:
    """Changes whenever an adapter of these routed Linears is added, deleted, edited, merged,
    switched, disabled or rescaled (the planned path rebuilds its slices and graphs then)."""
    state = []
    for lin in lins:
        wrapper = lora_of(lin)
        if wrapper is None:
            continue
        params = [*wrapper.lora_A.parameters(), *wrapper.lora_B.parameters()]
        params += list(wrapper.lora_magnitude_vector.parameters())
        state.append((
            tuple(wrapper.active_adapters), tuple(sorted(wrapper.scaling.items())),
            bool(wrapper.disable_adapters), tuple(wrapper.merged_adapters),
            sum(p._version for p in params), sum(p.data_ptr() for p in params),
        ))  # fmt: skip
    return tuple(state)
