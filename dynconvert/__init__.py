"""dynconvert: make diffusion transformers cheaper to run with learned dynamic width and tokens.

The public API is re-exported here and imported on first use, so that ``import dynconvert`` (and
the command line's ``--help``) does not load torch. Modules that moved in the second layout round
(``dynconvert.bank`` -> ``dynconvert.runtime.bank``, ...) still import under their old names.

Example:
    >>> import dynconvert
    >>> from dynconvert.testing import tiny_dit
    >>> model = dynconvert.convert(tiny_dit(), budget=0.5)
    >>> report = dynconvert.count_flops(model)
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

from dynconvert.version import __version__ as __version__

# public name -> the module that defines it
_EXPORTS = {
    "analyze": "dynconvert.analysis",
    "CalibrationConfig": "dynconvert.calibration",
    "CalibrationResult": "dynconvert.calibration",
    "StepInfo": "dynconvert.calibration",
    "MicroBatchInfo": "dynconvert.calibration",
    "calibrate": "dynconvert.calibration",
    "write_latents": "dynconvert.calibration",
    "ConvertConfig": "dynconvert.config",
    "convert": "dynconvert.convert",
    "get_state": "dynconvert.convert",
    "is_converted": "dynconvert.convert",
    "revert": "dynconvert.convert",
    "FlopsReport": "dynconvert.flops",
    "count_flops": "dynconvert.flops",
    "last_flops_ratio": "dynconvert.flops",
    "measure_macs": "dynconvert.flops",
    "AttentionSite": "dynconvert.plan",
    "MlpSite": "dynconvert.plan",
    "Plan": "dynconvert.plan",
    "SkippedSite": "dynconvert.plan",
    "routing": "dynconvert.runtime.routing",
    "budget": "dynconvert.runtime.routing",
    "budget_grid": "dynconvert.measure.budgets",
    "set_budget": "dynconvert.runtime.routing",
    "set_routing": "dynconvert.runtime.routing",
    "load": "dynconvert.io.save",
    "save": "dynconvert.io.save",
    "export": "dynconvert.deploy",
}
_ERRORS = (
    "AlreadyConvertedError", "BudgetError", "CalibrationError", "CheckpointError", "ConfigError",
    "DataError", "DynconvertError", "ExampleInputsError", "ExportError", "FileError",
    "LoraNotRoutedError",
    "ModelNotFoundError", "NoSitesError", "NotConvertedError", "OutputExistsError", "RecordError",
    "TimestepError",
)  # fmt: skip
_EXPORTS.update(dict.fromkeys(_ERRORS, "dynconvert.errors"))

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dynconvert' has no attribute {name!r}")
    # the demo's preset and the diffusers integration register on the first use of the API
    importlib.import_module("dynconvert.plugins").load_plugins()
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """The package module: a submodule named like a public function never hides the function.

    Importing ``dynconvert.convert`` (the module) sets the package attribute ``convert``; the
    function of that name is what ``dynconvert.convert`` must stay (likewise ``save``).
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


# -- modules that moved: the old dotted names still import ----------------------------------------
MOVED = {
    "dynconvert.attention_runtime": "dynconvert.runtime.attention",
    "dynconvert.bank": "dynconvert.runtime.bank",
    "dynconvert.checkpointing": "dynconvert.runtime.checkpointing",
    "dynconvert.conv_runtime": "dynconvert.runtime.conv",
    "dynconvert.dynamic": "dynconvert.runtime.dynamic",
    "dynconvert.routers": "dynconvert.runtime.routers",
    "dynconvert.routing": "dynconvert.runtime.routing",
    "dynconvert.shared_out": "dynconvert.runtime.shared_out",
    "dynconvert.slices": "dynconvert.runtime.slices",
    "dynconvert.state": "dynconvert.runtime.state",
    "dynconvert.synthetic": "dynconvert.runtime.synthetic",
    "dynconvert.planner": "dynconvert.runtime.planned.planner",
    "dynconvert.planned": "dynconvert.runtime.planned.controls",
    "dynconvert.graphs": "dynconvert.runtime.planned.graphs",
    "dynconvert.save": "dynconvert.io.save",
    "dynconvert.pretrained": "dynconvert.io.pretrained",
    "dynconvert.bench": "dynconvert.measure.bench",
    "dynconvert.support": "dynconvert.measure.support",
    "dynconvert.evaluations": "dynconvert.measure.evaluations",
    "dynconvert.importance": "dynconvert.analysis.importance",
    "dynconvert.models.patterns": "dynconvert.testing.patterns",
    "dynconvert.models.attention_forms": "dynconvert.testing.attention_forms",
    "dynconvert.models.zoo": "dynconvert.testing.zoo",
}
"""Old module name -> where it lives now (imports of the old name get the new module)."""


class _MovedLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return importlib.import_module(self.target)

    def exec_module(self, module: Any) -> None:
        pass  # the target module is already executed


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _MovedLoader(MOVED[fullname]))


if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedFinder())
