"""Execution modes: how a converted model computes in evaluation, one registered object each.

Routing decides *which* heads, channel groups and tokens a call uses; the execution mode decides
*how* the call computes with them. A mode is an :class:`ExecutionMode` registered once under its
name (:func:`register_execution_mode`); the user names it (``set_routing(model, "eval",
execution="planned")``, ``benchmark(execution=...)``, the CLI's ``--execution``), the RouterBank
resolves it once per evaluation call for the call's device, and the site runtimes ask the
resolved mode what it means instead of comparing names:

- ``sliced``: sites compute only the active units' rows and columns (sliced weights);
- ``gathers_tokens``: token-routed MLPs compute only the selected tokens;
- ``static_shapes``: every shape is fixed on the host before the call (CUDA graphs, compile);

and, for a sliced site, where its decision and its weights come from
(:meth:`ExecutionMode.decision`,
:meth:`ExecutionMode.weights`, :meth:`ExecutionMode.begin_mlp`). Training and routing "full"
always compute at full width (masked); so does every mode when ``ConvertConfig.fast_path`` is
off. ``docs/execution-modes.md`` describes each mode and how to add one.

Example:
    >>> execution_mode("auto").resolve("cuda").name, execution_mode("auto").resolve("cpu").name
    ('planned', 'fast')
    >>> execution_mode("masked").sliced, execution_mode("planned").static_shapes
    (False, True)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from dynconvert.errors import ConfigError

if TYPE_CHECKING:  # annotations only: importing this module stays free of torch (the CLI's help)
    import torch
    from torch import nn

    from dynconvert.runtime.interfaces import Decision, MlpCall, ModeBank, RoutedSite

M = TypeVar("M", bound="type[ExecutionMode]")

EXECUTION_MODES: dict[str, ExecutionMode] = {}
"""Name -> the registered mode, in registration order (the order error messages list them)."""


class ExecutionMode:
    """How an evaluation call computes with its routing decisions (subclass and register).

    The flags say what the mode means; the methods say where a sliced site's decision, weights
    and MLP call come from. The defaults are the fast path's: decided per call from the CPU
    masks, weights from the slice cache, tokens gathered by the MLP runtime itself.
    """

    name: str = ""  # what users pass (set_routing, benchmark, --execution)
    summary: str = ""  # one line for docs and error messages
    sliced: bool = False  # sites compute only the active units (sliced weights)
    gathers_tokens: bool = False  # token-routed MLPs compute only the selected tokens
    static_shapes: bool = False  # shapes fixed on the host before the call (graphs, compile)
    # Under torch.compile the sites' routing runs eagerly, not traced (compiled.py): per-site
    # host decisions would otherwise be guards that recompile shared frames once per site.
    compiled_eagerly: bool = False

    def resolve(self, device_type: str) -> ExecutionMode:
        """The mode a call on a device of this type ("cuda", "cpu", ...) runs: itself
        (``auto`` picks one per device)."""
        return self

    def begin(self, bank: ModeBank, values: list[float], model: nn.Module | None) -> None:
        """Start an evaluation call of ``model`` at timesteps ``values`` (host floats)."""

    def decision(
        self, bank: ModeBank, runtime: RoutedSite, device: torch.device
    ) -> Decision | None:
        """The units a sliced site computes in this call (None: every unit)."""
        return runtime.decide(bank.width_mask_cpu(runtime.site.index), device)

    def weights(
        self, bank: ModeBank, lin: nn.Module, axis: str, units: tuple[int, ...], index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight (and bias) of ``lin`` cut to ``index`` rows or columns (``units`` names them)."""
        return bank.slices.get(lin, axis, units, index)

    def begin_mlp(self, bank: ModeBank, runtime: RoutedSite, x: torch.Tensor) -> MlpCall | None:
        """A sliced MLP call begun by the mode, or None: the runtime begins it (its token
        routers' selection gathered with ``nonzero``)."""
        return None

    def __repr__(self) -> str:
        return f"<execution mode {self.name!r}>"


def register_execution_mode(cls: M) -> M:
    """Class decorator: register one instance of an :class:`ExecutionMode` under its ``name``.

    Example:
        >>> @register_execution_mode
        ... class Reference(ExecutionMode):
        ...     name, summary = "reference-doc", "full width, as masked"
        >>> execution_mode("reference-doc").sliced
        False
        >>> del EXECUTION_MODES["reference-doc"]
    """
    name = cls.name
    if not name or name in EXECUTION_MODES:
        raise ConfigError(
            f"an execution mode needs a name of its own; {cls.__name__} has {name!r}"
            + (" (already registered)" if name else "")
        )
    EXECUTION_MODES[name] = cls()
    return cls


def execution_mode(mode: str | ExecutionMode) -> ExecutionMode:
    """The registered mode named ``mode`` (a mode passes through).

    Example:
        >>> execution_mode("fast").gathers_tokens
        True
        >>> execution_mode("quick")
        Traceback (most recent call last):
        ...
        dynconvert.errors.ConfigError: execution must be one of fast, masked, planned, auto; ...
    """
    if isinstance(mode, ExecutionMode):
        return mode
    found = EXECUTION_MODES.get(mode) if isinstance(mode, str) else None
    if found is None:
        raise ConfigError(f"execution must be one of {', '.join(EXECUTION_MODES)}; got {mode!r}")
    return found


def execution_names() -> tuple[str, ...]:
    """The names of the registered execution modes.

    Example:
        >>> execution_names()
        ('fast', 'masked', 'planned', 'auto')
    """
    return tuple(EXECUTION_MODES)


@register_execution_mode
class FastExecution(ExecutionMode):
    """Sliced weights, decided per call on the host; tokens gathered with ``nonzero``."""

    name = "fast"
    summary = "sliced weights and gathered tokens, decided per call (a host sync per site)"
    sliced = gathers_tokens = compiled_eagerly = True


@register_execution_mode
class MaskedExecution(ExecutionMode):
    """Full width: switched-off units and skipped tokens multiplied by zero (the reference)."""

    name = "masked"
    summary = "full-width compute with switched-off units and tokens zeroed (the reference)"


@register_execution_mode
class PlannedExecution(ExecutionMode):
    """Static shapes: per-timestep patterns, pre-sliced weights, fixed token capacities."""

    name = "planned"
    summary = "static shapes per timestep pattern: one host read per call (CUDA graphs, compile)"
    sliced = gathers_tokens = static_shapes = True

    def begin(self, bank: ModeBank, values: list[float], model: nn.Module | None) -> None:
        """Pick the call's pattern (built, and its weights pre-sliced, on first use)."""
        bank.planner.begin(values, bank.table_key, model)

    def decision(
        self, bank: ModeBank, runtime: RoutedSite, device: torch.device
    ) -> Decision | None:
        """Decided once per pattern, before the call (planner.py)."""
        return bank.planner.decision(runtime.site.index)

    def weights(
        self, bank: ModeBank, lin: nn.Module, axis: str, units: tuple[int, ...], index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The planner's pre-sliced copy (or a gather in the forward beyond its byte cap)."""
        return bank.planner.sliced(lin, axis, units, index)

    def begin_mlp(self, bank: ModeBank, runtime: RoutedSite, x: torch.Tensor) -> MlpCall | None:
        """Fixed-capacity token routing: top-k logits instead of ``nonzero``."""
        return bank.planner.begin_mlp(runtime, x)


@register_execution_mode
class AutoExecution(ExecutionMode):
    """Planned on CUDA, fast elsewhere: what ``dynconvert.load`` selects."""

    name = "auto"
    summary = "planned on CUDA, fast elsewhere (what a loaded model runs)"
    by_device = {"cuda": "planned"}  # device type -> mode; any other device: ``otherwise``
    otherwise = "fast"

    def resolve(self, device_type: str) -> ExecutionMode:
        """The mode for this device type."""
        return EXECUTION_MODES[self.by_device.get(device_type, self.otherwise)]
