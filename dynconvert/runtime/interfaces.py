"""What the parts of the runtime hand each other: the per-call objects and the Protocols.

The RouterBank (bank.py) imports the site runtimes' modules through the planner, so those
modules cannot import the bank back: the Protocols here name what they use of it instead.

- :class:`Decision`: the units a sliced site computes for one mask pattern (built by
  ``SiteRuntime.decide``, or per pattern by the planned path).
- :class:`MlpCall`: one MLP call in progress, handed from fc1 to fc2.
- :class:`RoutedSite`: a site runtime as the bank and the execution modes see it.
- :class:`CallRouting`: what a site runtime asks of its bank during a call (masks, records, the
  execution mode's decisions and weights); :class:`ModeBank`: what an execution mode
  (modes.py) asks of it, and :class:`PatternPlanner` of the planned path's planner.
- :class:`LinearRoute`, :class:`ConvRoute`: the runtime a routed Linear / convolution calls.
- :class:`OutColumnsOwner`: a site that owns columns of a shared out-projection, and
  :class:`InRowsOwner` one that owns rows of a shared input projection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

from dynconvert.plan import Site
from dynconvert.runtime.slices import SliceCache

PATTERN_CACHE_LIMIT = 4096
"""Entries a per-pattern cache holds before it is emptied (decisions, planned patterns, shared
out-projection indices): a sampling run repeats a few patterns, a run with many mixed-t batches
must not grow without bound."""


def cached(cache: dict, key: Any, build: Callable[[], Any]) -> Any:
    """``cache[key]``, built by ``build()`` on a miss; a cache holding more than
    :data:`PATTERN_CACHE_LIMIT` entries is emptied first (many unit sets: bound the memory).

    Example:
        >>> cache = {}
        >>> cached(cache, ("a",), lambda: 3), cached(cache, ("a",), lambda: 4)
        (3, 3)
    """
    hit = cache.get(key)
    if hit is None:
        if len(cache) > PATTERN_CACHE_LIMIT:
            cache.clear()
        hit = cache[key] = build()
    return hit


class Decision:
    """What the fast path computes for one mask pattern on one device (computed once, reused)."""

    __slots__ = ("units", "key", "rows", "cols", "sub")

    def __init__(
        self,
        units: torch.Tensor,
        rows: dict[str, torch.Tensor],
        cols: dict[str, torch.Tensor],
        sub: dict[str, torch.Tensor] | None,
    ):
        self.units = units  # (U',) the units computed, ascending
        self.key = tuple(units.tolist())  # names the unit set in the weight-slice cache
        self.rows = rows  # input Linear fqn -> its rows of these units, on the device
        self.cols = cols  # per out-projection (or fc2): its columns of these units, kept ones too
        # Per out-projection: (Bt, C') column mask inside the computed units, or None.
        self.sub = sub


@dataclass
class MlpCall:
    """One MLP call in progress: begun at fc1 (or the value / gate Linear), ended by fc2.

    Example:
        >>> call = MlpCall(x=torch.zeros(2, 4, 8), sliced=False)
        >>> call.decision is None and call.idx is None
        True
    """

    x: torch.Tensor  # the MLP input (B, N, D); a gated MLP's second input Linear reads it too
    sliced: bool  # the call runs sliced (fast or planned), else masked at full width
    lead: torch.Size | None = None  # the input's leading dims (B, N) or (B, H, W)
    width: torch.Tensor | None = None  # (Bt, G) group mask (None: every group on)
    tokens: torch.Tensor | None = None  # (B, N) token mask (None: tokens not routed)
    decision: Decision | None = None  # sliced: the groups computed (None: every group)
    idx: torch.Tensor | None = None  # sliced: rows of the flattened B * N computed (None: all)
    x_sel: torch.Tensor | None = None  # sliced: the input rows fc1 computes, (K, D) or (B, N, D)
    # Planned path: (K, 1) or (B, N, 1) bool that zeroes the computed rows whose token is under
    # the threshold (None: tokens not routed here, or the fast path's exact gather).
    keep: torch.Tensor | None = None

    def gathered(self) -> tuple[torch.Tensor, torch.Size] | None:
        """(rows of the flattened B * N computed, (B, N)) when tokens were gathered, else None
        (what maps a computed row to its sample, e.g. for per-sample TD-LoRA gates)."""
        return None if self.idx is None else (self.idx, self.lead)


class RoutedSite(Protocol):
    """A site runtime as the bank, the execution modes and the planner see it (SiteRuntime)."""

    site: Site

    def decide(self, mask_cpu: torch.Tensor | None, device: torch.device) -> Decision | None:
        """The sliced-path decision for a (Bt, units) CPU mask (None: every unit)."""
        ...


class CallRouting(Protocol):
    """What a site runtime asks of its RouterBank during one forward call (bank.py): every
    method answers for the calling thread's current call."""

    always_on: torch.Tensor  # (sites,): its device is the routers' device

    def current_call(self) -> Any:
        """The calling thread's current RoutingCall (call.py)."""
        ...

    def record(self, index: int) -> dict[str, Any]:
        """What site ``index`` used in this call, for the FLOPs accountant."""
        ...

    def width_mask(self, index: int) -> torch.Tensor | None:
        """(Bt, units) mask of one site for this call; None when every unit is on."""
        ...

    def width_mask_cpu(self, index: int) -> torch.Tensor | None:
        """The evaluation width mask of a site on the CPU."""
        ...

    def token_mask(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """Mask over the leading dims of ``x`` (batch, tokens); None when tokens are not routed."""
        ...

    def fast_for(self, site: Site) -> bool:
        """Whether this site runs sliced in the current call."""
        ...

    def decision(self, runtime: RoutedSite, device: torch.device) -> Decision | None:
        """The units a sliced site computes in this call, from the call's execution mode."""
        ...

    def begin_mlp(self, runtime: RoutedSite, x: torch.Tensor) -> MlpCall | None:
        """A sliced MLP call begun by the execution mode, or None: the runtime begins it."""
        ...

    def sliced(
        self, lin: nn.Module, axis: str, units: tuple[int, ...], index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight (and bias) of ``lin`` restricted to ``index`` rows or columns."""
        ...

    def clear_cache(self) -> None:
        """Drop cached weight slices, timestep tables and planned patterns."""
        ...


class PatternPlanner(Protocol):
    """The planned path's planner (planned/planner.py), as the planned execution mode uses it."""

    def begin(self, values: list[float], table_key: tuple | None, model: nn.Module | None) -> None:
        """Pick the pattern of a call whose samples have timesteps ``values``."""
        ...

    def decision(self, index: int) -> Decision | None:
        """The current pattern's decision for site ``index``."""
        ...

    def sliced(
        self, lin: nn.Module, axis: str, units: tuple[int, ...], index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pre-sliced rows or columns of ``lin`` for a unit set."""
        ...

    def begin_mlp(self, rt: RoutedSite, x: torch.Tensor) -> MlpCall:
        """Start a planned MLP call at its input x (fixed token capacity)."""
        ...


class ModeBank(CallRouting, Protocol):
    """What an execution mode (modes.py) asks of the RouterBank it runs a call for."""

    slices: SliceCache  # the fast path's weight-slice cache
    planner: PatternPlanner  # the planned path's patterns and pre-sliced weights

    @property
    def table_key(self) -> tuple | None:
        """Identifies the router parameters the call's width masks come from."""
        ...


class LinearRoute(Protocol):
    """The runtime a routed Linear (``DynamicLinear``) hands its forward to."""

    def linear_forward(self, lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> the Linear's output as the site routes this call."""
        ...


class ConvRoute(Protocol):
    """The runtime a routed convolution (``DynamicConv``) hands its forward to."""

    def conv_forward(self, conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, *spatial) -> the convolution's output as the site routes this call."""
        ...


class OutState(NamedTuple):
    """What one owner of a shared out-projection computes in the current call."""

    decision: Decision | None  # the units computed on a sliced path (None: every unit)
    sliced: bool  # the owner runs sliced (fast or planned)
    mask: torch.Tensor | None  # masked path: (Bt, units) unit mask (None: every unit on)
    call: MlpCall | None = None  # an MLP owner's call: its token mask, or its gathered rows


class OutColumnsOwner(Protocol):
    """A site owning columns of an out-projection shared with another site (shared_out.py)."""

    bank: CallRouting
    out_tables: dict[str, torch.Tensor]  # out-projection fqn -> (1, units, size) column table

    def out_state(self) -> OutState:
        """What the owner computes in this call (an MLP's call ends here)."""
        ...


class InRowsOwner(Protocol):
    """A site owning rows of an input projection shared with another site (shared_in.py)."""

    bank: CallRouting
    tables: dict[str, torch.Tensor]  # input Linear fqn -> (parts, units, size) row table

    def in_call(self, name: str, x: torch.Tensor) -> tuple[Decision | None, MlpCall | None]:
        """This call's decision (None: every unit's rows) and, for an MLP, its call."""
        ...
