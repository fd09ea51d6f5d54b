"""The exceptions dynconvert raises. Every message says what to do next."""

from __future__ import annotations


class DynconvertError(Exception):
    """Base class of every error dynconvert raises on bad input or state."""


class BudgetError(DynconvertError, ValueError):
    """The FLOPs budget is outside (0, 1] or below what the model can reach."""


class NoSitesError(DynconvertError):
    """The model has no attention or MLP site dynconvert can convert."""


class ExampleInputsError(DynconvertError):
    """Example inputs are missing or do not run the model."""


class AlreadyConvertedError(DynconvertError):
    """The model was already converted; revert it first."""


class NotConvertedError(DynconvertError):
    """An operation needs a converted model and got a plain one."""


class TimestepError(DynconvertError):
    """The timestep argument could not be found in the model's forward call."""


class ModelNotFoundError(DynconvertError):
    """An unknown model or preset name was given."""


class CheckpointError(DynconvertError):
    """A checkpoint file is missing, corrupt, or does not match the model."""


class RecordError(DynconvertError):
    """A saved dynconvert record is missing, corrupt, from another model or a newer format."""


class ConfigError(DynconvertError, ValueError):
    """A config or recipe has an unknown key or a bad value."""


class CalibrationError(DynconvertError):
    """Calibration cannot start or had to stop (for example repeated non-finite losses)."""


class MemoryPlanError(CalibrationError):
    """The calibration's memory plan exceeds the device's free memory (checked before starting)."""


class DataError(DynconvertError):
    """A data set is missing, empty, or in the wrong format."""


class OutputExistsError(DynconvertError):
    """The output folder already holds another run."""


class FileError(DynconvertError, OSError):
    """A file could not be read or written safely: a link, not a regular file, too large, no
    space left, or a read-only folder (nothing was half written)."""

    def __str__(self) -> str:
        """The message alone (an OSError would put ``[Errno N]`` before it)."""
        return self.strerror if self.strerror is not None else super().__str__()


class ExportError(DynconvertError):
    """A converted model cannot be exported (an op, an input, or the output folder)."""


class LoraNotRoutedError(DynconvertError):
    """An adapter of a kind dynconvert does not route would wrap a routed Linear (named in the
    message with the reason), or a routed adapter was used in a way routing cannot follow."""
