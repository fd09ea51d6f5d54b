"""The fallback capture: a robust torch.fx tracer, module by module.

Used when ``torch.export`` cannot capture the whole model. Starting at the root, each module
that was called in an eager run is traced with torch.fx; a submodule that cannot be traced
becomes a leaf (never a crash), and a module that cannot be traced at all is replaced by its
children, traced the same way. Every captured graph is run once on the inputs that module saw
(recorded eagerly), so every op has its real shapes and values.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.fx
from torch import nn

from dynconvert.analysis.graph import (
    OpGraph,
    OpNode,
    canonical_kind,
    linear_like,
    link_users,
    routable_linear,
)
from dynconvert.inputs import check_inputs_run

# Leaf modules the graph still understands: the tracer keeps them as call_module nodes, and
# _module_node gives them the kind of the op they run.
_LEAF_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
# fmt: off
_UNARY_MODULES = (
    nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Mish, nn.Hardswish, nn.Identity,
    nn.Dropout, nn.LeakyReLU, nn.ELU,
)
# fmt: on
_NORM_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


class RobustTracer(torch.fx.Tracer):
    """An fx Tracer that keeps Linears as call_module nodes and remembers where tracing broke."""

    def __init__(self, leaves: set[str]):
        super().__init__()
        self.extra_leaves = leaves  # submodules that failed to trace in an earlier attempt
        self.failed: str | None = None  # the innermost module whose tracing raised

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        """Keep Linears, convolutions, Embeddings and ``extra_leaves`` whole; else fx's default."""
        # Linears stay whole so that each one maps to one module (its fqn names the site).
        if isinstance(m, _LEAF_MODULES):
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
        if isinstance(module, _LEAF_MODULES):
            if fqn in inputs:  # a leaf called directly by an untraceable parent: count it alone
                nodes.append(_leaf_node(module, fqn, *inputs[fqn]))
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
    return OpGraph(nodes=nodes, capture="torch.fx", coverage=note)


def export_module(module: nn.Module, prefix: str, args: tuple, kwargs: dict) -> list[OpNode] | None:
    """torch.export one module on the inputs it saw; its ops with fqns under ``prefix``, or None.

    Used per block when the whole model cannot be exported (data-dependent shapes in the
    conditioning path, ``.tolist()`` of caption lengths): the blocks themselves usually can.
    """
    from dynconvert.analysis.graph import from_export, quiet_torch

    try:
        with torch.no_grad(), quiet_torch():
            ep = torch.export.export(module, tuple(args), dict(kwargs), strict=False)
        graph = from_export(ep, module)
    except Exception:  # noqa: BLE001 - not exportable alone: the fx tracer takes over
        return None
    out = []
    for n in graph.nodes:
        n.name = _join(prefix, n.name)
        n.module = _join(prefix, n.module)
        n.stack = (prefix, *(_join(prefix, p) for p in n.stack if p))
        n.linear = _join(prefix, n.linear) if n.linear is not None else None
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
                i.name = _join(prefix, i.name)
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
    return _to_opnodes(gm, prefix, rec.values), sorted(full)


def _join(prefix: str, name: str) -> str:
    """``prefix.name``, or whichever of the two is not empty."""
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def _to_opnodes(gm: torch.fx.GraphModule, prefix: str, values: dict[str, Any]) -> list[OpNode]:
    """The OpNodes of one traced module (fqns prefixed by ``prefix``), from its rerun values."""
    mapping: dict[str, OpNode] = {}  # fx node name -> OpNode
    out: list[OpNode] = []

    def conv(a: Any) -> Any:
        """fx arguments -> OpNode arguments (nodes replaced by their OpNodes)."""
        if isinstance(a, torch.fx.Node):
            return mapping[a.name]
        if isinstance(a, (list, tuple)):
            return type(a)(conv(x) for x in a)
        if isinstance(a, dict):
            return {k: conv(v) for k, v in a.items()}
        return a

    for node in gm.graph.nodes:
        val = values.get(node.name)
        shape = tuple(val.shape) if isinstance(val, torch.Tensor) else None
        shapes = (
            tuple(tuple(v.shape) for v in val)
            if isinstance(val, (list, tuple))
            and val
            and all(isinstance(v, torch.Tensor) for v in val)
            else None
        )
        # The traced module itself runs every op; fx's stack (if any) names the ones inside it.
        stack_meta = node.meta.get("nn_module_stack") or {}
        stack = tuple(_join(prefix, p) for p, _ in stack_meta.values())
        stack = ((prefix,) if prefix else ()) + stack
        module = stack[-1] if stack else prefix
        last = list(stack_meta.values())[-1] if stack_meta else None
        module_class = (
            f"{last[1].__module__}.{last[1].__qualname__}"
            if last and not isinstance(last[1], str)
            else (last[1] if last else "")
        )
        if node.op == "placeholder":
            on = OpNode(
                name=_join(prefix, node.name), op="input", kind="input", shape=shape, is_input=True
            )
        elif node.op == "get_attr":
            on = OpNode(name=_join(prefix, node.target), op="param", kind="param", shape=shape)
        elif node.op == "output":
            continue
        elif node.op == "call_module":  # a leaf: Linear, conv, norm, activation or untraceable
            on = _module_node(gm, node, prefix, conv, shape)
            stack = stack + (on.module,) if on.module not in stack else stack
            on.stack = stack
        else:  # call_function or call_method
            if node.op == "call_method":
                name = node.target
                replay = _method_caller(node.target)
            else:
                target = node.target
                name = (
                    "getitem"
                    if target is operator.getitem
                    else getattr(target, "__name__", str(target))
                )
                replay = target
            kind = canonical_kind(name)
            # A non-tensor result (x.shape[-1], an int computed in Python) is a constant that
            # replay substitutes with its recorded value.
            if val is not None and not isinstance(val, torch.Tensor) and shapes is None:
                kind = "const"
            on = OpNode(
                name=_join(prefix, node.name),
                op=name,
                kind=kind,
                args=conv(node.args),
                kwargs=conv(dict(node.kwargs)),
                module=module,
                module_class=module_class,
                stack=stack,
                shape=shape,
                shapes=shapes,
                replay=replay,
            )
            if kind == "const":
                on.args = (val,)
            if kind == "linear":  # F.linear(x, self.fc.weight): tie it to the module fc
                w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
                if (
                    isinstance(w, torch.fx.Node)
                    and w.op == "get_attr"
                    and str(w.target).endswith(".weight")
                ):
                    owner = str(w.target)[: -len(".weight")]
                    owner_module = gm.get_submodule(owner)
                    if routable_linear(owner_module) or linear_like(owner_module):
                        on.linear = _join(prefix, owner)
        mapping[node.name] = on
        if node.op not in ("placeholder", "get_attr"):
            out.append(on)
    return out


def _module_node(
    gm: torch.fx.GraphModule, node: torch.fx.Node, prefix: str, conv: Any, shape: Any
) -> OpNode:
    """The OpNode of a leaf module call, with the kind of the op the module runs."""
    m = gm.get_submodule(node.target)
    fqn = _join(prefix, node.target)
    cls = f"{type(m).__module__}.{type(m).__qualname__}"
    args = conv(node.args)
    base = dict(name=fqn, module=fqn, module_class=cls, shape=shape, kwargs=conv(dict(node.kwargs)))
    if routable_linear(m):
        return OpNode(
            op="linear", kind="linear", args=args, linear=fqn, replay=lambda x, _m=m: _m(x), **base
        )
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        # A stand-in weight node: costs.node_macs reads the kernel size from its shape.
        w = OpNode(name=f"{fqn}.weight", op="param", kind="param", shape=tuple(m.weight.shape))
        return OpNode(op="conv", kind="conv", args=(args[0], w), **base)
    if isinstance(m, _NORM_MODULES):
        # The normalised width, which headlocal.py checks against the head layout (qk-norm).
        nshape = list(getattr(m, "normalized_shape", None) or [getattr(m, "num_channels", 0)])
        op = "group_norm" if isinstance(m, nn.GroupNorm) else "layer_norm"
        return OpNode(op=op, kind="norm", args=(args[0], nshape), **base)
    if isinstance(m, _UNARY_MODULES):
        op = "dropout" if isinstance(m, nn.Dropout) else type(m).__name__.lower()
        return OpNode(op=op, kind="unary", args=args, replay=lambda x, _m=m: _m(x), **base)
    if isinstance(m, nn.Embedding):
        return OpNode(op="embedding", kind="embedding", args=args, **base)
    return OpNode(op=type(m).__name__, kind="other", args=args, **base)  # opaque to analysis


def _leaf_node(module: nn.Module, fqn: str, args: tuple, kwargs: dict) -> OpNode:
    """An OpNode for a Linear/Conv/Embedding run on its own (shapes from a real call)."""
    with torch.no_grad():
        out = module(*args, **kwargs)
    x = args[0] if args else next(iter(kwargs.values()))
    inp = OpNode(name=f"{fqn}:input", op="input", kind="input", shape=tuple(x.shape), is_input=True)
    cls = f"{type(module).__module__}.{type(module).__qualname__}"
    base = dict(name=fqn, module=fqn, module_class=cls, stack=(fqn,), shape=tuple(out.shape))
    if routable_linear(module):
        return OpNode(op="linear", kind="linear", args=(inp,), linear=fqn, **base)
    if isinstance(module, nn.Embedding):
        return OpNode(op="embedding", kind="embedding", args=(inp,), **base)
    w = OpNode(name=f"{fqn}.weight", op="param", kind="param", shape=tuple(module.weight.shape))
    return OpNode(op="conv", kind="conv", args=(inp, w), **base)


def _method_caller(method: str) -> Any:
    """A function calling tensor method ``method`` (for replaying call_method nodes)."""

    def call(obj: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(obj, method)(*args, **kwargs)

    return call
