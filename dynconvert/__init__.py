"""dynconvert: make diffusion transformers cheaper to run with learned dynamic width and tokens.

Example:
    >>> import dynconvert
    >>> from dynconvert.testing import tiny_dit
    >>> model = dynconvert.convert(tiny_dit(), budget=0.5)
    >>> report = dynconvert.count_flops(model)
"""

from dynconvert.analysis import analyze
from dynconvert.calibration import (
    CalibrationConfig,
    CalibrationResult,
    StepInfo,
    calibrate,
    write_latents,
)
from dynconvert.config import ConvertConfig
from dynconvert.convert import convert, get_state, is_converted, revert
from dynconvert.errors import (
    AlreadyConvertedError,
    BudgetError,
    CalibrationError,
    CheckpointError,
    ConfigError,
    DataError,
    DynconvertError,
    ExampleInputsError,
    ModelNotFoundError,
    NoSitesError,
    NotConvertedError,
    OutputExistsError,
    RecordError,
    TimestepError,
)
from dynconvert.flops import FlopsReport, count_flops, last_flops_ratio, measure_macs
from dynconvert.plan import AttentionSite, MlpSite, Plan, SkippedSite
from dynconvert.pretrained import LoraNotRoutedError  # registers the diffusers integration
from dynconvert.routing import routing, set_routing
from dynconvert.save import load, save
from dynconvert.version import __version__

__all__ = [
    "AlreadyConvertedError",
    "AttentionSite",
    "BudgetError",
    "CalibrationConfig",
    "CalibrationResult",
    "CalibrationError",
    "CheckpointError",
    "ConfigError",
    "ConvertConfig",
    "DataError",
    "DynconvertError",
    "ExampleInputsError",
    "FlopsReport",
    "LoraNotRoutedError",
    "MlpSite",
    "ModelNotFoundError",
    "NoSitesError",
    "NotConvertedError",
    "OutputExistsError",
    "Plan",
    "RecordError",
    "SkippedSite",
    "StepInfo",
    "TimestepError",
    "__version__",
    "analyze",
    "calibrate",
    "convert",
    "count_flops",
    "last_flops_ratio",
    "get_state",
    "is_converted",
    "load",
    "measure_macs",
    "revert",
    "routing",
    "save",
    "set_routing",
    "write_latents",
]

# The digits demo plugs into the registries (model preset ``digits``, calibration data
# ``"digits"``, the ``digits`` evaluation): importing the package makes it available everywhere.
import dynconvert.demo  # noqa: E402,F401
