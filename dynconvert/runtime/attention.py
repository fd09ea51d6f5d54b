"""The attention runtime: one attention site's head masks (masked path) or sliced heads (fast
path) and the head-count attributes lowered for a sliced call (heads.py; see dynamic.py for the
Linears it drives). What a form adds at run time (the cuts of a partial site, the per-head
tables among the module's arguments) is that form's hooks (``dynconvert/sites/<form>_run.py``),
called from here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from dynconvert.plan import AttentionSite
from dynconvert.runtime.compiled import eager_now, run_eagerly
from dynconvert.runtime.dynamic import (
    DynamicLinear,
    SiteRuntime,
    column_multiplier,
    make_dynamic,
    unit_table,
)
from dynconvert.runtime.heads import route_head_count
from dynconvert.runtime.interfaces import CallRouting, Decision, OutState
from dynconvert.runtime.lora_run import routed_linear
from dynconvert.sites import RUNTIMES, load


class AttentionRuntime(SiteRuntime):
    """Routes one attention site: head masks (masked path) or sliced heads (fast path)."""

    # This thread's sliced decision while the module runs (None: full or masked, or not
    # running); the module's head-count attributes read it (heads.py).
    fast = SiteRuntime.in_progress

    def __init__(self, site: AttentionSite, bank: CallRouting, module: nn.Module):
        super().__init__(site, bank, site.v_head_dim * site.group)  # out columns per unit
        for part in site.parts.values():  # what a form cuts with the heads (sites/<form>.py)
            self.tables.update({m.linear: unit_table(m) for m in part.head_maps()})
        load("run")  # the forms' runtime hooks (dynconvert/sites/<form>_run.py)
        self.hooks = [(p, RUNTIMES[k]) for k, p in site.parts.items() if k in RUNTIMES]
        self.fused: dict[str, tuple[str, ...]] = {}  # fused projection fqn -> the fqns it fuses
        # The module reshapes q/k/v with its own head count (timm: num_heads and attn_dim;
        # diffusers: heads); on a sliced call it must read the active count, in that call only.
        for attr, per in site.head_attrs.items():  # "heads", or "attn.heads" on a submodule
            owner, name = _owner(module, attr)
            route_head_count(owner, name, self, per)

    # diffusers `fuse_qkv_projections()` adds a Linear whose rows are those of to_q, to_k, to_v
    # (self-attention) or to_k, to_v (cross-attention) one after another; its processor splits
    # the output into equal parts and reshapes each with the module's head count.
    FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v")}

    def adopt_fused(self, module: nn.Module) -> None:
        """Route the projections fused after convert: their head layout is derived from the
        Linears they concatenate (checked against the weights), so a sliced call computes the
        active heads of every part, part-major, as the processor's split expects."""
        for attr, parts in self.FUSED.items():
            lin = module._modules.get(attr)
            if type(lin) is not nn.Linear:  # absent, or already routed
                continue
            prefix = self.site.name + "." if self.site.name else ""
            names = [prefix + p for p in parts]
            if any(n not in self.tables for n in names):
                raise RuntimeError(
                    f"{prefix}{attr} fuses {', '.join(parts)}, which this site does not route "
                    "together; call unfuse_qkv_projections() before running the converted model"
                )
            tables, offset = [], 0
            for p, n in zip(parts, names):
                src = module._modules[p]
                rows = lin.weight[offset : offset + src.out_features]
                if rows.shape != src.weight.shape or not torch.equal(rows, src.weight):
                    raise RuntimeError(
                        f"{prefix}{attr} does not hold the rows of {', '.join(parts)} one after "
                        "another, so its heads cannot be derived; call unfuse_qkv_projections()"
                    )
                tables.append(self.tables[n] + offset)
                offset += src.out_features
            fqn = prefix + attr
            self.tables[fqn] = torch.cat(tables)  # (parts, units, size): part-major when sliced
            self.fused[fqn] = tuple(names)
            self._decisions.clear()
            self.bank.clear_cache()
            make_dynamic(lin, self, "in", fqn)

    def pre_hook(self, module: nn.Module, args: Any, kwargs: Any) -> tuple[tuple, dict] | None:
        """Forward pre-hook of the attention module: decide the call, which lowers its head
        count for this thread (heads.py), and let its forms change its arguments (per-head
        tables cut)."""
        if eager_now(self.bank):  # traced fast call: decide outside dynamo's guards
            return run_eagerly(type(self).pre_hook, self, module, args, kwargs)
        self.fast = None
        bank, site = self.bank, self.site
        if getattr(module, "fused_projections", False):
            self.adopt_fused(module)
        if not bank.fast_for(site):
            return
        bank.width_mask(site.index)  # recorded for FLOPs accounting
        d = bank.decision(self, bank.always_on.device)  # per call, or per pattern when planned
        if d is None:
            return
        self.fast = d  # the head counts read it until the post-hook
        changed = False
        for part, hooks in self.hooks:  # a form's change to the arguments of a sliced call
            new = hooks.arguments(self, part, args, kwargs, d)
            if new is not None:
                (args, kwargs), changed = new, True
        return (args, kwargs) if changed else None

    def attach_parts(self, modules: dict[str, nn.Module]) -> list[Any]:
        """The module hooks the site's forms add at convert (``modules``: the model's, by fqn);
        returns their handles."""
        return [h for part, hooks in self.hooks for h in hooks.attach(self, part, modules)]

    def out_state(self) -> OutState:
        """For a shared out-projection: this call's decision, sliced?, head mask if masked."""
        if self.ran is not None:
            return OutState(self.ran, True, None)
        if self.bank.fast_for(self.site):
            return OutState(None, True, None)  # every head on
        return OutState(None, False, self.bank.width_mask(self.site.index))

    @property
    def ran(self) -> Decision | None:
        """The decision of this thread's last call whose projections ran (None: every head):
        the heads the attention output holds. A cache hook (diffusers' PAB, TaylorSeer) may hand
        back an older output, so it outlives the call (call.py)."""
        return self.bank.current_call().ran.get(self.site.index)

    @ran.setter
    def ran(self, d: Decision | None) -> None:
        self.bank.current_call().ran[self.site.index] = d

    def post_hook(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        """Forward hook (also called when the forward raises): the head counts read the held
        values again."""
        if eager_now(self.bank):
            return run_eagerly(type(self).post_hook, self, module, args, kwargs, output)
        self.fast = None

    def record_in(self, name: str, x: torch.Tensor) -> None:
        """Note the tokens input Linear ``name`` runs on in this call, x (B, N, C_in), for the
        FLOPs of its rows and of QK^T and AV: n queries, m keys (m differs from n in
        cross-attention)."""
        rec = self.bank.record(self.site.index)
        tokens = math.prod(x.shape[1:-1]) if x.dim() > 2 else x.shape[0]
        seen = rec.setdefault("seen", {})
        for src in self.fused.get(name, (name,)):  # a fused projection counts as its parts
            seen[src] = tokens
        rec["rows"] = x.shape[0]

    def in_call(self, name: str, x: torch.Tensor) -> tuple[Decision | None, None]:
        """For an input projection shared with another site (shared_in.py): note the call, and
        return its decision (None: every head's rows); an attention has no MLP call. Like an
        input projection of its own, it notes the decision as the one the heads ran with (what
        a shared out-projection reads through :meth:`out_state`)."""
        self.ran = self.fast
        self.record_in(name, x)
        return self.fast, None

    def linear_forward(self, lin: DynamicLinear, x: torch.Tensor) -> torch.Tensor:
        """Forward of one of the site's Linears: x (B, N, C_in) -> (B, N, C_out)."""
        site, bank = self.site, self.bank
        d = self.fast
        if lin._dc_role == "in":
            self.ran = d
            name = lin._dc_name
            self.record_in(name, x)
            if d is None:  # the masked path zeroes heads at the out-projection only
                return routed_linear(bank, lin, x)
            rows = d.rows.get(name)
            if rows is None:  # a projection fused after this decision was made (adopt_fused)
                rows = d.rows[name] = self.tables[name][:, d.units].reshape(-1).to(x.device)
            # Active heads' rows (of the weight, the bias and each LoRA's B).
            return routed_linear(bank, lin, x, "rows", d.key, rows)  # (B, N, parts * H' * d)
        name, d = lin._dc_name, self.ran
        if d is not None:  # out-projection, fast path: x (B, N, H' * dv [+ kept columns])
            if d.sub is not None:  # several timesteps: zero each sample's extra heads
                x = x * column_multiplier(d.sub[name], x)
            # Active heads' columns (of the weight and each LoRA's A), the whole bias.
            return routed_linear(bank, lin, x, "cols", d.key, d.cols[name])  # (B, N, D)
        # Masked path: zero the switched-off heads' outputs before the out-projection, which is
        # what removing them computes (the bias is added either way).
        mask = bank.width_mask(site.index)  # (Bt, H) or None
        if mask is not None:
            x = self.masked_out(name, mask, x)
        return routed_linear(bank, lin, x)


def _owner(module: nn.Module, path: str) -> tuple[Any, str]:
    """The object holding attribute ``path`` ("heads" or "attn.heads") and its last name."""
    if "." not in path:
        return module, path
    sub, name = path.rsplit(".", 1)
    return module.get_submodule(sub), name
