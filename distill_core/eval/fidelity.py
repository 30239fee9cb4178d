"""Fidelity of few-step samples to the teacher's own many-step solve from the same noise.

Images live in [-1, 1], so the peak-to-peak range is 2 and PSNR = 10 log10(2^2 / MSE), the mean
squared error taken over the whole batch (every pixel of every image).
"""

from __future__ import annotations

import math

import torch

from distill_core.denoisers.base import Cond, Denoiser
from distill_core.schedules import append_zero, karras
from distill_core.solvers import heun


def _mse(x: torch.Tensor, ref: torch.Tensor) -> float:
    if x.shape != ref.shape:
        raise ValueError(f"images and reference differ in shape: {tuple(x.shape)} vs {tuple(ref.shape)}")
    return float(((x.double() - ref.double()) ** 2).mean())


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB over the batch: 10 log10(4 / MSE) for images in [-1, 1] (inf when identical)."""
    mse = _mse(x, ref)
    return math.inf if mse == 0 else 10.0 * math.log10(4.0 / mse)


def rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Root mean squared error over the batch, in the [-1, 1] pixel units."""
    return math.sqrt(_mse(x, ref))


def reference_solve(denoiser: Denoiser, noise: torch.Tensor, cond: Cond, steps: int = 128) -> torch.Tensor:
    """The probability-flow ODE solved accurately from ``noise`` (x at sigma_max): ``steps`` steps of
    Heun (Karras et al. 2022, Alg. 1) on the Karras rho = 7 grid closed by sigma = 0, i.e.
    2 steps - 1 evaluations -- the same step count convention as ``benchmark.solver_sigmas``."""
    sigmas = append_zero(karras(steps - 1, denoiser.sigma_min, denoiser.sigma_max, 7.0))
    with torch.no_grad():
        return heun(denoiser, noise, sigmas.to(noise.device), cond)
