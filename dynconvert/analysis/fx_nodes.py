"""The fallback capture's second half: OpNodes from a traced module's fx graph and its rerun.

fx_capture.py traces each module it can with torch.fx and reruns the graph on the inputs the
module saw; here every fx node becomes an :class:`OpNode` with its real shape, the modules kept
whole (Linears, convolutions, norms, activations, untraceable leaves) get the kind of the op they
run, and a linear op is tied to the Linear whose weight it reads.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
from torch import nn

from dynconvert.analysis.graph import OpNode, canonical_kind, linear_like, routable_linear

# Leaf modules the graph still understands: the tracer keeps them as call_module nodes, and
# _module_node gives them the kind of the op they run.
LEAF_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
# fmt: off
_UNARY_MODULES = (
    nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Mish, nn.Hardswish, nn.Identity,
    nn.Dropout, nn.LeakyReLU, nn.ELU,
)
# fmt: on
_NORM_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def join_fqn(prefix: str, name: str) -> str:
    """``prefix.name``, or whichever of the two is not empty.

    Example:
        >>> join_fqn("blocks.0", "attn"), join_fqn("", "attn"), join_fqn("blocks.0", "")
        ('blocks.0.attn', 'attn', 'blocks.0')
    """
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def to_opnodes(gm: torch.fx.GraphModule, prefix: str, values: dict[str, Any]) -> list[OpNode]:
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
        stack = tuple(join_fqn(prefix, p) for p, _ in stack_meta.values())
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
                name=join_fqn(prefix, node.name),
                op="input",
                kind="input",
                shape=shape,
                is_input=True,
            )
        elif node.op == "get_attr":
            on = OpNode(name=join_fqn(prefix, node.target), op="param", kind="param", shape=shape)
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
                name=join_fqn(prefix, node.name),
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
                        on.linear = join_fqn(prefix, owner)
        mapping[node.name] = on
        if node.op not in ("placeholder", "get_attr"):
            out.append(on)
    return out


def _module_node(
    gm: torch.fx.GraphModule, node: torch.fx.Node, prefix: str, conv: Any, shape: Any
) -> OpNode:
    """The OpNode of a leaf module call, with the kind of the op the module runs."""
    m = gm.get_submodule(node.target)
    fqn = join_fqn(prefix, node.target)
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


def leaf_node(module: nn.Module, fqn: str, args: tuple, kwargs: dict) -> OpNode:
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
