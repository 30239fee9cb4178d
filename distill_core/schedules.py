"""Noise schedules: descending sigmas in the variance-exploding convention (x = x0 + sigma n).

Every continuous schedule takes ``n`` intervals and returns n + 1 points from sigma_max down to
sigma_min; ``append_zero`` adds the final step to sigma = 0 that samplers take at the end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 (EDM, eq. 5): sigma_i = (s_max^(1/rho) + i/n (s_min^(1/rho) - s_max^(1/rho)))^rho."""
    ramp = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).float()


def log_snr_uniform(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Uniform in the half log-SNR lambda = -log sigma (DPM-Solver's "logSNR" spacing)."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n + 1, dtype=torch.float64).exp().float()


def vp_time_uniform(n: int, sigma_min: float, sigma_max: float, beta_d: float = 19.9,
                    beta_min: float = 0.1) -> torch.Tensor:
    """Uniform in the time t of the VP SDE (Song et al. 2021), where
    sigma(t) = sqrt(exp(beta_min t + beta_d t^2 / 2) - 1); t runs from t(sigma_max) to t(sigma_min)."""

    def t_of(sigma: float) -> float:  # root of beta_d/2 t^2 + beta_min t - log(1 + sigma^2) = 0
        c = math.log1p(sigma**2)
        return (math.sqrt(beta_min**2 + 2 * beta_d * c) - beta_min) / beta_d

    t = torch.linspace(t_of(sigma_max), t_of(sigma_min), n + 1, dtype=torch.float64)
    return torch.expm1(beta_min * t + 0.5 * beta_d * t**2).sqrt().float()


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The time shift of flow models (SD3, Esser et al. 2024, eq. 23; Wan, Qwen-Image, Flux with its own shift):
    t' = s t / (1 + (s - 1) t); s > 1 spends more of a uniform grid at high noise."""
    return shift * t / (1 + (shift - 1) * t)


def flow_time(n: int, sigma_min: float, sigma_max: float, shift: float = 1.0) -> torch.Tensor:
    """The grid flow models are sampled on, in our sigma: uniform in the unshifted time u, then t = shift_time(u, s),
    sigma = t / (1 - t). The ends are exactly sigma_max and sigma_min (u runs between their unshifted times)."""
    def unshift(t: float) -> float:
        return t / (shift - (shift - 1) * t)

    t_hi, t_lo = sigma_max / (1 + sigma_max), sigma_min / (1 + sigma_min)
    t = shift_time(torch.linspace(unshift(t_hi), unshift(t_lo), n + 1, dtype=torch.float64), shift)
    sigmas = t / (1 - t)
    sigmas[0], sigmas[-1] = sigma_max, sigma_min
    return sigmas.float()


def flux_shift(image_tokens: int, base_shift: float = 0.5, max_shift: float = 1.15, base_tokens: int = 256,
               max_tokens: int = 4096) -> float:
    """Flux's resolution-dependent shift s = exp(mu), mu linear in the image's token count from ``base_shift``
    at ``base_tokens`` to ``max_shift`` at ``max_tokens`` (a 1024 x 1024 image: 64 x 64 latent patches of
    2 x 2 -> 4096)."""
    mu = base_shift + (max_shift - base_shift) * (image_tokens - base_tokens) / (max_tokens - base_tokens)
    return math.exp(mu)


def flux2_shift(image_tokens: int, steps: int = 50) -> float:
    """Flux.2's shift s = exp(mu) as its pipelines set it, a fit by its makers: mu linear in the image's token
    count L (a 1024 x 1024 image: 64 x 64 tokens -> 4096) and in the step count n between the fits at 10 steps,
    mu_10 = 8.7381e-5 L + 1.8983, and at 200, mu_200 = 1.6927e-4 L + 0.45667; above 4300 tokens mu_200
    alone."""
    mu_200 = 1.6927e-4 * image_tokens + 0.45666666
    if image_tokens > 4300:
        return math.exp(mu_200)
    mu_10 = 8.73809524e-05 * image_tokens + 1.89833333
    return math.exp(mu_200 + (mu_200 - mu_10) / 190.0 * (steps - 200))


def cogview4_shift(image_tokens: int, base_shift: float = 0.25, max_shift: float = 0.75,
                   base_tokens: int = 256) -> float:
    """CogView4's shift s = mu, applied linearly (t' = s t / (1 + (s - 1) t)), mu growing with the square root of
    the image's token count L: mu = sqrt(L / ``base_tokens``) ``max_shift`` + ``base_shift``."""
    return math.sqrt(image_tokens / base_tokens) * max_shift + base_shift


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The VE sigma of every step of a discrete DDPM schedule: sigma_t = sqrt((1 - abar_t) / abar_t)."""
    abar = alphas_cumprod.double()
    return ((1 - abar) / abar).sqrt()


def discrete_timesteps(n: int, num_train_steps: int = 1000, spacing: str = "leading",
                       steps_offset: int = 0) -> torch.Tensor:
    """The n training timesteps a diffusers scheduler visits, descending, for its ``timestep_spacing``:
    "leading" (Stable Diffusion, with ``steps_offset`` 1), "trailing" or "linspace"."""
    if spacing == "leading":
        t = torch.arange(n, dtype=torch.float64) * (num_train_steps // n) + steps_offset
    elif spacing == "trailing":
        t = torch.arange(num_train_steps, 0, -num_train_steps / n, dtype=torch.float64).round().flip(0) - 1
    elif spacing == "linspace":
        t = torch.linspace(0, num_train_steps - 1, n, dtype=torch.float64).round()
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}: choose leading, trailing or linspace")
    return t.long().flip(0)


def discrete(n: int, alphas_cumprod: torch.Tensor, spacing: str = "leading", steps_offset: int = 0) -> torch.Tensor:
    """The n sigmas a DDPM-trained model (e.g. Stable Diffusion) is sampled at with n steps: a
    subsequence of its training grid, descending. Close it with ``append_zero``."""
    t = discrete_timesteps(n, len(alphas_cumprod), spacing, steps_offset)
    return sigmas_from_alphas_cumprod(alphas_cumprod)[t].float()


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    """Add the final sigma = 0 (the clean sample) to a schedule."""
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def nest(sigmas: torch.Tensor, substeps: int | Sequence[int], rho: float = 7.0) -> torch.Tensor:
    """Put ``substeps`` points inside every interval of ``sigmas`` (uniform in sigma^(1/rho)), so that
    every point of ``sigmas`` is exactly a point of the result: with an int K, point i of the coarse
    grid is point i * K of the fine one (a Karras grid of n intervals nests into the Karras grid of n K);
    a sequence gives each interval its own K_i, and point i lands at ``nested_index(substeps, i)``.
    A final sigma = 0 is kept as is (its interval is split uniformly in sigma^(1/rho) too)."""
    per_interval = substeps_per_interval(substeps, len(sigmas) - 1)
    root = sigmas.double() ** (1 / rho)
    inner = [
        (root[i] + torch.arange(k, dtype=torch.float64, device=sigmas.device) / k * (root[i + 1] - root[i])) ** rho
        for i, k in enumerate(per_interval)
    ]
    fine = torch.cat([*inner, sigmas[-1:].double()]).to(sigmas.dtype)
    fine[[nested_index(per_interval, i) for i in range(len(sigmas))]] = sigmas  # coarse points bit for bit
    return fine


def substeps_per_interval(substeps: int | Sequence[int], intervals: int) -> list[int]:
    """K for every interval: an int is the same K everywhere; a sequence must name one per interval."""
    per_interval = [int(substeps)] * intervals if isinstance(substeps, int) else [int(k) for k in substeps]
    if len(per_interval) != intervals:
        raise ValueError(f"substeps {list(substeps)} name {len(per_interval)} intervals; the grid has {intervals}")
    if min(per_interval) < 1:
        raise ValueError(f"substeps must be >= 1, got {substeps}")
    return per_interval


def nested_index(per_interval: Sequence[int], i: int) -> int:
    """The index in the nested grid of the coarse grid's point i."""
    return sum(per_interval[:i])


def phased(n: int, refinement: list[float] | torch.Tensor) -> torch.Tensor:
    """The phase-aware schedule of phased score distillation: ``n`` intervals whose points are the
    boundaries of the n-phase partition, descending.

    ``refinement`` is a partition's refinement sequence (``methods.phases.Partition.refinement``):
    sigma_max, sigma_min, then every split point in the order the partition inserted it. The partition
    into n phases keeps the first n + 1 of them, so any solver sampled on ``phased(n, ...)`` steps
    exactly from one phase boundary to the next."""
    points = [float(s) for s in refinement]
    if not 1 <= n <= len(points) - 1:
        raise ValueError(f"a refinement of {len(points) - 1} phases gives 1..{len(points) - 1} intervals, not {n}")
    return torch.tensor(sorted(points[: n + 1], reverse=True), dtype=torch.float32)
