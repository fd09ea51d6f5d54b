"""Writing one traced program in a deployment format: pt2, AOTInductor (aoti) or ONNX.

- ``pt2``: ``torch.export.save`` of the ExportedProgram (its weights are inputs: the file holds
  the graph and a few small constants such as index tensors).
- ``aoti``: ``torch._inductor.aoti_compile_and_package``: C++ compiled for the device the
  model is on (CPU here; CUDA when the model is on a GPU).
- ``onnx``: ``torch.onnx.export(..., dynamo=True)`` of the same ExportedProgram; inputs are
  named ``w:<weight>``, ``s:<slice>`` and ``in:<input path>`` in the programs' order (the
  manifest lists them). An aten op with no ONNX translation stops the export with an
  :class:`ExportError` naming the op and the module it comes from.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

import torch

from dynconvert.errors import ExportError

FORMATS = ("pt2", "aoti", "onnx")
SUFFIX = {"pt2": ".pt2", "aoti": ".pt2", "onnx": ".onnx"}


def check_format(fmt: str) -> None:
    """Refuse an unknown format, or onnx without its packages, before any work.

    Example:
        >>> check_format("pt2")
    """
    if fmt not in FORMATS:
        raise ExportError(f"`format` must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if fmt == "onnx":
        for package in ("onnx", "onnxscript", "onnxruntime"):
            try:
                __import__(package)
            except ImportError:
                raise ExportError(
                    f"format onnx needs the {package} package (pip install onnx onnxscript "
                    "onnxruntime), or choose pt2 or aoti"
                ) from None


def onnx_input_names(weights: list[str], slices: list[str], paths: list[list[Any]]) -> list[str]:
    """The ONNX input names of a program, in its input order.

    Example:
        >>> onnx_input_names(["w0"], ["fc1:rows:0"], [["x"], ["cond", "mask"]])
        ['w:w0', 's:fc1:rows:0', 'in:x', 'in:cond.mask']
    """
    return (
        [f"w:{n}" for n in weights]
        + [f"s:{n}" for n in slices]
        + ["in:" + ".".join(str(p) for p in path) for path in paths]
    )


def write_program(
    ep: torch.export.ExportedProgram, path: Path, fmt: str, input_names: list[str] | None = None
) -> None:
    """Write ``ep`` to ``path`` in format ``fmt`` (see the module docstring).

    Raises:
        ExportError: AOTInductor could not compile it, or an op has no ONNX translation.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "pt2":
        ep.example_inputs = None  # they hold the weights: a copy of them in every program
        torch.export.save(ep, str(path))
    elif fmt == "aoti":
        try:
            torch._inductor.aoti_compile_and_package(ep, package_path=str(path))
        except Exception as e:  # noqa: BLE001 - the compiler's failure, reported with its cause
            raise ExportError(
                f"AOTInductor could not compile the program: {type(e).__name__}: "
                f'{_first_line(e)}; export with `format="pt2"` instead'
            ) from e
    else:
        _write_onnx(ep, path, input_names)


def _write_onnx(
    ep: torch.export.ExportedProgram, path: Path, input_names: list[str] | None
) -> None:
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink):  # the exporter prints its progress
            torch.onnx.export(
                ep, f=str(path), dynamo=True, input_names=input_names,
                output_names=["sample", "overflow"], external_data=False,
            )  # fmt: skip
    except Exception as e:  # noqa: BLE001 - the exporter's failure, with the ops it stops at
        missing = unsupported_onnx_ops(ep)
        if missing:
            raise ExportError("ONNX cannot express " + "; ".join(missing) + ONNX_HINT) from e
        ops = sorted(set(re.findall(r"aten[.:]+\w+(?:\.\w+)?", str(e))))
        what = f"op(s) {', '.join(ops)}" if ops else "the program"
        raise ExportError(
            f"torch.onnx could not export {what}: {type(e).__name__}: {_first_line(e)}" + ONNX_HINT
        ) from e


ONNX_HINT = '; export with `format="pt2"` or `format="aoti"` instead'


def unsupported_onnx_ops(ep: torch.export.ExportedProgram) -> list[str]:
    """The aten ops of ``ep`` that torch.onnx has no translation for, each with the module it is
    called from (``aten.foo.default in blocks.0.mlp``); empty when every op translates.

    Read from the exporter's own registry after its own decompositions (a private torch API,
    used only to explain a failed export); an empty list when that registry cannot be read.
    """
    try:
        from torch.onnx._internal.exporter import _decomp, _registration

        registry = _registration.ONNXRegistry.from_torchlib()
        implemented = set(_decomp.get_onnx_implemented_overloads(registry))
        decomposed = ep.run_decompositions(
            _decomp.create_onnx_friendly_decomposition_table(implemented)
        )
    except Exception:  # noqa: BLE001 - private API: absent or changed in this torch
        return []
    out = []
    for node in decomposed.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if registry.is_registered(node.target):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        where = list(stack.values())[-1][0] if stack else "the model"
        out.append(f"{node.target} in {where}")
    return sorted(set(out))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


__all__ = [
    "FORMATS", "SUFFIX", "check_format", "onnx_input_names", "unsupported_onnx_ops",
    "write_program",
]  # fmt: skip
