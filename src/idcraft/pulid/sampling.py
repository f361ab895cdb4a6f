"""The official PuLID SDXL samplers: k-diffusion style, on SD's discrete noise schedule.

Not diffusers' schedulers: the official pipeline (after lllyasviel/Omost) keeps SD's 1000 training sigmas
(scaled-linear betas 0.00085..0.012), spaces ``steps`` Karras sigmas (rho 7) between their min and max plus
a final 0, and calls the UNet with ``x / sqrt(sigma^2 + 1)`` at the nearest training timestep (in log
sigma); the denoised estimate is ``x - eps * sigma``. :func:`sample_dpmpp_2m` (DPM-Solver++(2M), for
ordinary bases) and :func:`sample_dpmpp_sde` (stochastic DPM-Solver++ with a Brownian tree, for Lightning
bases) follow k-diffusion's update rules step for step.

Seeding as official: ``torch.manual_seed(seed)`` draws the initial noise; the SDE's Brownian tree takes its
entropy from the same generator right after (:func:`initial_noise`). A private generator gives the same
numbers without touching the global one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch

from ..errors import IdcraftError

SAMPLERS = ("dpmpp_2m", "dpmpp_sde")
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DiscreteSchedule:
    """SD's training noise levels: ``sigmas[t] = sqrt((1 - alpha_bar_t) / alpha_bar_t)``."""

    def __init__(self, beta_start: float = 0.00085, beta_end: float = 0.012, timesteps: int = 1000):
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.tensor(np.cumprod((1.0 - betas).numpy(), axis=0), dtype=torch.float32)
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def karras(self, steps: int, rho: float = 7.0) -> torch.Tensor:
        """``steps`` Karras sigmas from max to min, then 0."""
        ramp = torch.linspace(0, 1, steps)
        min_inv, max_inv = self.sigma_min ** (1 / rho), self.sigma_max ** (1 / rho)
        sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
        return torch.cat([sigmas, sigmas.new_zeros([1])])

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The training timestep nearest to ``sigma`` in log space."""
        dists = sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)


def initial_noise(seed: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, int]:
    """``(noise, entropy)``: the official ``randn(shape, generator=torch.manual_seed(seed))`` and the
    Brownian tree's seed the SDE sampler then draws from the same generator."""
    generator = torch.Generator("cpu").manual_seed(int(seed))
    noise = torch.randn(shape, generator=generator)
    entropy = int(torch.randint(0, 2**63 - 1, [], generator=generator).item())
    return noise, entropy


def _sigma_fn(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def _t_fn(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log().neg()


@torch.no_grad()
def sample_dpmpp_2m(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, progress=None) -> torch.Tensor:
    """DPM-Solver++(2M) (k-diffusion's ``sample_dpmpp_2m``)."""
    ones = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i] * ones)
        t, t_next = _t_fn(sigmas[i]), _t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            r = (t - _t_fn(sigmas[i - 1])) / h
            mixed = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * mixed
        old_denoised = denoised
        if progress is not None:
            progress(i + 1, len(sigmas) - 1)
    return x


def _ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0):
    sigma_up = torch.minimum(
        sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    )
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


class BrownianNoise:
    """k-diffusion's ``BrownianTreeNoiseSampler`` (one torchsde ``BrownianTree`` for the batch): normalised
    Brownian increments between two noise levels."""

    def __init__(self, x: torch.Tensor, sigma_min: torch.Tensor, sigma_max: torch.Tensor, entropy: int):
        try:
            import torchsde
        except ImportError as exc:
            raise IdcraftError(
                "the dpmpp_sde sampler needs torchsde: pip install 'idcraft[pulid]' (or use --sampler dpmpp_2m)."
            ) from exc
        t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        self.sign = 1 if t0 < t1 else -1
        t0, t1 = (t0, t1) if t0 < t1 else (t1, t0)
        self.tree = torchsde.BrownianTree(t0, torch.zeros_like(x), t1, entropy=entropy)

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        sign = 1 if t0 < t1 else -1
        lo, hi = (t0, t1) if t0 < t1 else (t1, t0)
        with warnings.catch_warnings():  # float32 end points a hair outside the tree's interval: harmless
            warnings.filterwarnings("ignore", message="Should have t")
            w = self.tree(lo, hi) * (self.sign * sign)
        return w / (t1 - t0).abs().sqrt()


@torch.no_grad()
def sample_dpmpp_sde(
    denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, entropy: int, progress=None, eta: float = 1.0
) -> torch.Tensor:
    """Stochastic DPM-Solver++ (k-diffusion's ``sample_dpmpp_sde``, r = 1/2, s_noise 1)."""
    noise = BrownianNoise(x, sigmas[sigmas > 0].min(), sigmas.max(), entropy)
    ones = x.new_ones([x.shape[0]])
    r = 0.5
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i] * ones)
        if sigmas[i + 1] == 0:  # Euler to sigma 0
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        else:
            t, t_next = _t_fn(sigmas[i]), _t_fn(sigmas[i + 1])
            h = t_next - t
            s = t + h * r
            fac = 1 / (2 * r)
            sd, su = _ancestral_step(_sigma_fn(t), _sigma_fn(s), eta)
            s_ = _t_fn(sd)
            x_2 = (_sigma_fn(s_) / _sigma_fn(t)) * x - (t - s_).expm1() * denoised
            x_2 = x_2 + noise(_sigma_fn(t), _sigma_fn(s)) * su
            denoised_2 = denoise(x_2, _sigma_fn(s) * ones)
            sd, su = _ancestral_step(_sigma_fn(t), _sigma_fn(t_next), eta)
            t_next_ = _t_fn(sd)
            mixed = (1 - fac) * denoised + fac * denoised_2
            x = (_sigma_fn(t_next_) / _sigma_fn(t)) * x - (t - t_next_).expm1() * mixed
            x = x + noise(_sigma_fn(t), _sigma_fn(t_next)) * su
        if progress is not None:
            progress(i + 1, len(sigmas) - 1)
    return x


def check_sampler(name: str) -> str:
    if name not in SAMPLERS:
        raise IdcraftError(f"--sampler must be one of {', '.join(SAMPLERS)}, not {name!r}.")
    return name
