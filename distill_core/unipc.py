"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models"), data-prediction form with B(h) = e^h - 1 ("bh2"), in the shape of ``solvers.py``.

In the half log-SNR lambda = -log sigma, with h = lambda_{i+1} - lambda_i and data predictions D_j at
lambda_j, one update from sigma_i to sigma_{i+1} over the points j (predictor: up to p - 1 past points;
corrector: those plus the new point, r = 1) reads, in our variance-exploding x,

    x_{i+1} = (sigma_{i+1}/sigma_i) x_i + (1 - e^{-h}) (D_i + sum_j rho_j (D_j - D_i) / r_j),
    r_j = (lambda_j - lambda_i) / h,
    sum_j rho_j r_j^(k-1) = k! z phi_{k+1}(z) / (e^z - 1),  z = -h,  k = 1 .. K (K points),
    phi_{k+1}(z) = (e^z - sum_{m=0}^{k} z^m / m!) / z^(k+1),

except rho = 1/2 for a single point (the paper's UniP-2 and UniC-1 choice, as in its official code and
diffusers). UniP-p is the predictor; UniC-p corrects x_{i+1} with D_{i+1} (evaluated at the predicted
x_{i+1}, then reused by the next step, so the corrector costs no evaluation) and raises the order to p + 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from distill_core.denoisers.base import Cond, Denoiser
from distill_core.solvers import Callback, _report


def unipc_coefficients(rs: list[float], h: float) -> list[float]:
    """The rho_j of the points at ratios ``rs``, for a step of h in lambda (see the module docstring)."""
    if len(rs) == 1:
        return [0.5]
    z = -h
    g = math.expm1(z) / z - 1  # z phi_2(z); z phi_{k+2}(z) = z phi_{k+1}(z) / z - 1/(k+1)!
    b = []
    for k in range(1, len(rs) + 1):
        b.append(math.factorial(k) * g / math.expm1(z))
        g = g / z - 1 / math.factorial(k + 1)
    return np.linalg.solve(np.vander(rs, increasing=True).T, b).tolist()


def unipc_update(x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                 points: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """One UniP or UniC update from sigma to sigma_next over ``points`` [(lambda_j, D_j)], the first at sigma.
    The step to sigma = 0 takes one point only: x = D_i (the ratios r_j would be 0)."""
    (lam, d0), rest = points[0], points[1:]
    if sigma_next == 0:
        return d0
    h = math.log(float(sigma) / float(sigma_next))
    rs = [(lam_j - lam) / h for lam_j, _ in rest]
    x_next = (sigma_next / sigma) * x - math.expm1(-h) * d0
    if rest:
        rho = unipc_coefficients(rs, h)
        x_next = x_next - math.expm1(-h) * sum(w * (d - d0) / r for w, r, (_, d) in zip(rho, rs, rest))
    return x_next


def unipc(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, cond: Cond = None,
          callback: Callback | None = None, order: int = 2) -> torch.Tensor:
    """UniPC-p (bh2, data prediction): UniP-p with up to ``order`` points (fewer while the history fills)
    and UniC at every point but the last; one evaluation per step. The step to sigma = 0 is first order,
    x = D (as DPM-Solver++'s). The callback gets the corrected x and D evaluated before the correction."""
    history: list[tuple[float, torch.Tensor]] = []  # (lambda_j, D_j), newest first
    x_prev = x
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i], cond)
        lam = -math.log(float(sigmas[i]))
        if history:
            x = unipc_update(x_prev, sigmas[i - 1], sigmas[i], [*history, (lam, denoised)])
        _report(callback, i, x, sigmas, denoised)
        history = [(lam, denoised), *history][:order]
        x_prev = x
        x = unipc_update(x, sigmas[i], sigmas[i + 1], history if sigmas[i + 1] > 0 else history[:1])
    return x
