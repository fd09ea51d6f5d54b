"""dynconvert: make diffusion transformers cheaper to run with learned dynamic width and tokens.

Example:
    >>> import dynconvert
    >>> from dynconvert.testing import tiny_dit
    >>> model = dynconvert.convert(tiny_dit(), budget=0.5)
    >>> report = dynconvert.count_flops(model)
"""

from dynconvert.analysis import analyze
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
from dynconvert.plan import AttentionSite, MlpSite, Plan, SkippedSite
from dynconvert.routing import routing, set_routing

__version__ = "0.1.0"

__all__ = [
    "AlreadyConvertedError",
    "AttentionSite",
    "BudgetError",
    "CalibrationError",
    "CheckpointError",
    "ConfigError",
    "ConvertConfig",
    "DataError",
    "DynconvertError",
    "ExampleInputsError",
    "MlpSite",
    "ModelNotFoundError",
    "NoSitesError",
    "NotConvertedError",
    "OutputExistsError",
    "Plan",
    "RecordError",
    "SkippedSite",
    "TimestepError",
    "__version__",
    "analyze",
    "convert",
    "get_state",
    "is_converted",
    "revert",
    "routing",
    "set_routing",
]
