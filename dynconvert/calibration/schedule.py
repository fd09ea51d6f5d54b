"""The FLOPs target schedule (lambda over steps) and the stratified timestep samplers.

docs/method.md, "Schedule": lambda is held at 1.0 for the first 100 steps, then falls
linearly to the final target over a warm-up, then stays. Timesteps are stratified so every batch
spans all quarters of the schedule, because the FLOPs target is a batch mean: a batch of only easy
timesteps would let the routers meet lambda cheaply there and overspend elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dynconvert.errors import ConfigError


def lambda_at(step: int, target: float, hold_steps: int = 100, warmup_steps: int = 1000) -> float:
    """The FLOPs target lambda at a (0-based) optimiser step.

    1.0 for ``step < hold_steps``; then ``1 - (1 - target) * (step - hold_steps) / warmup_steps``
    until it reaches ``target`` at ``step = hold_steps + warmup_steps``; then ``target``.

    Args:
        step: The 0-based step.
        target: The final lambda, in (0, 1].
        hold_steps: Steps held at 1.0.
        warmup_steps: Length of the linear descent (0: jump to the target after the hold).

    Returns:
        lambda for this step.

    Example:
        >>> lambda_at(0, 0.5), lambda_at(600, 0.5), lambda_at(5000, 0.5)
        (1.0, 0.75, 0.5)
    """
    if step < hold_steps:
        return 1.0
    if warmup_steps <= 0:
        return float(target)
    frac = min(1.0, (step - hold_steps) / warmup_steps)
    return 1.0 - (1.0 - float(target)) * frac


@dataclass(frozen=True)
class LambdaSchedule:
    """lambda as a function of the step (see ``lambda_at``).

    Example:
        >>> sched = LambdaSchedule(target=0.5, hold_steps=100, warmup_steps=1000)
        >>> sched(99), sched(1100)
        (1.0, 0.5)
    """

    target: float
    hold_steps: int = 100
    warmup_steps: int = 1000

    def __call__(self, step: int) -> float:
        """lambda at the 0-based ``step`` (:func:`lambda_at` with this schedule's settings)."""
        return lambda_at(step, self.target, self.hold_steps, self.warmup_steps)


def token_bias_step(start: float, warmup_steps: int) -> float:
    """How far one step lowers the token routers' output bias while the batch keeps more tokens
    than its cap: ``start / warmup_steps`` logits, so a bias that starts at ``start`` can reach
    the decision boundary (0) within lambda's warm-up, in step with lambda.

    Example:
        >>> token_bias_step(35.0, 1000), token_bias_step(35.0, 0)
        (0.035, 35.0)
    """
    return max(float(start), 0.0) / max(int(warmup_steps), 1)


def stratified_uniform(
    n: int,
    strata: int = 4,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``n`` numbers in [0, 1), sample ``i`` uniform in stratum ``i * strata // n``.

    With ``n`` a multiple of ``strata`` every stratum gets ``n / strata`` samples; otherwise the
    counts differ by at most one, and with ``n < strata`` some strata are empty.

    Args:
        n: How many numbers.
        strata: Number of equal strata of [0, 1).
        device: Device of the result.
        generator: RNG; None uses the global torch RNG.

    Returns:
        A float tensor of shape (n,).

    Example:
        >>> u = stratified_uniform(8, 4, generator=torch.Generator().manual_seed(0))
        >>> (u * 4).floor().long().tolist()
        [0, 0, 1, 1, 2, 2, 3, 3]
    """
    if n < 1 or strata < 1:
        raise ConfigError(f"stratified_uniform needs n >= 1 and strata >= 1; got {n}, {strata}")
    stratum = torch.div(torch.arange(n) * strata, n, rounding_mode="floor").to(torch.float64)
    jitter = torch.rand(n, generator=generator, dtype=torch.float64)
    u = (stratum + jitter) / strata
    # float64 -> float32 could round 0.99999999 up to 1.0; keep the interval half-open.
    u = u.clamp(max=1.0 - 1e-7).to(torch.float32)
    return u if device is None else u.to(device)


def sample_ddpm_timesteps(
    n: int,
    num_timesteps: int = 1000,
    strata: int = 4,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Integer DDPM timesteps in [0, num_timesteps), stratified into equal ranges.

    With 1000 steps and 4 strata, sample ``i`` of a batch of ``n`` lies in quarter
    ``[250 q, 250 (q + 1))`` with ``q = 4 i // n``, uniform there.

    Args:
        n: Batch size.
        num_timesteps: Steps of the schedule.
        strata: Number of strata.
        device: Device of the result.
        generator: RNG; None uses the global torch RNG.

    Returns:
        A long tensor (n,).

    Example:
        >>> t = sample_ddpm_timesteps(4, generator=torch.Generator().manual_seed(0))
        >>> [int(x) // 250 for x in t]
        [0, 1, 2, 3]
    """
    u = stratified_uniform(n, strata, generator=generator).to(torch.float64)
    t = (u * num_timesteps).floor().long().clamp(0, num_timesteps - 1)
    return t if device is None else t.to(device)


def logit_normal_quantile(u: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Inverse CDF of the logit-normal: ``sigmoid(mean + std * Phi^-1(u))``.

    Args:
        u: Probabilities in (0, 1).
        mean: Mean of the underlying normal.
        std: Standard deviation of the underlying normal.

    Returns:
        Values in (0, 1), same shape as ``u``.

    Example:
        >>> float(logit_normal_quantile(torch.tensor([0.5])))
        0.5
    """
    u = u.to(torch.float64).clamp(1e-7, 1.0 - 1e-7)
    z = math.sqrt(2.0) * torch.special.erfinv(2.0 * u - 1.0)
    return torch.sigmoid(mean + std * z).to(torch.float32)


def sample_flow_times(
    n: int,
    dist: str = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    strata: int = 4,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Flow-matching times s in (0, 1), stratified by the quantiles of their distribution.

    Stratum ``k`` of ``strata`` covers the probability mass between quantiles ``k / strata`` and
    ``(k + 1) / strata``: each quarter of a batch gets a quarter of the distribution's mass, the
    analogue for flow models of the DDPM quarters.

    Args:
        n: Batch size.
        dist: "logit_normal" (SD3 / rectified flow default) or "uniform".
        mean: Logit-normal mean.
        std: Logit-normal standard deviation.
        strata: Number of strata.
        device: Device of the result.
        generator: RNG; None uses the global torch RNG.

    Returns:
        A float tensor (n,) in (0, 1).

    Example:
        >>> s = sample_flow_times(4, generator=torch.Generator().manual_seed(0))
        >>> bool(((s > 0) & (s < 1)).all()), bool((s[:-1] <= s[1:]).all())
        (True, True)
    """
    u = stratified_uniform(n, strata, generator=generator)
    if dist == "logit_normal":
        s = logit_normal_quantile(u, mean, std)
    elif dist == "uniform":
        s = u.clamp(1e-7, 1.0 - 1e-7)
    else:
        raise ConfigError(f"flow_t_dist must be one of logit_normal, uniform; got {dist!r}")
    return s if device is None else s.to(device)


def range_lambda(
    step: int, seed: int, budget_range: tuple[float, float], hold_steps: int, warmup_steps: int
) -> tuple[float, float]:
    """A budget-conditioned model's step: its budget drawn uniformly from the range, then lambda.

    Each step draws one budget b in ``budget_range`` (from its own generator seeded by the run's
    seed and the step: every process draws the same, and a resumed run draws what the straight
    run drew) and follows :func:`lambda_at` toward it; the routers read lambda (within the
    range), so what they read is always the cost the FLOPs term pulls toward. Returns
    (lambda, the budget the routers read).

    Example:
        >>> lam, b = range_lambda(10_000, 0, (0.3, 1.0), 100, 1000)
        >>> 0.3 <= lam <= 1.0 and lam == b
        True
    """
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
    lo, hi = budget_range
    target = lo + (hi - lo) * float(torch.rand((), generator=gen))
    lam = lambda_at(step, target, hold_steps, warmup_steps)
    return lam, min(lam, hi)
