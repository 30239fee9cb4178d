"""Every solver converges to a high-accuracy ODE solution (scipy's DOP853) at its order.

The ODE in the half log-SNR lambda = -log sigma is dx/dlambda = D(x, e^-lambda) - x. Errors are
measured at sigma_min on log-SNR-uniform grids of n and 2n steps; the observed order is
log2(e_n / e_2n). Multistep solvers start with lower orders; their first steps are shortened
(step k of order k + 1 gets length h^((p+1)/(k+2))) so that the start does not mask the order p of
the steady formula: a wrong coefficient in it shows as a lower observed order.

Randomised weights make D oscillate in lambda at up to 250/4 rad per unit (the top frequency of the
sinusoidal noise embedding, which a trained net barely uses); the test damps the time embedding so
that test-sized step counts are in the asymptotic regime.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from distill_core.schedules import append_zero, log_snr_uniform
from distill_core.solvers import ORDER, SOLVERS

SIGMA_MAX, SIGMA_MIN = 8.0, 0.4
WARMUP = {"dpmpp_2m": 1, "dpmpp_3m": 2, "dpmpp_3m_corrected": 2, "ipndm": 3, "unipc": 1, "unipc_3": 2}
#: Predictor-corrector solvers reach their asymptotic order on the UNet problem only beyond ~200 steps
#: (measured); their order is checked on the quadrature problem below, where it shows from 48 steps.
LATE = {"dpmpp_3m", "unipc", "unipc_3"}
STEPS = {1: (24, 48), 2: (24, 48), 3: (24, 48), 4: (24, 48)}


@pytest.fixture(scope="module")
def problem():
    from distill_core.denoisers.edm import EDMDenoiser
    from distill_core.nets.unet import UNet
    from tests.conftest import TINY_UNET, randomise

    torch.set_num_threads(1)
    denoiser = EDMDenoiser(randomise(UNet(TINY_UNET), scale=0.15)).double().eval().requires_grad_(False)
    denoiser.net.time_mlp[0].weight.mul_(0.1)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((2, 1, 8, 8), generator=gen, dtype=torch.float64) * SIGMA_MAX
    cond = torch.tensor([3, 7])

    def rhs(lam: float, flat: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(flat).reshape(x.shape)
        with torch.no_grad():
            return (denoiser(xt, torch.tensor(math.exp(-lam), dtype=torch.float64), cond) - xt).flatten().numpy()

    sol = solve_ivp(rhs, (-math.log(SIGMA_MAX), -math.log(SIGMA_MIN)), x.flatten().numpy(), method="DOP853",
                    rtol=1e-12, atol=1e-12)
    exact = torch.from_numpy(sol.y[:, -1]).reshape(x.shape)
    return denoiser, x, cond, exact


def warm_grid(n: int, order: int, warmup: int) -> torch.Tensor:
    """n log-SNR steps from SIGMA_MAX to SIGMA_MIN whose first ``warmup`` steps are shortened."""
    lam0, lam1 = -math.log(SIGMA_MAX), -math.log(SIGMA_MIN)
    h = (lam1 - lam0) / n
    short = [h ** ((order + 1) / (k + 2)) for k in range(warmup)]
    start = lam0 + sum(short)
    lams = [lam0, *(lam0 + np.cumsum(short))] if warmup else [lam0]
    rest = np.linspace(start, lam1, n - warmup + 1)[1:]
    return torch.exp(-torch.tensor([*lams, *rest], dtype=torch.float64))


def solve_error(problem, name: str, n: int, order: int | None = None) -> float:
    denoiser, x, cond, exact = problem
    sigmas = warm_grid(n, order or ORDER[name], WARMUP.get(name, 0))
    with torch.no_grad():
        out = SOLVERS[name](denoiser, x, sigmas, cond)
    return float((out - exact).abs().max() / exact.abs().max())


def observed_order(problem, name: str, n1: int, n2: int, order: int | None = None) -> float:
    e1, e2 = solve_error(problem, name, n1, order), solve_error(problem, name, n2, order)
    return math.log(e1 / e2) / math.log(n2 / n1)


@pytest.mark.parametrize("name", sorted(set(SOLVERS) - LATE))
def test_observed_order_matches_theory(problem, name):
    observed = observed_order(problem, name, *STEPS[ORDER[name]])
    assert abs(observed - ORDER[name]) < 0.3, f"{name}: observed order {observed:.2f}, expected {ORDER[name]}"


class LogSNRFunction:
    """D(x, sigma) = g(lambda) for every pixel, independent of x: the ODE becomes a quadrature,
    x(lambda_1) = e^-(lambda_1 - lambda_0) x(lambda_0) + integral e^(l - lambda_1) g(l) dl, and the
    multistep history is exact, so the order of the steady formula shows from few steps on."""

    sigma_min, sigma_max = SIGMA_MIN, SIGMA_MAX

    @staticmethod
    def g(lam):
        return np.sin(3 * lam) + 0.5 * lam**2

    def __call__(self, x, sigma, cond=None):
        return torch.full_like(x, float(self.g(-math.log(float(sigma)))))


@pytest.fixture(scope="module")
def quadrature():
    from scipy.integrate import quad

    lam0, lam1 = -math.log(SIGMA_MAX), -math.log(SIGMA_MIN)
    x = torch.ones((1, 1, 2, 2), dtype=torch.float64)
    integral = quad(lambda lam: math.exp(lam - lam1) * LogSNRFunction.g(lam), lam0, lam1, epsabs=1e-14, epsrel=1e-14)[0]
    return LogSNRFunction(), x, None, x * math.exp(lam0 - lam1) + integral


def test_reference_3m_is_second_order_and_the_corrected_one_third(quadrature):
    """The D2 coefficient of the reference DPM-Solver++(3M) (official code, diffusers, k-diffusion)
    keeps half the third-order term: the method is order 2. With the factor 2 it is order 3."""
    assert abs(observed_order(quadrature, "dpmpp_3m", 64, 128, order=3) - 2) < 0.3
    assert observed_order(quadrature, "dpmpp_3m_corrected", 64, 128) > 3 - 0.3


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_last_step_to_zero_is_finite(problem, name):
    denoiser, x, cond, _ = problem
    sigmas = append_zero(log_snr_uniform(4, 0.002, 80.0)).double()
    with torch.no_grad():
        out = SOLVERS[name](denoiser, x * 10, sigmas, cond)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["unipc", "unipc_3"])
def test_unipc_order_on_the_quadrature(quadrature, name):
    observed = observed_order(quadrature, name, 48, 96)
    assert abs(observed - ORDER[name]) < 0.35, f"{name}: observed order {observed:.2f}, expected {ORDER[name]}"
