"""The main capture: an OpGraph from ``torch.export`` (non-strict) of the whole model.

Export lifts parameters and buffers to graph inputs; they are mapped back to their fqns, each
op gets its canonical kind and the module stack that ran it (``nn_module_stack``), and a linear
op is tied to its module through its weight's fqn. A block exported on its own (fx_capture.py)
goes through the same function.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from dynconvert.analysis.graph import (
    EXPORT_CAPTURE,
    OpGraph,
    OpNode,
    canonical_kind,
    flat_args,
    linear_like,
    link_users,
    routable_linear,
)


class DataDependentSize(Exception):
    """Ops of the exported graph return sizes that depend on the input's values (a
    ``nonzero``): their shapes at the example inputs are not known, so the graph is not used.
    ``stops`` lists (module fqn, why) for each such op."""

    def __init__(self, stops: list[tuple[str, str]]):
        self.stops = stops
        super().__init__(stops[0][1])


def _stop(node: torch.fx.Node, op: str) -> tuple[str, str]:
    """(module fqn, why) of an op that returns a data-dependent size."""
    stack = node.meta.get("nn_module_stack") or {}
    module, cls = list(stack.values())[-1] if stack else ("", "")
    module = _clean_path(module)
    where = (cls if isinstance(cls, str) else cls.__qualname__).rsplit(".", 1)[-1] or "model"
    why = (
        f"`{op}` in {module or '<root>'} ({where}) returns a size that depends on the input's "
        "values, which torch.export cannot capture"
    )
    return module, why


def _data_dependent(val: Any) -> bool:
    """Whether a node's example value has a size that depends on the input's values."""
    vals = val if isinstance(val, (list, tuple)) else [val]
    return any(
        isinstance(v, torch.Tensor) and any(free_unbacked_symbols(s) for s in v.shape) for v in vals
    )


def _shape_of(val: Any) -> tuple[tuple[int, ...] | None, tuple[tuple[int, ...], ...] | None]:
    """(shape, None) of a tensor, (None, shapes) of a list of tensors, else (None, None)."""
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape), None
    if isinstance(val, (list, tuple)) and val and all(isinstance(v, torch.Tensor) for v in val):
        return None, tuple(tuple(int(s) for s in v.shape) for v in val)
    return None, None


def from_export(
    ep: torch.export.ExportedProgram, model: torch.nn.Module, any_linear: bool = False
) -> OpGraph:
    """Build an OpGraph from an ExportedProgram (non-strict export of the whole model).

    Linear ops are tied to their module when it is an ``nn.Linear`` with nn.Linear's forward
    (any subclass with ``any_linear``, used to count the costs of an already converted model).
    """
    # Export lifts parameters and buffers to graph inputs: map them back to their fqns.
    sig = ep.graph_signature
    param_of = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    lifted = getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {}
    mapping: dict[str, OpNode] = {}  # fx node name -> OpNode
    nodes: list[OpNode] = []
    linear_types = _linear_fqns(model, any_linear)
    stops: list[tuple[str, str]] = []  # ops whose sizes depend on the input's values

    def conv(a: Any) -> Any:
        """fx arguments -> OpNode arguments (nodes replaced by their OpNodes)."""
        if isinstance(a, torch.fx.Node):
            return mapping.get(a.name, a.name)
        if isinstance(a, (list, tuple)):
            return type(a)(conv(x) for x in a)
        return a

    for node in ep.graph.nodes:
        if node.op == "placeholder":
            shape, _ = _shape_of(node.meta.get("val"))
            target = param_of.get(node.name) or lifted.get(node.name)
            on = OpNode(
                name=target or node.name,
                op="param" if target else "input",
                kind="param" if target else "input",
                shape=shape,
                is_input=not target,
            )
            mapping[node.name] = on
            continue
        if node.op != "call_function":
            continue
        target = node.target
        if target is operator.getitem:
            op_name = "getitem"
        elif isinstance(target, torch._ops.OpOverload):
            op_name = target.overloadpacket.__name__
        else:
            op_name = getattr(target, "__name__", str(target))
        # nn_module_stack: {key: (fqn, class)} of the modules running the op, outermost first.
        stack = node.meta.get("nn_module_stack") or {}
        module, module_class = "", ""
        paths: tuple[str, ...] = ()
        if stack:
            path, cls = list(stack.values())[-1]
            module = _clean_path(path)
            module_class = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
            paths = tuple(_clean_path(p) for p, _ in stack.values())
        if _data_dependent(node.meta.get("val")):
            stops.append(_stop(node, op_name))
            continue
        shape, shapes = _shape_of(node.meta.get("val"))
        on = OpNode(
            name=node.name,
            op=op_name,
            kind=canonical_kind(op_name),
            args=conv(node.args),
            kwargs={k: conv(v) for k, v in node.kwargs.items()},
            module=module,
            module_class=module_class,
            stack=paths,
            shape=shape,
            shapes=shapes,
            replay=target,
        )
        if on.kind == "linear":  # tie it to its module through the weight's fqn
            w = node.args[1]
            wname = param_of.get(w.name) if isinstance(w, torch.fx.Node) else None
            if wname and wname.endswith(".weight") and wname[: -len(".weight")] in linear_types:
                on.linear = wname[: -len(".weight")]
        mapping[node.name] = on
        nodes.append(on)
    if stops:
        raise DataDependentSize(stops)
    for node in ep.graph.nodes:  # what the model returns: a dead end that is not dead code
        if node.op == "output":
            for a in flat_args(tuple(node.args)):
                if isinstance(a, torch.fx.Node) and isinstance(mapping.get(a.name), OpNode):
                    mapping[a.name].is_output = True
    link_users(nodes)
    return OpGraph(nodes=nodes, capture=EXPORT_CAPTURE, coverage="whole model")


def _clean_path(path: str) -> str:
    # Older torch versions prefix paths with "L['self']." or "L__self__."; newer give plain fqns.
    for prefix in ("L['self'].", "L__self__.", "L__self___"):
        if path.startswith(prefix):
            path = path[len(prefix) :]
    return path


def _linear_fqns(model: torch.nn.Module, any_linear: bool = False) -> set[str]:
    """Fqns of the model's routable projections: nn.Linear modules (subclasses only with
    ``any_linear``) and modules that hold only a weight and a bias (:func:`linear_like`)."""
    if any_linear:
        return {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return {name for name, m in model.named_modules() if routable_linear(m) or linear_like(m)}
