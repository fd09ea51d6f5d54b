"""A small, uniform view of a captured torch.fx graph.

Both capture paths (``torch.export`` non-strict, export_graph.py, and the per-block robust
tracer, fx_capture.py) produce an :class:`OpGraph`: one :class:`OpNode` per operation, with a
canonical ``kind``, the module that ran it (from ``nn_module_stack`` or the tracer), the Linear
it belongs to, its output shape, and a way to replay it on concrete tensors (used to derive row
layouts exactly).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

# Canonical kinds, keyed by the aten overload packet name or torch function/method name. Site
# finding reasons about kinds, not names: the same reshape is "view" in one capture and
# "_unsafe_view" in another, and "gelu" may come as a function, a method or a module.
# fmt: off
SHAPE_OPS = {  # move, view or select values without computing (replayable on index tensors)
    "view", "reshape", "_unsafe_view", "permute", "transpose", "t", "unsqueeze", "squeeze",
    "flatten", "unflatten", "expand", "contiguous", "clone", "alias", "detach", "unbind",
    "chunk", "split", "split_with_sizes", "getitem", "select", "movedim", "swapaxes",
    "lift_fresh_copy", "view_as", "reshape_as", "tensor_split", "slice", "narrow", "flip", "roll",
    "repeat", "repeat_interleave",
}
CAST_OPS = {  # change the dtype only
    "to", "_to_copy", "type_as", "float", "half", "bfloat16", "type", "_assert_tensor_metadata",
}
UNARY_OPS = {  # elementwise on one tensor: act on every channel on its own
    "gelu", "silu", "relu", "sigmoid", "tanh", "mish", "hardswish", "hardsigmoid", "elu",
    "leaky_relu", "softplus", "erf", "exp", "neg", "dropout", "native_dropout", "abs", "sqrt",
    "rsqrt", "square", "relu6", "gelu_", "silu_", "relu_", "dropout_", "feature_dropout",
    "alpha_dropout", "identity", "log_sigmoid", "selu", "celu", "quick_gelu", "pow",
}
BINARY_OPS = {"add", "sub", "mul", "div", "add_", "mul_", "div_", "sub_", "rsub", "truediv"}
NORM_OPS = {
    "layer_norm", "native_layer_norm", "rms_norm", "group_norm", "native_group_norm", "batch_norm",
}
ATTENTION_OPS = {
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_cudnn_attention",
}
MATMUL_OPS = {"matmul", "bmm", "mm", "einsum", "baddbmm", "addmm", "addbmm", "__matmul__"}
SOFTMAX_OPS = {"softmax", "_softmax", "_safe_softmax"}
REDUCE_OPS = {  # reduce over some dims (hand-written norms: x.pow(2).mean(-1, keepdim=True))
    "mean", "sum", "amax", "amin", "var", "std", "linalg_vector_norm", "norm", "logsumexp",
}
COMPLEX_OPS = {"view_as_complex", "view_as_real"}  # rotary embeddings in complex form
FRESH_OPS = {  # new tensors whose values do not depend on the input's (only its shape)
    "empty_like", "zeros_like", "ones_like", "full_like", "new_empty", "new_zeros", "new_ones",
    "new_full",
}
SPATIAL_OPS = {  # act on every channel of a channels-first grid on its own (pooling, resizing)
    # by a fixed factor; adaptive pooling is not here: its factor changes with the resolution
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
    "max_pool2d_with_indices", "interpolate", "upsample_nearest1d", "upsample_nearest2d",
    "upsample_nearest3d", "_upsample_nearest_exact1d", "_upsample_nearest_exact2d",
    "_upsample_nearest_exact3d", "upsample_bilinear2d", "upsample_bicubic2d", "upsample_linear1d",
    "upsample_trilinear3d",
}
MUTATE_OPS = {"copy_"}  # writes into a view: out[..., 0::2] = a (Wan's rotary)
CONV_OPS = {
    "conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d",
    "conv_transpose2d", "conv_transpose3d",
}
# fmt: on


def canonical_kind(name: str) -> str:
    """Map an op name (aten packet, torch function or tensor method) to a canonical kind.

    Example:
        >>> canonical_kind("_unsafe_view"), canonical_kind("gelu_"), canonical_kind("foo")
        ('shape', 'unary', 'other')
    """
    name = name.rstrip("_") if name not in ("__matmul__",) else name  # in-place gelu_ is gelu
    if name == "linear":
        return "linear"
    if name in ATTENTION_OPS:
        return "attention"
    if name in MATMUL_OPS:
        return "matmul"
    if name in SOFTMAX_OPS:
        return "softmax"
    if name in CONV_OPS:
        return "conv"
    if name in NORM_OPS:
        return "norm"
    if name in SHAPE_OPS:
        return "shape"
    if name in CAST_OPS:
        return "cast"
    if name in UNARY_OPS:
        return "unary"
    if name in BINARY_OPS:
        return "binary"
    if name == "embedding":
        return "embedding"
    if name in ("cat", "concat", "concatenate", "stack"):
        return "cat"
    if name in REDUCE_OPS:
        return "reduce"
    if name in COMPLEX_OPS:
        return "complex"
    if name in SPATIAL_OPS:
        return "spatial"
    if name in FRESH_OPS:
        return "fresh"
    if name + "_" in MUTATE_OPS or name in MUTATE_OPS:
        return "mutate"
    return "other"


@dataclass(eq=False)
class OpNode:
    """One operation of the captured graph."""

    name: str
    op: str  # the original op name (e.g. "view", "scaled_dot_product_attention")
    kind: str  # canonical kind, see canonical_kind
    args: tuple = ()  # OpNodes where the op read a graph value, plain values elsewhere
    kwargs: dict = field(default_factory=dict)
    module: str = ""  # fqn of the innermost module running the op ("" for the root)
    module_class: str = ""  # "package.module.Class" of that module
    stack: tuple[str, ...] = ()  # fqns of the modules whose forward is running, outermost first
    linear: str | None = None  # fqn of the nn.Linear for "linear" nodes
    shape: tuple[int, ...] | None = None  # the output shape at the example inputs
    shapes: tuple[tuple[int, ...], ...] | None = None  # for ops returning several tensors
    replay: Callable[..., Any] | None = None  # the op itself, to rerun on index tensors
    users: list[OpNode] = field(default_factory=list)  # ops that read this one's output
    is_input: bool = False  # a model input (placeholder that is not a parameter)
    is_output: bool = False  # returned by the model (export graphs; unknown for fx captures)

    def __repr__(self) -> str:
        return f"OpNode({self.name}: {self.op} in {self.module or '<root>'} -> {self.shape})"

    @property
    def inputs(self) -> list[OpNode]:
        """Graph nodes among the args (flattening lists), in order."""
        out: list[OpNode] = []
        for a in flat_args(self.args) + flat_args(tuple(self.kwargs.values())):
            if isinstance(a, OpNode):
                out.append(a)
        return out

    @property
    def real_users(self) -> list[OpNode]:
        """Users that compute something (skipping metadata assertions)."""
        return [u for u in self.users if u.op != "_assert_tensor_metadata"]

    def arg(self, i: int, name: str | None = None, default: Any = None) -> Any:
        """Argument ``i``, or keyword ``name`` when it was not passed by position."""
        if len(self.args) > i:
            return self.args[i]
        if name is not None and name in self.kwargs:
            return self.kwargs[name]
        return default


EXPORT_CAPTURE, FX_CAPTURE = "torch.export", "torch.fx"
"""``OpGraph.capture`` (and ``Plan.capture``): the whole model exported, or traced in pieces."""


@dataclass
class OpGraph:
    """The nodes of one captured forward pass, in execution order."""

    nodes: list[OpNode]
    capture: str  # EXPORT_CAPTURE or FX_CAPTURE
    coverage: str = ""  # what was captured, for the plan ("whole model", leaves, failures)
    # Where torch.export met sizes that depend on the input's values: (module, why) each.
    export_stops: list[tuple[str, str]] = field(default_factory=list)
    # Node name -> its value at the example inputs, for the names asked (export captures only:
    # reruns the exported graph; analysis asks only when it needs values, see tables.py).
    evaluate: Callable[[set[str]], dict[str, Any]] | None = None

    def __iter__(self) -> Iterator[OpNode]:
        return iter(self.nodes)

    def linear_nodes(self) -> dict[str, list[OpNode]]:
        """Linear fqn -> the nodes that call it (more than one means the module is reused)."""
        out: dict[str, list[OpNode]] = {}
        for n in self.nodes:
            if n.kind == "linear" and n.linear is not None:
                out.setdefault(n.linear, []).append(n)
        return out


def flat_args(args: Any) -> list[Any]:
    """Nested lists and tuples (torch.cat's tensor list, for one) as one flat list.

    Example:
        >>> flat_args((1, [2, (3,)], "a"))
        [1, 2, 3, 'a']
    """
    out: list[Any] = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out.extend(flat_args(a))
        else:
            out.append(a)
    return out


def linear_like(m: torch.nn.Module) -> bool:
    """A module that is not an nn.Linear but holds exactly what one does: a 2-D ``weight``
    Parameter, an optional 1-D ``bias`` Parameter, no buffers and no submodules; its forward
    may be ``F.linear(x, self.weight, self.bias)`` (analysis checks in the graph that it runs
    nothing else, see :func:`untie_impure_linears`).

    Example:
        >>> class Proj(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.weight = torch.nn.Parameter(torch.zeros(3, 2))
        ...         self.bias = None
        >>> nn = torch.nn
        >>> linear_like(Proj()), linear_like(nn.Linear(2, 3)), linear_like(nn.LayerNorm(2))
        (True, False, False)
    """
    if (
        isinstance(m, torch.nn.Linear)
        or next(m.children(), None) is not None
        or next(m.buffers(), None) is not None
    ):
        return False
    w = m._parameters.get("weight")
    b = m._parameters.get("bias", None)
    names = set(m._parameters) - {"weight", "bias"}
    # A bias attribute (None when unused), as nn.Linear has: the routed forward reads it.
    has_bias = "bias" in m._parameters or getattr(m, "bias", 0) is None
    return (
        isinstance(w, torch.nn.Parameter)
        and w.dim() == 2
        and not names
        and has_bias
        and (b is None or b.dim() == 1)
    )


def untie_impure_linears(graph: OpGraph, model: torch.nn.Module) -> None:
    """Untie the linear ops of :func:`linear_like` modules whose forward runs anything but
    that one linear op on their own weight and bias: routing swaps such a module's forward
    for a plain (sliced) linear, so it must have computed exactly that.

    Example:
        >>> from dynconvert.analysis import analyze
        >>> from dynconvert.testing.patterns import ScaledDense, video_dit
        >>> model, inputs = video_dit(linear=ScaledDense)  # F.linear(...) * 0.5: not plain
        >>> analyze(model, inputs).attention  # its projections were untied: no site
        []
    """
    modules = dict(model.named_modules())
    by_module: dict[str, list[OpNode]] = {}
    for n in graph.nodes:
        if n.module:
            by_module.setdefault(n.module, []).append(n)
    for n in graph.nodes:
        m = modules.get(n.linear) if n.linear else None
        if m is None or not linear_like(m):
            continue
        ops = [x for x in by_module.get(n.linear, []) if x.kind not in ("param", "const", "input")]
        bias = n.arg(2, "bias")
        bias_ok = (m.bias is None and bias is None) or (
            m._parameters.get("bias") is not None
            and isinstance(bias, OpNode)
            and bias.kind == "param"
        )
        if ops != [n] or not bias_ok:
            n.linear = None


def routable_linear(m: torch.nn.Module) -> bool:
    """An nn.Linear, or a subclass that keeps nn.Linear's forward (one that only adds attributes,
    as LoRA-ready or quantisation-ready layers do): its class can be swapped for a routed one.

    Example:
        >>> class Tagged(torch.nn.Linear):
        ...     pass
        >>> routable_linear(Tagged(2, 2)), routable_linear(torch.nn.Conv1d(2, 2, 1))
        (True, False)
    """
    return isinstance(m, torch.nn.Linear) and type(m).forward is torch.nn.Linear.forward


def link_users(nodes: list[OpNode]) -> None:
    """Fill every node's ``users`` from the other nodes' inputs."""
    for n in nodes:
        for i in n.inputs:
            if n not in i.users:
                i.users.append(n)


def call_lca(*nodes: OpNode) -> str:
    """The deepest module whose forward call encloses all the given ops.

    Example:
        >>> a = OpNode("a", "linear", "linear", stack=("blocks.0", "blocks.0.attn"))
        >>> b = OpNode("b", "linear", "linear", stack=("blocks.0", "blocks.0.mlp"))
        >>> call_lca(a, b)
        'blocks.0'
    """
    stacks = [n.stack for n in nodes]
    common = ""
    for entries in zip(*stacks):
        if all(e == entries[0] for e in entries):
            common = entries[0]
        else:
            break
    return common


def module_lca(*fqns: str) -> str:
    """The deepest module containing all the given module paths.

    Example:
        >>> module_lca("blocks.0.attn.qkv", "blocks.0.attn.proj")
        'blocks.0.attn'
    """
    parts = [f.split(".") if f else [] for f in fqns]
    common: list[str] = []
    for seg in zip(*parts):
        if all(s == seg[0] for s in seg):
            common.append(seg[0])
        else:
            break
    return ".".join(common)


def block_of(fqn: str) -> str:
    """The block a site belongs to: the path up to the first list index, else the parent.

    Example:
        >>> block_of("blocks.3.attn"), block_of("mid_block.mlp")
        ('blocks.3', 'mid_block')
    """
    segs = fqn.split(".")
    for i, s in enumerate(segs):
        if s.isdigit():
            return ".".join(segs[: i + 1])
    return ".".join(segs[:-1]) if len(segs) > 1 else fqn


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Silence torch's own log records and warnings while capturing: a failed export logs whole
    graph dumps to the terminal and the fx tracer warns about every specialised input, while
    analysis reports what it has to say in the plan instead. Nor does it record each op's
    Python stack (``node.meta["stack_trace"]``, which nothing here reads): symbolizing them took
    about a tenth of a whole-model export."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    stacks = torch.fx.config.do_not_emit_stack_traces
    torch.fx.config.do_not_emit_stack_traces = True
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"torch(\.|$)")
            yield
    finally:
        logger.setLevel(level)
        torch.fx.config.do_not_emit_stack_traces = stacks
