"""CUDA graphs: one graph per routing pattern and input shape, captured lazily, replayed after.

A diffusion transformer at sampling batch sizes is launch-bound on a GPU: hundreds of small
kernels per call, each launched from Python. A CUDA graph records the kernels of one call once
and replays them with a single launch. That needs a call whose shapes and kernels never depend
on data, which is what the planned path gives (planner.py): after the timestep read at the start
of a call, everything is fixed by the call's *pattern* and its input shapes.

:func:`enable_cuda_graphs` puts a :class:`GraphedForward` in front of a model's ``forward`` (an
instance attribute: the class, ``from_pretrained``, hooks and the state dict are untouched). On
each call it picks the graph of (pattern, input signature):

- first call of a key: runs eagerly on a side stream (that is the call's result), then captures
  a graph of the same call into a memory pool shared by every graph of the model;
- later calls: copy the inputs into the graph's static inputs, replay, return a copy of the
  outputs (so a later replay cannot overwrite what the caller holds);
- eager instead (never an error): not CUDA, autograd on, training, a converted model not on the
  planned path (fast or masked execution), inputs that are not tensors or plain values, more
  than ``max_graphs`` keys, or a capture that failed (the reason is kept in ``stats``).

Works the same for an unconverted model (the key is then the input signature alone), so
benchmarks compare graphed with graphed. Threads may call a graphed model at once: a graph's
static inputs and outputs are shared, so captures and replays take turns (eager calls do not).
``dynconvert.load`` enables it: a loaded model in evaluation on CUDA runs planned and graphed
with nothing for the user to do.
"""

from __future__ import annotations

import copy
import functools
import inspect
import time
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from dynconvert.runtime.shared import SharedLock
from dynconvert.runtime.state import get_state, is_converted

ATTR = "_dynconvert_graphs"
"""Instance attribute holding a model's :class:`GraphedForward` (``forward`` points to it)."""


class _Entry:
    """One captured graph: its static inputs and outputs and the call's routing records."""

    __slots__ = ("graph", "inputs", "outputs", "records")

    def __init__(self, graph: Any, inputs: list[torch.Tensor], outputs: Any, records: dict):
        self.graph = graph
        self.inputs = inputs  # the tensor leaves the graph reads (copied into before a replay)
        self.outputs = outputs  # the pytree the graph writes
        self.records = records  # the bank's records of the captured call (FLOPs accounting)


class GraphedForward:
    """A model's forward with CUDA graphs per (pattern, input signature); see the module doc.

    Attributes:
        max_graphs: graphs kept at most; calls with new keys beyond it run eagerly.
        stats: ``graphs``, ``replays``, ``eager_calls``, ``capture_s`` (total seconds spent
            capturing) and ``failures`` (key -> reason of a capture that failed).
    """

    def __init__(self, model: nn.Module, max_graphs: int = 64, capture: Any = None):
        self.model = model
        self.forward = type(model).forward.__get__(model)  # the class's forward, bound
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, _Entry] = {}
        self.eager_keys: set[tuple] = set()
        self.pool: Any = None
        self.stamp: tuple | None = None
        self.stats: dict[str, Any] = {
            "graphs": 0,
            "replays": 0,
            "eager_calls": 0,
            "capture_s": 0.0,
            "failures": {},
        }
        self._capture = capture or _capture_cuda  # tests on CPU pass a stand-in
        self._lock = SharedLock()  # one capture or replay at a time (shared static buffers)
        functools.update_wrapper(self, self.forward)  # type: ignore[arg-type]
        self.__signature__ = inspect.signature(self.forward)

    def __deepcopy__(self, memo: dict) -> GraphedForward:
        """A copy of the model gets a fresh, empty runner of its own (graphs are not copied)."""
        model = memo.get(id(self.model))
        if model is None:
            model = copy.deepcopy(self.model, memo)
        return GraphedForward(
            model, self.max_graphs, self._capture if self._capture is not _capture_cuda else None
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward: replayed, captured, or eager (see the module docstring)."""
        with self._lock:
            key = self._key(args, kwargs)
            eager = key is None or key in self.eager_keys
            eager = eager or (key not in self.graphs and len(self.graphs) >= self.max_graphs)
            if not eager:
                return self._graphed(key, args, kwargs)
            self.stats["eager_calls"] += 1
        return self.forward(*args, **kwargs)

    def _graphed(self, key: tuple, args: tuple, kwargs: dict) -> Any:
        """Replay the graph of ``key``, or capture it on its first call (under the lock)."""
        entry = self.graphs.get(key)
        if entry is None:
            return self._first_call(key, args, kwargs)
        leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        for dst, src in zip(entry.inputs, leaves):
            dst.copy_(src)
        entry.graph.replay()
        self.stats["replays"] += 1
        if is_converted(self.model):
            get_state(self.model).records = {i: dict(r) for i, r in entry.records.items()}
        return pytree.tree_map(
            lambda x: x.clone() if isinstance(x, torch.Tensor) else x, entry.outputs
        )

    # -- keys -----------------------------------------------------------------------------------
    def _key(self, args: tuple, kwargs: dict) -> tuple | None:
        """(routing key, input signature), or None when this call must run eagerly."""
        if torch.is_grad_enabled() or self.model.training:
            return None
        leaves, spec = pytree.tree_flatten((args, kwargs))
        sig: list[Any] = []
        device = None
        for x in leaves:
            if isinstance(x, torch.Tensor):
                sig.append((tuple(x.shape), x.dtype, x.device))
                device = device or x.device
            elif x is None or isinstance(x, (bool, int, float, str)):
                sig.append(x)
            else:
                return None  # an object the graph cannot take as a static input
        if device is None or device.type not in self._devices():
            return None
        routing: Any = "original"
        epoch = 0
        if is_converted(self.model):
            bank = get_state(self.model)
            if bank.mode_now == "eval":
                if not bank.planned_now:
                    return None  # the fast path syncs per site; masked is the reference
                routing = ("planned", bank.planner.current.key)
                epoch = bank.planner.epoch
                if len(routing[1]) > 1 and not all(s.fast for s in bank.plan.sites):
                    return None  # masked sites read per-call masks of a mixed-t batch
            elif bank.mode_now == "full":
                routing = "full"
            else:
                return None
        stamp = (self._params_stamp(), epoch, torch.is_autocast_enabled("cuda"))
        if stamp != self.stamp:  # weights moved or replaced, or new pre-sliced weights
            self.release()
            self.stamp = stamp
        return (routing, str(spec), tuple(sig))

    def _devices(self) -> tuple[str, ...]:
        return ("cuda",) if self._capture is _capture_cuda else ("cuda", "cpu")

    def _params_stamp(self) -> tuple:
        ps = list(self.model.parameters())
        return (len(ps), sum(p.data_ptr() for p in ps))

    # -- capture --------------------------------------------------------------------------------
    def _first_call(self, key: tuple, args: tuple, kwargs: dict) -> Any:
        """Run the call eagerly (its result), then capture the same call into a graph."""
        out = self._capture.warmup(self.forward, args, kwargs)
        leaves = pytree.tree_leaves(out)
        if not all(
            isinstance(x, torch.Tensor) or x is None or isinstance(x, (bool, int, float))
            for x in leaves
        ):
            self.eager_keys.add(key)
            self.stats["failures"][str(key[0])] = "the output holds objects other than tensors"
            return out
        bank = get_state(self.model) if is_converted(self.model) else None
        warm = {i: dict(r) for i, r in bank.records.items()} if bank is not None else {}
        static = pytree.tree_map(
            lambda x: x.clone() if isinstance(x, torch.Tensor) else x, (args, kwargs)
        )
        inputs = [x for x in pytree.tree_leaves(static) if isinstance(x, torch.Tensor)]
        t0 = time.perf_counter()
        try:
            graph, outputs, self.pool = self._capture.capture(self.forward, static, self.pool)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            self.eager_keys.add(key)
            self.stats["failures"][str(key[0])] = f"capture failed: {e}"[:300]
            return out
        finally:
            captured = {i: dict(r) for i, r in bank.records.items()} if bank is not None else {}
            if bank is not None:  # this call's records are the eager run's, not the capture's
                bank.records = warm
        self.stats["capture_s"] += time.perf_counter() - t0
        self.graphs[key] = _Entry(graph, inputs, outputs, captured)
        self.stats["graphs"] = len(self.graphs)
        return out

    def release(self) -> None:
        """Drop every graph and the shared pool (frees their memory)."""
        self.graphs.clear()
        self.eager_keys.clear()
        self.pool = None
        self.stats["graphs"] = 0


class _CudaCapture:
    """torch.cuda.CUDAGraph capture: warm-up on a side stream, capture into a shared pool."""

    @staticmethod
    def warmup(fn: Any, args: tuple, kwargs: dict) -> Any:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = fn(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        return out

    @staticmethod
    def capture(fn: Any, static: tuple, pool: Any) -> tuple[Any, Any, Any]:
        args, kwargs = static
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs = fn(*args, **kwargs)
        return graph, outputs, pool if pool is not None else graph.pool()


_capture_cuda = _CudaCapture()


def enable_cuda_graphs(
    model: nn.Module, max_graphs: int = 64, capture: Any = None
) -> GraphedForward:
    """Run ``model`` through CUDA graphs on CUDA (per pattern and input shape; eager elsewhere).

    Safe on any device: on CPU, in training or with autograd on, calls run eagerly as before.
    ``capture`` replaces the CUDA capture (tests use a stand-in to check the bookkeeping on CPU).

    Example:
        >>> from dynconvert.testing import tiny_dit
        >>> runner = enable_cuda_graphs(tiny_dit())
        >>> runner.stats["graphs"]
        0
    """
    disable_cuda_graphs(model)
    runner = GraphedForward(model, max_graphs, capture)
    model.__dict__[ATTR] = runner
    model.forward = runner  # an instance attribute: nn.Module.__call__ finds it first
    return runner


def disable_cuda_graphs(model: nn.Module) -> None:
    """Remove what :func:`enable_cuda_graphs` installed (graphs and pool are freed)."""
    runner = model.__dict__.pop(ATTR, None)
    if runner is not None:
        runner.release()
    if isinstance(model.__dict__.get("forward"), GraphedForward):
        del model.__dict__["forward"]


def graph_stats(model: nn.Module) -> dict[str, Any] | None:
    """The graph runner's counters (graphs, replays, eager calls, capture seconds), or None.

    Example:
        >>> from dynconvert.testing import tiny_dit
        >>> graph_stats(tiny_dit()) is None
        True
    """
    runner = model.__dict__.get(ATTR)
    return None if runner is None else dict(runner.stats)


__all__ = ["GraphedForward", "disable_cuda_graphs", "enable_cuda_graphs", "graph_stats"]
