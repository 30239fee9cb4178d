"""Our solvers against diffusers' schedulers, an implementation we did not write: the same tiny
DDPM-schedule UNet, the same start noise and exactly the sigmas the scheduler uses; diffusers runs its
own pipeline loop (``scale_model_input``, the UNet at ``scheduler.timesteps``, ``step``), we run a
solver on ``DiffusersDenoiser``. The results must agree to 1e-4 relative (measured: 1e-9 to 3e-7, from
diffusers' float32 arithmetic inside ``step``; up to 8e-6 for UniPC-3); mutation tests show that a wrong
coefficient, timestep or order breaks that tolerance.

Sample variables: Euler and Heun step the variance-exploding x = x0 + sigma n, as we do; DDIM and
DPM-Solver and UniPC step the variance-preserving x_vp = x / sqrt(1 + sigma^2), so their start noise is scaled
by 1 / sqrt(1 + sigma_max^2) (their result at sigma = 0 needs no conversion).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import diffusers
import pytest
import torch

from distill_core.denoisers import DiffusersDenoiser
from distill_core.schedules import append_zero, sigmas_from_alphas_cumprod
from distill_core.solvers import SOLVERS, dpmpp_multistep, unipc
from tests.test_diffusers_adapter import TRAIN_SCHEDULE, rel_err, tiny_unet

TOL = 1e-4
STEPS = 10
LABELS = torch.tensor([3, 8])


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    return tiny_unet()


def diffusers_sample(scheduler, unet: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """diffusers' sampling loop, as its pipelines write it."""
    for t in scheduler.timesteps:
        out = unet(scheduler.scale_model_input(x, t), t, class_labels=LABELS).sample
        x = scheduler.step(out, t, x).prev_sample
    return x


def solver_error(scheduler, unet: torch.nn.Module, solver: Callable, sigmas: torch.Tensor, vp: bool,
                 denoiser_type: type[DiffusersDenoiser] = DiffusersDenoiser) -> float:
    """Relative max difference of ``solver`` on ``sigmas`` and diffusers' ``scheduler`` from the same noise."""
    noise = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = sigmas[0] * noise
    alpha = (1 + sigmas**2).rsqrt()  # x_vp = alpha x
    ref = diffusers_sample(scheduler, unet, alpha[0] * x if vp else x)
    ours = solver(denoiser_type.from_scheduler(unet, scheduler), x, sigmas, LABELS)
    return rel_err(alpha[-1] * ours if vp else ours, ref)


def euler_case(prediction_type: str):
    """Karras sigmas: every sigma off the training grid, so the interpolated timestep is exercised."""
    sched = diffusers.EulerDiscreteScheduler(**TRAIN_SCHEDULE, prediction_type=prediction_type,
                                             use_karras_sigmas=True)
    sched.set_timesteps(STEPS)
    return sched, SOLVERS["euler"], sched.sigmas.double(), False


def ddim_case(prediction_type: str):
    """eta = 0; set_alpha_to_one makes the last step go to abar = 1, i.e. sigma = 0."""
    sched = diffusers.DDIMScheduler(**TRAIN_SCHEDULE, prediction_type=prediction_type, clip_sample=False,
                                    set_alpha_to_one=True, timestep_spacing="trailing")
    sched.set_timesteps(STEPS)
    return sched, SOLVERS["ddim"], append_zero(sigmas_from_alphas_cumprod(sched.alphas_cumprod)[sched.timesteps]), True


def heun_case(prediction_type: str):
    """diffusers lists every inner sigma twice (predictor, corrector): [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0];
    like Karras Alg. 1 and our heun it takes a plain Euler step to sigma = 0 (n steps, 2n - 1 UNet calls),
    so the two compare as they are."""
    sched = diffusers.HeunDiscreteScheduler(**TRAIN_SCHEDULE, prediction_type=prediction_type,
                                            use_karras_sigmas=True)
    sched.set_timesteps(STEPS // 2)
    return sched, SOLVERS["heun"], torch.cat([sched.sigmas[:1], sched.sigmas[1::2]]).double(), False


def dpm_scheduler(prediction_type: str, order: int, **config):
    """DPM-Solver++ multistep; with final_sigmas_type="zero" diffusers' last step is first order, x = D0, as ours."""
    sched = diffusers.DPMSolverMultistepScheduler(**TRAIN_SCHEDULE, prediction_type=prediction_type,
                                                  algorithm_type="dpmsolver++", solver_order=order,
                                                  lower_order_final=False, final_sigmas_type="zero", **config)
    sched.set_timesteps(STEPS)
    return sched


def dpm_case(order: int, prediction_type: str):
    """Trailing integer timesteps: the sigmas are training-grid points, where the model is evaluated."""
    sched = dpm_scheduler(prediction_type, order, timestep_spacing="trailing")
    return sched, SOLVERS[f"dpmpp_{order}m"], sched.sigmas.double(), True


def unipc_case(order: int, prediction_type: str):
    """UniPC-bh2 in data prediction. Ending at sigma = 0 diffusers must lower the order of its last step
    (lower_order_final): at order >= 2 its predictor divides by r = (lambda_j - lambda_i) / h = 0 there and
    returns inf. So order <= 2 ends at 0 with lower_order_final (the last step alone drops to order 1, as
    in ours), and order 3, where lower_order_final would also lower the step before, ends at the grid's
    sigma_min without it. diffusers' float32 coefficients cost ~1e-6 at order 3 (1e-9 in float64)."""
    final = "zero" if order <= 2 else "sigma_min"
    sched = diffusers.UniPCMultistepScheduler(**TRAIN_SCHEDULE, prediction_type=prediction_type, predict_x0=True,
                                              solver_type="bh2", solver_order=order, lower_order_final=order <= 2,
                                              final_sigmas_type=final, timestep_spacing="trailing")
    sched.set_timesteps(STEPS)
    return sched, partial(unipc, order=order), sched.sigmas.double(), True


CASES = {"euler": euler_case, "ddim": ddim_case, "heun": heun_case,
         "dpmpp_2m": partial(dpm_case, 2), "dpmpp_3m": partial(dpm_case, 3),
         "unipc_1": partial(unipc_case, 1), "unipc_2": partial(unipc_case, 2), "unipc_3": partial(unipc_case, 3)}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("name", list(CASES))
def test_solver_matches_diffusers(unet, name: str, prediction_type: str):
    scheduler, solver, sigmas, vp = CASES[name](prediction_type)
    assert solver_error(scheduler, unet, solver, sigmas, vp) < TOL


class RoundingDenoiser(DiffusersDenoiser):
    """Feeds the UNet the nearest integer step, as DPMSolverMultistepScheduler does with Karras sigmas."""

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return super().sigma_to_t(sigma).round()


@pytest.mark.parametrize("order", [2, 3])
def test_dpm_solver_with_karras_sigmas_rounds_the_timestep(unet, order: int):
    """With use_karras_sigmas, diffusers' DPM-Solver steps with the Karras sigma but evaluates the UNet at
    round(t(sigma)), a noise level up to half a training step away (our interpolated t differs from it
    by ~4e-4 relative in the result). Rounding t as diffusers does recovers the agreement, so the solver
    itself matches on an off-grid schedule too."""
    sched = dpm_scheduler("epsilon", order, use_karras_sigmas=True)
    solver = SOLVERS[f"dpmpp_{order}m"]
    assert solver_error(sched, unet, solver, sched.sigmas.double(), True, RoundingDenoiser) < TOL


def test_mutations_break_the_tolerance(unet):
    """The comparisons bite: DPM-Solver++(3M) with the order-3 correction of its D2 term (d2_scale = 2,
    see ``dpmpp_multistep``), Euler fed rounded timesteps and UniPC-2 against diffusers' UniPC-3 all leave
    the 1e-4 tolerance."""
    sched, _, sigmas, vp = dpm_case(3, "epsilon")
    assert solver_error(sched, unet, partial(dpmpp_multistep, order=3, d2_scale=2.0), sigmas, vp) > 2 * TOL
    sched, solver, sigmas, vp = euler_case("epsilon")
    assert solver_error(sched, unet, solver, sigmas, vp, RoundingDenoiser) > 2 * TOL
    sched, _, sigmas, vp = unipc_case(3, "epsilon")
    assert solver_error(sched, unet, partial(unipc, order=2), sigmas, vp) > 2 * TOL


def test_unipc_takes_a_first_order_step_to_zero(unet):
    """UniPC-3 on a grid ending at sigma = 0 returns the last D (no division by r = 0)."""
    sched, _, sigmas, _ = dpm_case(3, "epsilon")
    denoiser = DiffusersDenoiser.from_scheduler(unet, sched)
    seen = []
    x = sigmas[0] * torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = unipc(denoiser, x, sigmas, LABELS, callback=seen.append, order=3)
    assert sigmas[-1] == 0 and torch.isfinite(out).all() and torch.equal(out, seen[-1]["denoised"])
