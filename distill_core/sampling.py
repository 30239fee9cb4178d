"""Few-step sampling with a distilled student: one Euler step per interval of its stored schedule.

Euler (Karras et al. 2022, Alg. 1 without the Heun correction), with d = (x - D(x, sigma)) / sigma:
    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_i
The analytic first step (AFS, Zhou et al. 2024, SFD sec. 4; ``distill_core.afs``) replaces the first
network call by d_0 = (x_0 - mu) / sqrt(1 + sigma_0^2): at sigma_max the sample is nearly pure noise and
the direction is almost (x - mu) / sigma, so with AFS a schedule of n intervals costs n - 1 evaluations.
mu is SFD's 0, or the teacher's class mean that the student file carries. The last point of
the schedule is sigma_min (no final step to 0): the student's output there is the image.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from distill_core.afs import afs_direction, guided_centers
from distill_core.denoisers.base import Cond, move_cond
from distill_core.solvers import SOLVERS
from distill_core.students import Student


def intervals_for(nfe: int, afs: bool) -> int:
    """Intervals of the student schedule for a budget of ``nfe`` evaluations (AFS saves one)."""
    return nfe + 1 if afs else nfe


def euler_step(
    denoiser,
    x: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    cond: Cond = None,
    analytic: bool = False,
    center: torch.Tensor | None = None,
) -> torch.Tensor:
    """One Euler step from sigma to sigma_next; ``analytic`` uses the AFS direction about ``center`` (no
    evaluation)."""
    d = afs_direction(x, sigma, center) if analytic else (x - denoiser(x, sigma, cond)) / sigma
    return x + (sigma_next - sigma) * d


def few_step(
    denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: Cond = None,
    afs: bool = True,
    callback: Callable[[dict], None] | None = None,
    center: torch.Tensor | None = None,
) -> torch.Tensor:
    """Euler over ``sigmas`` from ``x`` at sigmas[0]; the first step analytic (about ``center``) when ``afs``."""
    sigmas = sigmas.to(x.device)
    for i in range(len(sigmas) - 1):
        x = euler_step(denoiser, x, sigmas[i], sigmas[i + 1], cond, analytic=afs and i == 0, center=center)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i + 1]})
    return x


@torch.no_grad()
def sample(
    student: Student,
    noise: torch.Tensor,
    cond: Cond = None,
    steps: int | None = None,
    w: float | None = None,
    callback: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """Images from ``noise`` = x_N = sigma_max z with ``steps`` evaluations on the student's stored
    schedule. ``w`` is the guidance scale for students distilled with guidance mode "cfg". Runs on the
    student's device (noise and conditions are moved there; so is the result)."""
    device = next(student.net.parameters()).device
    noise, cond = noise.to(device), move_cond(cond, device)
    sigmas = student.sigmas(steps)
    solver = student.card.get("solver")
    if solver:  # a score student (phased) is sampled by a training-free solver on its stored grid
        return SOLVERS[solver](student.denoiser(steps, w), noise, sigmas.to(noise.device), cond, callback)
    center = guided_centers(student.afs_means, cond, student.guidance_w(w))
    return few_step(student.denoiser(steps, w), noise, sigmas, cond, student.afs, callback, center)


def k_sampler(afs: bool = True):
    """The few-step Euler sampler (AFS first step when ``afs``) as a k-diffusion-style function
    ``f(model, x, sigmas, extra_args=None, callback=None, disable=None)``, where ``model(x, sigma_batch,
    **extra_args)`` returns x0: what ComfyUI's KSAMPLER wraps into a SAMPLER for SamplerCustom."""

    def sample_student(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        ones = x.new_ones(x.shape[0])
        last = {}  # the latest x0 prediction: ComfyUI's previews show "denoised"

        def denoiser(x, sigma, cond=None):
            last["x0"] = model(x, sigma * ones, **extra_args)
            return last["x0"]

        def report(info: dict) -> None:
            if callback is not None:
                callback({**info, "sigma_hat": info["sigma"], "denoised": last.get("x0", info["x"])})

        return few_step(denoiser, x, sigmas, None, afs, report)

    return sample_student
