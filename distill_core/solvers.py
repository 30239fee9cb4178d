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
from distill_core.schedules import flow_time, karras

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
    x = D (as DPM-Solver++'s). The callback gets the corrected x and D evaluated before the correction.

    UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
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
    "unipc": partial(unipc, order=2),
    "unipc_3": partial(unipc, order=3),
}

#: The global order of accuracy each solver reaches (measured in tests/test_solver_order.py);
#: DPM-Solver++(3M) in its reference form is order 2 (see ``dpmpp_multistep``).
ORDER: dict[str, int] = {"euler": 1, "ddim": 1, "heun": 2, "dpmpp_2m": 2, "dpmpp_3m": 2,
                         "dpmpp_3m_corrected": 3, "ipndm": 4, "unipc": 3, "unipc_3": 4}


def nfe_of(name: str, steps: int, ends_at_zero: bool = True) -> int:
    """Network evaluations of ``steps`` steps of a solver (Heun's step to sigma = 0 costs one)."""
    return 2 * steps - (1 if ends_at_zero else 0) if name == "heun" else steps


def steps_for_nfe(name: str, nfe: int, ends_at_zero: bool = True) -> int:
    """The most steps of a solver that fit a budget of ``nfe`` evaluations."""
    if name not in SOLVERS:
        raise KeyError(f"unknown solver {name!r}: choose one of {', '.join(SOLVERS)}")
    if name == "heun":
        return (nfe + 1) // 2 if ends_at_zero else nfe // 2
    return nfe


def spends_exactly(name: str, nfe: int) -> bool:
    """Whether a solver's steps, ending at sigma_min, cost exactly ``nfe`` evaluations (Heun's two a step cannot
    spend an odd budget), so that its row at ``nfe`` is a row at that cost."""
    return nfe_of(name, steps_for_nfe(name, nfe, ends_at_zero=False), ends_at_zero=False) == nfe


def solver_names(chosen: str | None) -> list[str]:
    """The solvers named in a comma-separated list (``"unipc, dpmpp_2m"``; ``None``: every one), in
    ``SOLVERS``'s order; a ``ValueError`` for an unknown name, or for Heun alone, which cannot spend one
    evaluation."""
    if chosen is None:
        return list(SOLVERS)
    names = {name.strip() for name in chosen.split(",") if name.strip()}
    unknown = sorted(names - set(SOLVERS))
    if unknown or not names:
        raise ValueError(f"report_solvers: unknown solver {', '.join(unknown) or repr(chosen)}; name some of "
                         f"{', '.join(SOLVERS)}, comma-separated")
    if names == {"heun"}:
        raise ValueError("report_solvers: Heun alone has no row at an odd budget (two evaluations a step); name "
                         "another solver beside it")
    return [name for name in SOLVERS if name in names]


def solver_grids(denoiser) -> tuple[str, ...]:
    """The grids training-free solvers are compared on for a teacher: Karras's rho grid for every teacher,
    and the time grid flow models are sampled on (``schedules.flow_time``, shift 1) for a flow teacher."""
    return ("karras", "flow") if getattr(denoiser, "prediction", None) == "flow" else ("karras",)


def solver_label(name: str, grid: str = "karras") -> str:
    """A solver row's name: the solver, with ``/flow`` when it runs on the flow time grid."""
    return name if grid == "karras" else f"{name}/{grid}"


def solver_labels(denoiser, nfe: int, chosen: str | None = None) -> list[str]:
    """The solver rows a teacher is compared with at ``nfe`` evaluations: each solver of those ``chosen``
    (``solver_names``) that spends exactly ``nfe`` (``spends_exactly``), on every grid of the teacher
    (``solver_grids``)."""
    names = [name for name in solver_names(chosen) if spends_exactly(name, nfe)]
    return [solver_label(name, grid) for grid in solver_grids(denoiser) for name in names]


def parse_solver_label(label: str) -> tuple[str, str]:
    """(solver, grid) of a ``solver_label``."""
    name, _, grid = label.partition("/")
    return name, grid or "karras"


def solver_sigmas(label: str, nfe: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """The grid for a training-free solver (a ``solver_label``) at a budget of ``nfe`` evaluations: every
    evaluation is a real step from sigma_max to sigma_min (the sample there is the image; a final step
    sigma_min -> 0 would spend an evaluation on a change of order sigma_min). Students end at the same
    sigma_min, so solvers and students are compared on one grid family. The grid is Karras's rho grid, or
    for ``name/flow`` the flow models' uniform time grid."""
    name, grid = parse_solver_label(label)
    steps = steps_for_nfe(name, nfe, ends_at_zero=False)
    if grid == "flow":
        return flow_time(steps, sigma_min, sigma_max)
    if grid != "karras":
        raise ValueError(f"unknown solver grid {grid!r} in {label!r}: karras or flow")
    return karras(steps, sigma_min, sigma_max, rho)
