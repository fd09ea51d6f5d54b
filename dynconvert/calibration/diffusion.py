"""Forward processes and their losses: DDPM (eps, v, the variational-bound term) and flow matching.

The DDPM part follows the conventions of DiT's ``diffusion/gaussian_diffusion.py`` (itself from
OpenAI's improved-diffusion): schedules in float64, read per timestep and cast to float32; a
learned-sigma model's variance channels ``v`` in [-1, 1] interpolate the log variance between the
clipped posterior variance and beta; the VB term is in bits per dimension, the decoder NLL at
t = 0 and KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) otherwise. The hybrid loss is eps MSE + VB,
with the mean detached inside the VB term so that it trains only the variance.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dynconvert.errors import ConfigError


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first.

    Example:
        >>> mean_flat(torch.ones(2, 3, 4)).tolist()
        [1.0, 1.0]
    """
    return x.mean(dim=tuple(range(1, x.ndim)))


def make_betas(schedule: str, num_timesteps: int = 1000) -> np.ndarray:
    """The beta schedule, float64.

    "linear": DDPM / DiT, ``linspace(1e-4, 0.02)`` scaled by ``1000 / num_timesteps``.
    "scaled_linear": Stable Diffusion / U-ViT latents, ``linspace(sqrt(0.00085), sqrt(0.012))**2``.

    Example:
        >>> b = make_betas("linear")
        >>> float(b[0]), float(b[-1]), len(b)
        (0.0001, 0.02, 1000)
    """
    if schedule == "linear":
        scale = 1000.0 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if schedule == "scaled_linear":
        return np.linspace(0.00085**0.5, 0.012**0.5, num_timesteps, dtype=np.float64) ** 2
    raise ConfigError(f"beta_schedule must be one of linear, scaled_linear; got {schedule!r}")


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    Example:
        >>> z = torch.zeros(1)
        >>> float(normal_kl(z, z, z, z))
        0.0
    """
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF used by DDPM codebases.

    Example:
        >>> float(approx_standard_normal_cdf(torch.zeros(1)))
        0.5
    """
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log likelihood of data in [-1, 1] discretised to 256 bins under N(means, exp(log_scales)^2).

    The edge bins at -1 and 1 extend to -inf and +inf. Elementwise, in nats.

    Example:
        >>> ll = discretized_gaussian_log_likelihood(torch.zeros(1), torch.zeros(1), torch.zeros(1))
        >>> round(float(ll.exp()), 5)  # probability of the bin [-1/255, 1/255] under N(0, 1)
        0.00313
    """
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    )


class GaussianDiffusion:
    """A DDPM forward process: q_sample, targets, and the variational-bound term.

    Args:
        betas: The beta schedule (float64 array) or a schedule name for ``make_betas``.
        num_timesteps: Steps, when ``betas`` is a name.

    Example:
        >>> diff = GaussianDiffusion("linear")
        >>> x0, noise, t = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2), torch.tensor([0, 999])
        >>> xt = diff.q_sample(x0, t, noise)
        >>> round(float(xt[1].mean()), 4)  # sqrt(1 - alpha_bar_999)
        1.0
    """

    def __init__(self, betas: np.ndarray | str, num_timesteps: int = 1000):
        if isinstance(betas, str):
            betas = make_betas(betas, num_timesteps)
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ConfigError("betas must be a 1-D array with values in (0, 1]")
        self.num_timesteps = int(betas.shape[0])
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        # The posterior variance is 0 at t = 0; its log is clipped to the value at t = 1.
        post_log_var = np.log(np.append(post_var[1], post_var[1:]))
        self._np = {
            "betas": betas,
            "alphas_cumprod": abar,
            "sqrt_alphas_cumprod": np.sqrt(abar),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1.0),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": post_log_var,
            "log_betas": np.log(betas),
            "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
        }
        # Cast after the float64 computation: gather-then-cast equals cast-then-gather.
        self._tables = {k: torch.from_numpy(v).float() for k, v in self._np.items()}
        self._on_device: dict[tuple[str, torch.device], torch.Tensor] = {}

    def table(self, name: str) -> np.ndarray:
        """One float64 schedule array by name (``alphas_cumprod``, ``betas``, ...)."""
        return self._np[name]

    def _extract(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """Values of table ``name`` at timesteps t (B,), shaped (B, 1, ..., 1), ``ndim`` dims."""
        key = (name, t.device)
        if key not in self._on_device:
            self._on_device[key] = self._tables[name].to(t.device)
        out = self._on_device[key][t.long()]
        return out.reshape(-1, *([1] * (ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0): ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``."""
        return (
            self._extract("sqrt_alphas_cumprod", t, x0.ndim) * x0
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x0.ndim) * noise
        )

    def v_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The v-prediction target ``sqrt(abar_t) noise - sqrt(1 - abar_t) x0``."""
        return (
            self._extract("sqrt_alphas_cumprod", t, x0.ndim) * noise
            - self._extract("sqrt_one_minus_alphas_cumprod", t, x0.ndim) * x0
        )

    def predict_x0_from_eps(
        self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
    ) -> torch.Tensor:
        """x_0 implied by an eps prediction: ``sqrt(1/abar) x_t - sqrt(1/abar - 1) eps``."""
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.ndim) * eps
        )

    def q_posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            self._extract("posterior_mean_coef1", t, x_t.ndim) * x0
            + self._extract("posterior_mean_coef2", t, x_t.ndim) * x_t
        )
        log_var = self._extract("posterior_log_variance_clipped", t, x_t.ndim)
        return mean, log_var.expand_as(x_t)

    def learned_log_variance(self, var_values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Log variance from learned-range outputs v in [-1, 1]:
        ``frac log(beta) + (1-frac) min``."""
        min_log = self._extract("posterior_log_variance_clipped", t, var_values.ndim)
        max_log = self._extract("log_betas", t, var_values.ndim)
        frac = (var_values + 1.0) / 2.0
        return frac * max_log + (1.0 - frac) * min_log

    def vb_terms_bpd(
        self,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        eps: torch.Tensor,
        var_values: torch.Tensor,
    ) -> torch.Tensor:
        """The variational-bound term of each sample, in bits per dimension.

        Args:
            x0: Clean data (B, C, ...).
            x_t: Noisy input (B, C, ...).
            t: Timesteps (B,).
            eps: The eps prediction (detach it to train only the variance, as DiT does).
            var_values: The learned-range variance channels, (B, C, ...).

        Returns:
            (B,): decoder NLL where t == 0, KL(q || p) elsewhere, each averaged over dimensions
            and divided by ln 2.
        """
        true_mean, true_log_var = self.q_posterior(x0, x_t, t)
        pred_x0 = self.predict_x0_from_eps(x_t, t, eps)
        model_mean, _ = self.q_posterior(pred_x0, x_t, t)
        model_log_var = self.learned_log_variance(var_values, t)
        kl = normal_kl(true_mean, true_log_var, model_mean, model_log_var)
        kl = mean_flat(kl) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def hybrid_loss(
        self,
        model_output: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """DiT's training loss for an eps model, with the VB term when it learns sigma.

        Args:
            model_output: (B, C, ...) eps, or (B, 2C, ...) eps and learned-range variance values.
            x0: Clean data (B, C, ...).
            x_t: Noisy input.
            t: Timesteps (B,).
            noise: The noise that made x_t (the eps target).

        Returns:
            Per-sample (B,) tensors: "mse", "vb" (only with learned sigma), and "loss" (their sum).

        Example:
            >>> diff = GaussianDiffusion("linear")
            >>> x0, noise = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
            >>> t = torch.tensor([10])
            >>> x_t = diff.q_sample(x0, t, noise)
            >>> terms = diff.hybrid_loss(torch.zeros(1, 1, 2, 2), x0, x_t, t, noise)
            >>> terms["loss"].tolist()
            [1.0]
        """
        c = x0.shape[1]
        terms: dict[str, torch.Tensor] = {}
        if model_output.shape[1] == 2 * c:
            eps, var_values = torch.split(model_output, c, dim=1)
            terms["vb"] = self.vb_terms_bpd(x0, x_t, t, eps.detach(), var_values)
        elif model_output.shape[1] == c:
            eps = model_output
        else:
            raise ConfigError(
                f"model output has {model_output.shape[1]} channels; expected {c} (eps) or "
                f"{2 * c} (eps and learned sigma)"
            )
        terms["mse"] = mean_flat((noise - eps) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms


class FlowMatching:
    """Rectified-flow interpolation: ``x_s = (1 - s) x0 + s noise``, velocity ``noise - x0``.

    Example:
        >>> fm = FlowMatching()
        >>> x0, noise, s = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1), torch.tensor([0.25])
        >>> float(fm.interpolate(x0, noise, s)), float(fm.velocity(x0, noise))
        (0.25, 1.0)
    """

    def interpolate(self, x0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``(1 - s) x0 + s noise`` with s (B,) broadcast over the other dimensions."""
        s = s.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
        return (1.0 - s) * x0 + s * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The velocity target ``noise - x0`` (d x_s / d s)."""
        return noise - x0
