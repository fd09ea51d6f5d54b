"""Export a converted model: static programs per width pattern that run with torch alone.

- ``api.py``: :func:`export` (the folder: programs, weights once, manifest, loader).
- ``schedule.py``: the schedule's timesteps, the inputs per batch, timesteps grouped by the
  planner's patterns.
- ``program.py``: one program: the planned forward traced with torch.export, weights as inputs.
- ``signature.py``: the inputs of a program by path (tensors, fixed values, the timestep).
- ``formats.py``: pt2, AOTInductor and ONNX files (and which op stops ONNX).
- ``run_exported.py``: the loader written into every export folder (standard library + torch);
  its :class:`DiffusersTransformer` makes an export the ``transformer`` of a diffusers pipeline.

Example:
    >>> import dynconvert
    >>> from dynconvert.testing import tiny_dit
    >>> model = dynconvert.convert(tiny_dit(), 0.5)
    >>> result = dynconvert.export(model, "/tmp/tiny-export", steps=4)  # doctest: +SKIP
    >>> from dynconvert.deploy import load_exported
    >>> exported = load_exported("/tmp/tiny-export")                   # doctest: +SKIP
"""

from __future__ import annotations

from dynconvert.deploy.api import ExportResult, export
from dynconvert.deploy.run_exported import DiffusersTransformer, ExportedModel
from dynconvert.deploy.run_exported import load as load_exported

__all__ = ["DiffusersTransformer", "ExportResult", "ExportedModel", "export", "load_exported"]
