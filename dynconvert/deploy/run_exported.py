"""Run a model exported by ``dynconvert export`` with torch alone (standard library + torch).

This file is written into every export folder, next to what it loads::

    manifest.json      timestep -> program, input signature, dtype, capacities, FLOPs ratios
    weights.pt         every weight once (torch.save; loaded with weights_only=True, mmap=True)
    slices.pt          index tensors of the pre-sliced weights (rows/columns per unit set)
    programs/          one program per width pattern (and batch): .pt2, AOTInductor .pt2, .onnx
    run_exported.py    this loader

A program takes ``(weights, slices, *tensor inputs)`` and returns ``(prediction, overflow)``;
:class:`ExportedModel` hides that: ``model(x, t, y)`` is called like the original model, picks
the program of ``t``'s pattern and returns the prediction. ONNX programs need onnxruntime;
``DiffusersTransformer`` (the ``transformer`` of a diffusers pipeline) imports diffusers' output
class when diffusers is there.

Example:
    >>> import run_exported                                         # doctest: +SKIP
    >>> model = run_exported.load("export/")                       # doctest: +SKIP
    >>> eps = model(x, torch.full((2,), 980), y)                   # doctest: +SKIP
"""

from __future__ import annotations

import bisect
import json
import os
from types import SimpleNamespace
from typing import Any

import torch

FORMAT = "dynconvert-export"
VERSION = 1


class ExportedModelError(ValueError):
    """A call the exported programs cannot take, or a folder they cannot be loaded from."""


def load(directory: str | os.PathLike, *, nearest: bool = False, cache_slices: bool = True,
         lazy: bool = False):  # fmt: skip
    """Load an export folder: an ``nn.Module`` whose forward takes the original model's inputs.

    Args:
        directory: the folder ``dynconvert export`` wrote.
        nearest: run a timestep outside the schedule with the pattern of the nearest scheduled
            timestep (default: refuse it, since its width pattern was never computed).
        cache_slices: cut the pre-sliced weights once per pattern and keep them (as the
            planned path does); False cuts them at every call (less memory, slower).
        lazy: read each program on its first call instead of now (a fast start; the first
            call of each pattern then pays for reading it).

    Example:
        >>> model = load("export/")                                  # doctest: +SKIP
    """
    return ExportedModel(directory, nearest=nearest, cache_slices=cache_slices, lazy=lazy)


class ExportedModel(torch.nn.Module):
    """The exported programs of a converted model behind the model's own call."""

    def __init__(self, directory: str | os.PathLike, *, nearest: bool = False,
                 cache_slices: bool = True, lazy: bool = False):  # fmt: skip
        super().__init__()
        self.directory = os.fspath(directory)
        path = os.path.join(self.directory, "manifest.json")
        if not os.path.isfile(path):
            raise ExportedModelError(
                f"{self.directory} holds no manifest.json; pass an export folder"
            )
        with open(path) as f:
            self.manifest = m = json.load(f)
        if m.get("format") != FORMAT or m.get("version", 0) > VERSION:
            raise ExportedModelError(
                f"{path} is not a {FORMAT} manifest of version <= {VERSION}; export the model "
                "again with this dynconvert"
            )
        self.nearest = nearest
        self.cache_slices = cache_slices
        self.inputs = m["inputs"]
        weights = torch.load(self._file(m["weights"]), weights_only=True, mmap=True)
        device = torch.device(m["device"])  # saved on the CPU, run where they were exported
        self.weights = {k: weights[k].to(device) for k in m["weight_names"]}  # the programs' order
        self.slice_specs = torch.load(self._file(m["slices"]), weights_only=True)
        for spec in self.slice_specs.values():
            spec["index"] = spec["index"].to(device)
        self.schedule = sorted((float(t), p) for t, p in m["schedule"])
        self._times = [t for t, _ in self.schedule]
        self.programs = {
            (name, int(b)): (self._file(f), p.get("onnx_inputs"))
            for name, p in m["programs"].items()
            for b, f in p["files"].items()
        }  # (program, batch) -> its file, then its runner once read
        if not lazy:
            for key in self.programs:
                self._runner(key)
        self._t_leaf = [s["path"] for s in self.inputs["tensors"]].index(self.inputs["timestep"])
        self._known = {s["path"][0] for s in self.inputs["tensors"] + self.inputs["constants"]}
        self._slices: dict[str, dict[str, torch.Tensor]] = {}
        self._overflow = torch.zeros(2, dtype=torch.long)

    def _runner(self, key: tuple[str, int]) -> _Runner:
        entry = self.programs[key]
        if isinstance(entry, tuple):
            entry = self.programs[key] = _Runner(
                entry[0], self.manifest["program_format"], entry[1]
            )
        return entry

    def _file(self, name: str) -> str:
        return os.path.join(self.directory, name)

    @property
    def timesteps(self) -> list[float]:
        """The scheduled timesteps (in the model's own convention), ascending."""
        return list(self._times)

    def program_for(self, t: Any) -> str:
        """The program of timestep(s) ``t`` (every value must map to the same program)."""
        values = torch.as_tensor(t).reshape(-1).tolist()  # the one host read of a call
        names = {self._program_of(float(v)) for v in values}
        if len(names) > 1:
            raise ExportedModelError(
                f"the timesteps of one call map to programs {sorted(names)}: every sample of a "
                "call must share one width pattern (call the samples separately)"
            )
        return names.pop()

    def _program_of(self, v: float) -> str:
        i = bisect.bisect_left(self._times, v)
        near = [j for j in (i - 1, i) if 0 <= j < len(self._times)]
        j = min(near, key=lambda k: abs(self._times[k] - v))
        if abs(self._times[j] - v) <= 1e-4 * max(1.0, abs(v)) or self.nearest:
            return self.schedule[j][1]
        raise ExportedModelError(
            f"timestep {v:g} is not in the exported schedule ({len(self._times)} timesteps, "
            f"{self._times[0]:g}..{self._times[-1]:g}); export this schedule, or load with "
            "nearest=True to run the nearest scheduled timestep's pattern"
        )

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The model's prediction for a call made as to the original model."""
        named = self._bind(args, kwargs)
        k = self._t_leaf
        name = self.program_for(self._tensor(named, self.inputs["tensors"][k], cast=False))
        leaves = [self._tensor(named, spec) for spec in self.inputs["tensors"]]
        batch = self._batch(leaves)
        want = self.manifest["shapes"][str(batch)][k]
        if leaves[k].numel() == 1 and list(leaves[k].shape) != want:
            leaves[k] = leaves[k].reshape(-1).expand(want)  # one timestep for the whole batch
        with torch.no_grad():  # programs are inference graphs
            out, overflow = self._runner((name, batch))(self.weights, self._slices_of(name), leaves)
        self._overflow += overflow.cpu()
        return out

    def _bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        names = self.inputs["arg_names"]
        if len(args) > len(names):
            raise ExportedModelError(f"{len(args)} positional inputs for {len(names)} parameters")
        named = dict(zip(names, args))
        for key, value in kwargs.items():
            if key in named:
                raise ExportedModelError(f"input {key!r} given twice")
            named[key] = value
        named.pop("return_dict", None)  # the output is the prediction tensor either way
        unknown = sorted(set(named) - self._known)
        if unknown:
            raise ExportedModelError(
                f"input(s) {unknown} were not part of the exported call "
                f"({sorted(self._known)}); export again with them in the example inputs"
            )
        for c in self.inputs["constants"]:
            try:
                value = _at(named, c["path"])
            except (KeyError, IndexError, TypeError):
                continue  # not passed: the exported value
            if value != c["value"]:
                raise ExportedModelError(
                    f"input {'.'.join(map(str, c['path']))}={value!r}, but the programs were "
                    f"exported with {c['value']!r}; export again with that input"
                )
        return named

    def _tensor(
        self, named: dict[str, Any], spec: dict[str, Any], cast: bool = True
    ) -> torch.Tensor:
        path = ".".join(str(p) for p in spec["path"])
        try:
            value = _at(named, spec["path"])
        except (KeyError, IndexError, TypeError):
            raise ExportedModelError(f"missing input {path} (a tensor in the export)") from None
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value)
        if not cast:  # the timestep picks its program before a cast could round it
            return value
        dtype = getattr(torch, spec["dtype"])
        return value.to(dtype) if value.dtype != dtype else value

    def _batch(self, leaves: list[torch.Tensor]) -> int:
        for batch, shapes in self.manifest["shapes"].items():
            if all(list(x.shape) == s or (x.numel() == 1 and s == [int(batch)])
                   for x, s in zip(leaves, shapes)):  # fmt: skip
                return int(batch)
        got = [list(x.shape) for x in leaves]
        raise ExportedModelError(
            f"input shapes {got} match none of the exported ones {self.manifest['shapes']} "
            "(by batch); export again with this batch (--batch) and resolution"
        )

    def _slices_of(self, name: str) -> dict[str, torch.Tensor]:
        cached = self._slices.get(name)
        if cached is not None:
            return cached
        out = {}
        for key in self.manifest["programs"][name]["slices"]:
            spec = self.slice_specs[key]
            out[key + ":w"] = self.weights[spec["weight"]].index_select(spec["dim"], spec["index"])
            if spec["bias"] is not None:
                out[key + ":b"] = self.weights[spec["bias"]].index_select(0, spec["index"])
        if self.cache_slices:
            self._slices[name] = out
        return out

    def overflow(self, reset: bool = True) -> tuple[int, int]:
        """(dropped, wanted): tokens over a site's threshold that its fixed capacity dropped,
        and all tokens over the threshold, summed since the last read."""
        dropped, wanted = (int(v) for v in self._overflow.tolist())
        if reset:
            self._overflow.zero_()
        return dropped, wanted


class _Runner:
    """One program file: a torch.export program, an AOTInductor package or an ONNX model."""

    def __init__(self, path: str, kind: str, onnx_inputs: list[str] | None):
        self.kind = kind
        if kind == "pt2":
            self.fn = torch.export.load(path).module()
        elif kind == "aoti":
            self.fn = torch._inductor.aoti_load_package(path)
        elif kind == "onnx":
            import onnxruntime

            self.fn = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
            self.names = onnx_inputs
            self.used = {i.name for i in self.fn.get_inputs()}
        else:
            raise ExportedModelError(f"unknown program format {kind!r}")

    def __call__(self, weights: dict, slices: dict, leaves: list) -> tuple:
        if self.kind != "onnx":
            return self.fn(weights, slices, *leaves)
        tensors = [*weights.values(), *slices.values(), *leaves]
        feed = {n: x.detach().contiguous().numpy() for n, x in zip(self.names, tensors)
                if n in self.used}  # fmt: skip
        out, overflow = self.fn.run(None, feed)
        return torch.from_numpy(out), torch.from_numpy(overflow)


def _at(named: dict[str, Any], path: list[Any]) -> Any:
    value: Any = named
    for key in path:
        value = value[key]
    return value


class DiffusersTransformer(torch.nn.Module):
    """An exported model as the ``transformer`` of a diffusers pipeline.

    Pipelines read ``config`` (the model's diffusers config, saved in the manifest), ``dtype``
    and ``device``, and call it with ``return_dict``; this answers them and forwards the call.

    Example:
        >>> pipe = DiTPipeline(transformer=DiffusersTransformer(load("export/")),
        ...                    vae=vae, scheduler=scheduler)               # doctest: +SKIP
    """

    def __init__(self, exported: ExportedModel):
        super().__init__()
        self.exported = exported
        self.config = _Config(exported.manifest.get("config") or {})

    @property
    def dtype(self) -> torch.dtype:
        """The programs' floating dtype."""
        return getattr(torch, self.exported.manifest["dtype"])

    @property
    def device(self) -> torch.device:
        """Where the programs run."""
        return torch.device(self.exported.manifest["device"])

    def forward(self, *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
        """The exported model's prediction, as a diffusers output (``.sample``) or a tuple."""
        out = self.exported(*args, **kwargs)
        if not return_dict:
            return (out,)
        try:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput
        except ImportError:
            return SimpleNamespace(sample=out)
        return Transformer2DModelOutput(sample=out)


class _Config(dict):
    """A diffusers config: a dict whose keys are also attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


__all__ = ["DiffusersTransformer", "ExportedModel", "ExportedModelError", "load"]
