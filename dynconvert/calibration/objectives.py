"""The training objectives: noising a batch, the diffusion loss, the FLOPs term, distillation.

docs/method.md ("Training objective"):
total = diffusion loss of the dynamic model + w * (mean_b F_dyn/F_static - lambda)^2.
The diffusion loss follows the model's own objective: eps MSE (plus the VB term with learned
sigma), v MSE, or flow-matching velocity MSE. Every loss here is per sample (B,) unless it is a
batch-level term (the FLOPs term); the loop takes the means.

Example:
    >>> import torch
    >>> from dynconvert.calibration.config import CalibrationConfig
    >>> from dynconvert.calibration.objectives import build_objective
    >>> obj = build_objective(CalibrationConfig(target=0.5, objective="eps"))
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> noisy = obj.noise(torch.zeros(4, 1, 2, 2))
    >>> [int(t) // 250 for t in noisy.t]
    [0, 1, 2, 3]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynconvert.calibration.diffusion import FlowMatching, GaussianDiffusion, mean_flat
from dynconvert.calibration.schedule import sample_ddpm_timesteps, sample_flow_times
from dynconvert.errors import ConfigError


@dataclass
class NoisyBatch:
    """A noised batch: what the model sees and what its loss needs.

    Attributes:
        x_t: The noisy input (B, C, H, W).
        t: The timestep as the model takes it (B,).
        noise: The Gaussian noise used.
        index: DDPM 0-based timestep indices (B,) (None for flow).
        s: Flow times in (0, 1) (B,) (None for DDPM).
    """

    x_t: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    index: torch.Tensor | None = None
    s: torch.Tensor | None = None


def _prediction(output: torch.Tensor, channels: int, what: str) -> torch.Tensor:
    """The first ``channels`` channels of the output (dropping learned-sigma channels)."""
    if output.shape[1] == channels:
        return output
    if output.shape[1] == 2 * channels:
        return output[:, :channels]
    raise ConfigError(
        f"model output has {output.shape[1]} channels; a {what} model of {channels}-channel "
        f"latents should give {channels} (or {2 * channels} with learned sigma)"
    )


def _ddpm_noise(
    diffusion: GaussianDiffusion, strata: int, offset: int, x0: torch.Tensor
) -> NoisyBatch:
    """Stratified timesteps, Gaussian noise, and x_t from q(x_t | x_0)."""
    index = sample_ddpm_timesteps(x0.shape[0], diffusion.num_timesteps, strata, device=x0.device)
    noise = torch.randn_like(x0)
    x_t = diffusion.q_sample(x0, index, noise)
    return NoisyBatch(x_t=x_t, t=index + offset, noise=noise, index=index)


class Objective:
    """Base: ``noise`` draws t and noise (global torch RNG), ``loss`` returns per-sample terms."""

    kind = "base"

    def noise(self, x0: torch.Tensor) -> NoisyBatch:  # pragma: no cover - interface
        """Draw timesteps and noise for clean latents ``x0`` (B, C, H, W); the noised batch."""
        raise NotImplementedError

    def loss(
        self, output: torch.Tensor, x0: torch.Tensor, noisy: NoisyBatch
    ) -> dict[str, torch.Tensor]:  # pragma: no cover - interface
        """The per-sample diffusion loss of the model's ``output`` on ``noisy`` (made from ``x0``).

        Args:
            output: The model's prediction (B, C, H, W), or (B, 2C, H, W) with learned sigma.
            x0: The clean latents.
            noisy: What ``noise(x0)`` returned.

        Returns:
            Per-sample (B,) terms: "loss" (what is trained), "mse", and "vb" where there is one.
        """
        raise NotImplementedError


class EpsObjective(Objective):
    """DDPM eps prediction; DiT's hybrid loss (eps MSE + VB) for learned-sigma outputs.

    Args:
        diffusion: The forward process.
        strata: Timestep strata per batch.
        timestep_offset: Added to the 0-based index for the model's input.
        learn_sigma: True: require 2C outputs; False: ignore variance channels; None: by shape.
    """

    kind = "eps"

    def __init__(
        self,
        diffusion: GaussianDiffusion,
        strata: int = 4,
        timestep_offset: int = 0,
        learn_sigma: bool | None = None,
    ):
        self.diffusion = diffusion
        self.strata = strata
        self.timestep_offset = timestep_offset
        self.learn_sigma = learn_sigma

    def noise(self, x0: torch.Tensor) -> NoisyBatch:
        """Stratified DDPM indices (the model gets index + offset), noise, x_t from q(x_t | x0)."""
        return _ddpm_noise(self.diffusion, self.strata, self.timestep_offset, x0)

    def loss(
        self, output: torch.Tensor, x0: torch.Tensor, noisy: NoisyBatch
    ) -> dict[str, torch.Tensor]:
        """DiT's hybrid loss: eps MSE, plus the VB term when the output carries learned sigma.

        With ``learn_sigma=True`` the output must have 2C channels; with False, variance channels
        are dropped (MSE only); with None the channel count decides.
        """
        c = x0.shape[1]
        if self.learn_sigma is True and output.shape[1] != 2 * c:
            raise ConfigError(
                f"learn_sigma=True but the model gives {output.shape[1]} channels for {c}-channel "
                f"latents (expected {2 * c}); set learn_sigma=None to detect it"
            )
        if self.learn_sigma is False:
            output = _prediction(output, c, "eps")
        return self.diffusion.hybrid_loss(output, x0, noisy.x_t, noisy.index, noisy.noise)


class VObjective(Objective):
    """DDPM v prediction: target ``sqrt(abar) noise - sqrt(1 - abar) x0``."""

    kind = "v"

    def __init__(self, diffusion: GaussianDiffusion, strata: int = 4, timestep_offset: int = 0):
        self.diffusion = diffusion
        self.strata = strata
        self.timestep_offset = timestep_offset

    def noise(self, x0: torch.Tensor) -> NoisyBatch:
        """Stratified DDPM indices (the model gets index + offset), noise, x_t from q(x_t | x0)."""
        return _ddpm_noise(self.diffusion, self.strata, self.timestep_offset, x0)

    def loss(
        self, output: torch.Tensor, x0: torch.Tensor, noisy: NoisyBatch
    ) -> dict[str, torch.Tensor]:
        """Per-sample MSE to the v target (learned-sigma channels ignored); "loss" is "mse"."""
        pred = _prediction(output, x0.shape[1], "v-prediction")
        target = self.diffusion.v_target(x0, noisy.index, noisy.noise)
        mse = mean_flat((target - pred) ** 2)
        return {"mse": mse, "loss": mse}


class FlowObjective(Objective):
    """Rectified flow: ``x_s = (1 - s) x0 + s noise``, velocity target ``noise - x0``.

    Args:
        dist: Distribution of s ("logit_normal" or "uniform"), stratified by quantiles.
        mean: Logit-normal mean.
        std: Logit-normal standard deviation.
        strata: Strata per batch.
        timestep_scale: The model receives ``s * timestep_scale`` (1000 by default).
    """

    kind = "flow"

    def __init__(
        self,
        dist: str = "logit_normal",
        mean: float = 0.0,
        std: float = 1.0,
        strata: int = 4,
        timestep_scale: float = 1000.0,
    ):
        self.flow = FlowMatching()
        self.dist, self.mean, self.std = dist, mean, std
        self.strata = strata
        self.timestep_scale = timestep_scale

    def noise(self, x0: torch.Tensor) -> NoisyBatch:
        """Stratified times s, noise, ``x_t = (1 - s) x0 + s noise``, ``t = s * timestep_scale``."""
        s = sample_flow_times(
            x0.shape[0], self.dist, self.mean, self.std, self.strata, device=x0.device
        )
        noise = torch.randn_like(x0)
        x_t = self.flow.interpolate(x0, noise, s)
        return NoisyBatch(x_t=x_t, t=s * self.timestep_scale, noise=noise, s=s)

    def loss(
        self, output: torch.Tensor, x0: torch.Tensor, noisy: NoisyBatch
    ) -> dict[str, torch.Tensor]:
        """Per-sample MSE to the velocity ``noise - x0`` (sigma channels dropped); loss = mse."""
        pred = _prediction(output, x0.shape[1], "flow-matching")
        mse = mean_flat((self.flow.velocity(x0, noisy.noise) - pred) ** 2)
        return {"mse": mse, "loss": mse}


def build_objective(config, adapter=None) -> Objective:
    """The objective named by the config, with "auto" values taken from the model adapter.

    Args:
        config: A ``CalibrationConfig``.
        adapter: The ``ModelAdapter`` whose family defaults fill "auto" fields (None: eps, linear).

    Returns:
        The objective.

    Example:
        >>> from dynconvert.calibration.config import CalibrationConfig
        >>> build_objective(CalibrationConfig(target=0.5, objective="flow")).kind
        'flow'
    """
    kind = config.objective
    if kind == "auto":
        kind = adapter.objective if adapter is not None else "eps"
    schedule = config.beta_schedule
    if schedule == "auto":
        schedule = adapter.beta_schedule if adapter is not None else "linear"
    offset = adapter.timestep_offset if adapter is not None else 0
    if kind == "flow":
        return FlowObjective(
            config.flow_t_dist,
            config.flow_logit_mean,
            config.flow_logit_std,
            config.timestep_strata,
            config.flow_timestep_scale,
        )
    diffusion = GaussianDiffusion(schedule, config.num_train_timesteps)
    if kind == "eps":
        return EpsObjective(diffusion, config.timestep_strata, offset, config.learn_sigma)
    if kind == "v":
        return VObjective(diffusion, config.timestep_strata, offset)
    raise ConfigError(f"objective must be one of auto, eps, v, flow; got {kind!r}")


def flops_loss(ratios: torch.Tensor, lam: float, weight: float = 2.0) -> torch.Tensor:
    """The FLOPs term ``weight * (mean(ratios) - lam)^2``.

    Args:
        ratios: F_dyn / F_static of each sample of the batch (B,), differentiable.
        lam: The current target lambda.
        weight: w (2.0 in the paper).

    Returns:
        A scalar tensor.

    Example:
        >>> float(flops_loss(torch.tensor([0.5, 1.0]), 0.5))  # 2 * (0.75 - 0.5)^2
        0.125
    """
    return weight * (ratios.float().mean() - lam) ** 2


def token_keep_target(lam: float) -> float:
    """The most of its tokens the token routers may keep, on the batch mean, at target ``lam``.

    ``sqrt(lam)``: the keep rate at which tokens and MLP width would share an MLP's saving
    equally (width fraction times token fraction = lam). It follows lambda's schedule (1.0 while
    lambda is held at 1.0), so calibration still starts from the full model.

    Why a second target: the FLOPs term alone asks only that the *total* meets lambda, and the
    width routers (one logit per unit fed by a shared, wide timestep embedding) reach it long
    before a token router's logit moves; once the total is met the FLOPs gradient is zero and
    the diffusion loss keeps every token on, so token routing stays inert (issue 11).

    Example:
        >>> token_keep_target(1.0), round(token_keep_target(0.5), 4)
        (1.0, 0.7071)
    """
    return float(lam) ** 0.5


def token_keep(state) -> torch.Tensor | None:
    """The fraction of tokens each sample kept in the last forward call, averaged over the
    token-routed sites, (B,) and differentiable in training mode; None without token routers.

    Args:
        state: The converted model's ``RouterBank`` (``dynconvert.get_state(model)``).
    """
    kept = [
        rec["tokens"].float().flatten(1).mean(1)
        for rec in state.records.values()
        if rec.get("tokens") is not None
    ]
    if not kept:
        return None
    return torch.stack(kept).mean(0)


def token_keep_loss(keep: torch.Tensor | None, lam: float, weight: float = 2.0) -> torch.Tensor:
    """One-sided term ``weight * max(0, mean(keep) - token_keep_target(lam))^2``.

    Zero once the batch keeps at most ``sqrt(lam)`` of its tokens on average: the routers still
    choose which tokens and at which timesteps; the term only stops the width routers from
    taking the whole saving.

    Args:
        keep: Per-sample kept fraction (B,) from :func:`token_keep`, or None (no token routers).
        lam: The current target lambda.
        weight: The FLOPs term's weight w.

    Returns:
        A scalar tensor (0 when ``keep`` is None).

    Example:
        >>> float(token_keep_loss(torch.tensor([1.0, 1.0]), 0.25))  # 2 * (1 - 0.5)^2
        0.5
        >>> float(token_keep_loss(torch.tensor([0.4]), 0.25))
        0.0
    """
    if keep is None:
        return torch.zeros(())
    excess = (keep.float().mean() - token_keep_target(lam)).clamp(min=0.0)
    return weight * excess**2


def distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE between the student's and the frozen teacher's full outputs (B,).

    Example:
        >>> distill_loss(torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)).tolist()
        [1.0, 1.0]
    """
    if student.shape != teacher.shape:
        raise ConfigError(
            f"student output {tuple(student.shape)} and teacher output {tuple(teacher.shape)} "
            "differ; the teacher must be the original model"
        )
    return mean_flat((student.float() - teacher.float()) ** 2)
