"""The fallback capture: a robust torch.fx tracer, module by module.

Used when ``torch.export`` cannot capture the whole model. Starting at the root, each module
that was called in an eager run is traced with torch.fx; a submodule that cannot be traced
becomes a leaf (never a crash), and a module that cannot be traced at all is replaced by its
children, traced the same way. Every captured graph is run once on the inputs that module saw
(recorded eagerly), so every op has its real shapes and values (its OpNodes: fx_nodes.py).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.fx
from torch import nn

from dynconvert.analysis.export_graph import from_export
from dynconvert.analysis.fx_nodes import LEAF_MODULES, join_fqn, leaf_node, to_opnodes
from dynconvert.analysis.graph import FX_CAPTURE, OpGraph, OpNode, link_users, quiet_torch
from dynconvert.analysis.meta import is_meta, to_meta
from dynconvert.inputs import check_inputs_run


class RobustTracer(torch.fx.Tracer):
    """An fx Tracer that keeps Linears as call_module nodes and remembers where tracing broke."""

    def __init__(self, leaves: set[str]):
        super().__init__()
        self.extra_leaves = leaves  # submodules that failed to trace in an earlier attempt
        self.failed: str | None = None  # the innermost module whose tracing raised

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        """Keep Linears, convolutions, Embeddings and ``extra_leaves`` whole; else fx's default."""
        # Linears stay whole so that each one maps to one module (its fqn names the site).
        if isinstance(m, LEAF_MODULES):
            return True
        if qualname in self.extra_leaves:
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        """Trace a call to ``m`` as fx does; if it raises, note the innermost failing module.

        That module's path goes into ``failed`` (set once, as the error first unwinds) and the
        exception is re-raised.
        """
        name = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # The innermost failing module is seen first as the error unwinds: keep that one.
            if self.failed is None:
                self.failed = name
            raise


class _Recorder(torch.fx.Interpreter):
    """Runs a GraphModule and keeps every node's output."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n.name] = out
        return out


def _record_inputs(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, tuple[tuple, dict]]:
    """Run the model once eagerly; module fqn -> the (args, kwargs) of its first call.

    Modules never called (unused branches) are absent. Raises ExampleInputsError when the
    inputs do not run the model.
    """
    seen: dict[str, tuple[tuple, dict]] = {}
    handles = []
    for name, m in model.named_modules():

        def hook(mod: nn.Module, a: tuple, k: dict, name: str = name) -> None:  # binds name
            seen.setdefault(name, (a, k))

        handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        check_inputs_run(model, args, kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen


def capture_fx(model: nn.Module, args: tuple, kwargs: dict) -> OpGraph:
    """Capture the model module by module with :class:`RobustTracer`."""
    inputs = _record_inputs(model, args, kwargs)
    nodes: list[OpNode] = []
    traced: list[str] = []  # modules captured whole
    exported: list[str] = []  # modules captured whole by torch.export on their recorded inputs
    leaves_all: list[str] = []  # submodules kept as opaque leaves inside them
    untraced: list[str] = []  # modules replaced by their children

    def visit(fqn: str, module: nn.Module) -> None:
        """Trace ``module`` whole if possible, else visit its children (top-down)."""
        if not any(True for _ in module.parameters()):
            return  # no weights, so no site here (matmuls inside, if any, go uncounted)
        if isinstance(module, LEAF_MODULES):
            if fqn in inputs:  # a leaf called directly by an untraceable parent: count it alone
                nodes.append(leaf_node(module, fqn, *inputs[fqn]))
            return
        if fqn and fqn in inputs:
            # A block that torch.export captures on the inputs it saw gives the full aten graph
            # (inside attention processors too): better than tracing it with leaves.
            sub = export_module(module, fqn, *inputs[fqn])
            if sub is not None:
                nodes.extend(sub)
                exported.append(fqn)
                return
        if fqn in inputs:
            got = _trace_module(module, fqn, *inputs[fqn])
            if got is not None:
                sub, leaves = got
                nodes.extend(sub)
                traced.append(fqn or "<root>")
                leaves_all.extend(leaves)
                return
            untraced.append(fqn or "<root>")
        for name, child in module.named_children():
            visit(f"{fqn}.{name}" if fqn else name, child)

    visit("", model)
    # Modules kept as opaque leaves (untraceable by fx): capture each on its own, so an
    # attention written in an untraceable module still shows its projections and its call.
    opaque = []
    for leaf in leaves_all:
        if leaf in inputs:
            sub = export_module(model.get_submodule(leaf), leaf, *inputs[leaf])
            if sub is not None:
                nodes.extend(sub)
                exported.append(leaf)
                continue
        opaque.append(leaf)
    leaves_all = opaque
    link_users(nodes)
    note = f"torch.fx per module: traced {len(traced)} module(s)"
    if exported:
        more = "..." if len(exported) > 3 else ""
        note += f"; {len(exported)} exported on their own ({', '.join(exported[:3])}{more})"
    if untraced:
        more = "..." if len(untraced) > 3 else ""
        note += f"; {len(untraced)} untraceable, split into children "
        note += f"({', '.join(untraced[:3])}{more})"
    if leaves_all:
        more = "..." if len(leaves_all) > 4 else ""
        note += f"; kept as leaf: {', '.join(leaves_all[:4])}{more}"
    return OpGraph(nodes=nodes, capture=FX_CAPTURE, coverage=note)


def export_module(module: nn.Module, prefix: str, args: tuple, kwargs: dict) -> list[OpNode] | None:
    """torch.export one module on the inputs it saw; its ops with fqns under ``prefix``, or None.

    Used per block when the whole model cannot be exported (data-dependent shapes in the
    conditioning path, ``.tolist()`` of caption lengths): the blocks themselves usually can.
    """
    if is_meta(module):  # export traces shapes: every input on the meta device with the weights
        args, kwargs = to_meta((tuple(args), dict(kwargs)))
    try:
        with torch.no_grad(), quiet_torch():
            ep = torch.export.export(module, tuple(args), dict(kwargs), strict=False)
        graph = from_export(ep, module)
    except Exception:  # noqa: BLE001 - not exportable alone: the fx tracer takes over
        return None
    out = []
    for n in graph.nodes:
        n.name = join_fqn(prefix, n.name)
        n.module = join_fqn(prefix, n.module)
        n.stack = (prefix, *(join_fqn(prefix, p) for p in n.stack if p))
        n.linear = join_fqn(prefix, n.linear) if n.linear is not None else None
        n.is_output = False  # the block's outputs are used by the rest of the model
        out.append(n)
    # Parameters and inputs of the block are placeholders: renamed through the args they feed.
    for n in graph.nodes:
        for i in n.inputs:
            if (
                i.kind in ("param", "input")
                and not i.name.startswith(prefix + ".")
                and i.name != prefix
            ):
                i.name = join_fqn(prefix, i.name)
    return out


def _trace_module(
    module: nn.Module, prefix: str, args: tuple, kwargs: dict
) -> tuple[list[OpNode], list[str]] | None:
    """Trace one module on the inputs it saw: (its ops, the submodules kept as leaves), or None.

    Each failing submodule becomes a leaf and tracing is retried (at most 32 times); None when
    the module itself cannot be traced or its graph does not rerun on the recorded inputs.
    """
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    params = inspect.signature(module.forward).parameters
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values()):
        return None
    # Non-tensor arguments (flags, None, ints) are baked in, so Python branches on them trace.
    concrete = {k: v for k, v in bound.arguments.items() if not isinstance(v, torch.Tensor)}
    leaves: set[str] = set()
    graph = None
    for _ in range(32):
        tracer = RobustTracer(leaves)
        try:
            graph = tracer.trace(module, concrete_args=concrete)
            break
        except Exception:  # noqa: BLE001 - an untraceable part becomes a leaf, then we retry
            if not tracer.failed or tracer.failed in leaves:  # own code failed, or no progress
                return None
            leaves.add(tracer.failed)
    if graph is None:
        return None
    # Rerun the graph on the recorded inputs: every node gets its real value, hence its shape.
    try:
        gm = torch.fx.GraphModule(module, graph)
        rec = _Recorder(gm)
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        values = [bound.arguments.get(n.target.lstrip("*"), None) for n in placeholders]
        with torch.no_grad():
            rec.run(*values)
    except Exception:  # noqa: BLE001 - a graph that does not build or rerun is not trusted
        return None
    full = {f"{prefix}.{n}" if prefix else n for n in leaves}
    return to_opnodes(gm, prefix, rec.values), sorted(full)
