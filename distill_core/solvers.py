"""Training-free solvers of the probability-flow ODE, all in one shape (k-diffusion's):

    solver(denoiser, x, sigmas, cond=None, callback=None) -> x at sigmas[-1]

In the VE convention the ODE is dx/dsigma = d(x, sigma) = (x - D(x, sigma)) / sigma (Karras et al.
2022, eq. 3 with s = 1). ``sigmas`` is descending and may end at 0; every solver handles that last
step without dividing by zero. ``callback`` receives, before step i, the dict
``{"i", "x", "sigma", "sigma_next", "denoised"}`` (x and D(x, sigma_i) at sigma_i).

Solvers do not switch off autograd: callers that do not train wrap them in ``torch.no_grad()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from distill_core.denoisers.base import Cond, Denoiser

Callback = Callable[[dict], None]


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The ODE's direction d = (x - D) / sigma."""
    return (x - denoised) / sigma


def _report(callback: Callback | None, i: int, x: torch.Tensor, sigmas: torch.Tensor, denoised: torch.Tensor) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "denoised": denoised})


def euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, cond: Cond = None,
          callback: Callback | None = None) -> torch.Tensor:
    """Euler: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d(x_i, sigma_i). Order 1.

    This is also DDIM with eta = 0 (Song et al. 2021): in the VE variables DDIM's update
    x_{i+1} = D + sigma_{i+1} (x_i - D) / sigma_i is exactly this Euler step (Karras et al. 2022, sec. 3),
    so ``SOLVERS["ddim"]`` is this function."""
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i], cond)
        _report(callback, i, x, sigmas, denoised)
        x = x + (sigmas[i + 1] - sigmas[i]) * to_d(x, sigmas[i], denoised)
    return x


def heun(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, cond: Cond = None,
         callback: Callback | None = None) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1, deterministic): an Euler predictor and
    the trapezoidal corrector x_{i+1} = x_i + h (d_i + d'_{i+1}) / 2. The step to sigma = 0 is a plain
    Euler step (Alg. 1, line 8), so n steps ending at 0 cost 2n - 1 evaluations. Order 2."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma, cond)
        _report(callback, i, x, sigmas, denoised)
        d = to_d(x, sigma, denoised)
        x_euler = x + (sigma_next - sigma) * d
        if sigma_next == 0:
            x = x_euler
            continue
        d_next = to_d(x_euler, sigma_next, denoiser(x_euler, sigma_next, cond))
        x = x + (sigma_next - sigma) * (d + d_next) / 2
    return x


def dpmpp_multistep(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, cond: Cond = None,
                    callback: Callback | None = None, order: int = 2, d2_scale: float = 1.0) -> torch.Tensor:
    """DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++", Alg. 2 and its 3rd-order extension) in
    the half log-SNR lambda = -log sigma, with data predictions D_j at lambda_j and h = lambda_{i+1} - lambda_i:

        x_{i+1} = (sigma_{i+1}/sigma_i) x_i - (e^{-h} - 1) D0 + ...
        2nd order:  - (e^{-h} - 1) D1 / 2,                        D1 = (D0 - D_{-1}) / r0   (midpoint form)
        3rd order:  + ((e^{-h} - 1)/h + 1) D1 - ((e^{-h} - 1 + h)/h^2 - 1/2) D2,
                    D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1),  D2 = d2_scale (D1_0 - D1_1) / (r0 + r1)

    with r_k = h_k / h the ratios of the previous log-SNR steps. Early steps use the orders their
    history allows; the step to sigma = 0 is the first-order one, x = D0 (where hand-written
    multistep solvers hit log 0).

    ``d2_scale = 1`` is the formula of the official DPM-Solver code, diffusers and k-diffusion. Its D2
    is h^2 D''/2, while the exact integral needs (h^3/6) D'', i.e. a factor 2 on D2: with
    ``d2_scale = 1`` the third-order term is off by half, the local error is O(h^3) and the global
    order is 2 (``tests/test_solver_order.py`` measures it). ``d2_scale = 2`` makes it order 3."""
    history: list[tuple[torch.Tensor, torch.Tensor]] = []  # (lambda_j, D_j), newest first
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma, cond)
        _report(callback, i, x, sigmas, denoised)
        history = [(-torch.log(sigma), denoised), *history][:order]
        if sigma_next == 0:
            x = denoised
            continue
        lam = history[0][0]
        h = -torch.log(sigma_next) - lam
        phi_1 = torch.expm1(-h)
        x = (sigma_next / sigma) * x - phi_1 * denoised
        if len(history) == 2:
            r0 = (lam - history[1][0]) / h
            x = x - 0.5 * phi_1 * (denoised - history[1][1]) / r0
        elif len(history) == 3:
            (_, m0), (lam1, m1), (lam2, m2) = history
            r0, r1 = (lam - lam1) / h, (lam1 - lam2) / h
            d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = d2_scale * (d1_0 - d1_1) / (r0 + r1)
            phi_2 = phi_1 / h + 1
            phi_3 = phi_2 / h - 0.5
            x = x + phi_2 * d1 - phi_3 * d2
    return x


def adams_bashforth_weights(nodes: list[float], start: float, end: float) -> list[float]:
    """Weights w_j with sum_j w_j f(nodes_j) = integral_start^end p(s) ds, p the polynomial through
    the points (nodes_j, f_j): the variable-step Adams-Bashforth rule of order len(nodes)."""
    weights = []
    for j, node in enumerate(nodes):
        others = [n for k, n in enumerate(nodes) if k != j]
        basis = np.poly1d(np.poly(others)) / math.prod(node - n for n in others) if others else np.poly1d([1.0])
        antiderivative = np.polyint(basis)
        weights.append(float(antiderivative(end) - antiderivative(start)))
    return weights


def ipndm(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, cond: Cond = None,
          callback: Callback | None = None, order: int = 4) -> torch.Tensor:
    """iPNDM (Zhang & Chen 2023, DEIS, "improved PNDM"): Adams-Bashforth on d in sigma with up to
    ``order`` past directions and lower orders while the history fills, one evaluation per step. The
    weights are the variable-step ones (as k-diffusion's ``ipndm_v``) so the order holds on any grid;
    on a uniform grid they are the classic 1, (3, -1)/2, (23, -16, 5)/12, (55, -59, 37, -9)/24."""
    ds: list[torch.Tensor] = []
    nodes: list[float] = []
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i], cond)
        _report(callback, i, x, sigmas, denoised)
        ds = [to_d(x, sigmas[i], denoised), *ds][:order]
        nodes = [float(sigmas[i]), *nodes][:order]
        weights = adams_bashforth_weights(nodes, nodes[0], float(sigmas[i + 1]))
        x = x + sum(w * d for w, d in zip(weights, ds))
    return x


Solver = Callable[..., torch.Tensor]

#: Every training-free solver by name.
SOLVERS: dict[str, Solver] = {
    "euler": euler,
    "ddim": euler,
    "heun": heun,
    "dpmpp_2m": partial(dpmpp_multistep, order=2),
    "dpmpp_3m": partial(dpmpp_multistep, order=3),
    "dpmpp_3m_corrected": partial(dpmpp_multistep, order=3, d2_scale=2.0),
    "ipndm": ipndm,
}

#: The global order of accuracy each solver reaches (measured in tests/test_solver_order.py);
#: DPM-Solver++(3M) in its reference form is order 2 (see ``dpmpp_multistep``).
ORDER: dict[str, int] = {"euler": 1, "ddim": 1, "heun": 2, "dpmpp_2m": 2, "dpmpp_3m": 2,
                         "dpmpp_3m_corrected": 3, "ipndm": 4}


def nfe_of(name: str, steps: int) -> int:
    """Network evaluations of ``steps`` steps of a solver on a grid that ends at sigma = 0."""
    return 2 * steps - 1 if name == "heun" else steps


def steps_for_nfe(name: str, nfe: int) -> int:
    """The most steps of a solver that fit a budget of ``nfe`` evaluations (grid ending at 0)."""
    if name not in SOLVERS:
        raise KeyError(f"unknown solver {name!r}: choose one of {', '.join(SOLVERS)}")
    return (nfe + 1) // 2 if name == "heun" else nfe
