"""The evaluation width table of a RouterBank: width masks per (budget, t), computed once.

In evaluation a width router's decision is a function of its inputs alone, the timestep and
(for a budget-conditioned model) the call's budget, so every site's masks are computed once
per ``(budget, t)`` pair and looked up by every later call. The table is shared by every
thread calling the model (under the bank's lock), rebuilt when the router parameters change,
and capped (:data:`TABLE_LIMIT` entries): a server turning the budget dial per request must not
grow it without bound.

Example:
    >>> import dynconvert
    >>> from dynconvert.testing import tiny_dit
    >>> bank = dynconvert.get_state(dynconvert.convert(tiny_dit(), (0.3, 1.0)))
    >>> sorted(bank.width_table(torch.tensor([10.0]), budget=0.5)) == sorted(map(int, bank.width))
    True
"""

from __future__ import annotations

import warnings

import torch

from dynconvert.plan import ROUTER_TIMESTEPS
from dynconvert.runtime.timesteps import convention_warning

TABLE_LIMIT = 8192
"""Entries (one per (budget, t) pair) the evaluation table holds before it starts again."""

Masks = dict[int, torch.Tensor]


class EvalTable:
    """The evaluation width table, mixed into RouterBank (which provides the routers, the lock,
    ``always_on``, ``plan`` and :meth:`width_embedding`)."""

    def _params_key(self) -> tuple:
        """Changes whenever anything the width masks depend on changes (training, loading)."""
        params = [*self.t_embed.parameters(), *self.width.parameters()]
        if self.b_embed is not None:
            params += [*self.b_embed.parameters(), self.budget_shift]
        return (
            sum(p._version for p in params),
            tuple(p.data_ptr() for p in params[:2]),
            self.always_on._version,
            self.always_on.device,
        )

    def _lookup(self, t: torch.Tensor, budget: float | None) -> tuple[Masks, Masks, list[float]]:
        """Width masks of every site for the timesteps of this call at its ``budget`` (None:
        a single-budget model), on CPU and on the device, and the timestep values (rounded,
        one per sample or one for all)."""
        values = [round(v, 4) for v in t.tolist()]  # the one host sync of an evaluation call
        self._check_convention(values)
        uniq = list(dict.fromkeys(values))
        with self.lock:  # threads share the table: one resets or fills it at a time
            key = self._params_key()
            if key != self._table_key:
                self._table, self._table_key = {}, key
            missing = [v for v in uniq if (budget, v) not in self._table]
            if missing:
                if len(self._table) + len(missing) > TABLE_LIMIT:  # capped: start again
                    self._table = {}
                    missing = uniq
                self._fill(missing, budget)
            rows = {v: self._table[(budget, v)] for v in uniq}
        if len(uniq) == 1:
            return (*rows[uniq[0]], uniq)
        cpu = {i: torch.stack([rows[v][0][i][0] for v in values]) for i in rows[uniq[0]][0]}
        dev = {i: m.to(self.always_on.device, non_blocking=True) for i, m in cpu.items()}
        return cpu, dev, values

    def _check_convention(self, values: list[float]) -> None:
        """Warn once when the timesteps contradict the assumed convention (timesteps.py)."""
        if getattr(self, "_warned_convention", False):
            return
        message = convention_warning(values, self.plan)
        if message is not None:
            self._warned_convention = True
            warnings.warn(message, stacklevel=5)

    @property
    def table_key(self) -> tuple | None:
        """Identifies the router parameters the evaluation width table was built from."""
        return self._table_key

    def eval_masks_cpu(self, value: float, budget: float | None = None) -> Masks:
        """``{site: (1, units) bool}`` CPU width masks at one timestep value (and budget)
        already looked up in this evaluation call (the planned path's patterns are built from
        them)."""
        return self._table[(budget, value)][0]

    def _fill(self, values: list[float], budget: float | None) -> None:
        """Add the masks of new t values to the table (one router pass for all of them)."""
        ons = self.width_table(torch.tensor(values), budget=budget)
        cpu = {i: on.cpu() for i, on in ons.items()}
        for j, v in enumerate(values):
            self._table[(budget, v)] = (
                {i: m[j : j + 1] for i, m in cpu.items()},
                {i: m[j : j + 1] for i, m in ons.items()},
            )

    def width_table(
        self, timesteps: torch.Tensor | None = None, budget: float | None = None
    ) -> Masks:
        """Evaluation width masks for each site at the given timesteps (default 0..999).

        ``budget``: for a budget-conditioned model, the budget they are computed at (default:
        the model's, ``set_budget``); a single-budget model ignores it.
        Returns ``{site index: (T, units) bool}`` for every site with a width router.
        """
        grid = torch.arange(ROUTER_TIMESTEPS, dtype=torch.float32)
        t = (grid if timesteps is None else timesteps.float()).to(self.always_on.device)
        with torch.no_grad():
            emb = self.width_embedding(t, budget)  # (T, embed)
            full = self.runs_full(budget)  # a range's top at 1.0: every unit (bank.py)
            shift = self.shifts_at(budget)[1]  # the sampler fit's at this budget (ranges)
            out = {}
            for key, router in self.width.items():
                on = router(emb) + shift > 0
                if full:
                    on[:] = True
                on[:, int(self.always_on[int(key)])] = True
                out[int(key)] = on
        return out
