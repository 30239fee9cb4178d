"""Sampling a distilled student: one table, ``SAMPLERS``, from the sampler key a student file carries to
the solver that samples it, read by engine sampling (``sample``), the ComfyUI SAMPLER node
(``k_sampler``) and the panel alike.

* ``euler_afs``: few-step Euler on the stored schedule, the first step analytic when the card says so;
* ``solver``: the training-free solver the card names (``card["solver"]``) on the stored schedule;
* ``renoise``: the multistep sampler of consistency and distribution-matching students (the stock
  ``lcm`` sampler of ComfyUI): denoise, then noise afresh to the next level (``renoise``).

Few-step Euler, one step per interval of the stored schedule:

Euler (Karras et al. 2022, Alg. 1 without the Heun correction), with d = (x - D(x, sigma)) / sigma:
    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_i
The analytic first step (AFS, Zhou et al. 2024, SFD sec. 4; ``distill_core.afs``) replaces the first
network call by d_0 = (x_0 - mu) / sqrt(1 + sigma_0^2): at sigma_max the sample is nearly pure noise and
the direction is almost (x - mu) / sigma, so with AFS a schedule of n intervals costs n - 1 evaluations.
mu is SFD's 0, or the teacher's class mean that the student file carries. The last point of
the schedule is sigma_min (no final step to 0): the student's output there is the image.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import torch

from distill_core.afs import afs_direction, guided_centers
from distill_core.denoisers.base import Cond, move_cond
from distill_core.denoisers.flow import sigma_to_t, t_to_sigma
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


#: solver signature of every sampler: f(denoiser, x, sigmas, cond=None, callback=None, center=None)
Solve = Callable[..., torch.Tensor]


def _euler_afs(card: dict) -> Solve:
    afs = bool(card.get("afs", False))

    def solve(denoiser, x, sigmas, cond=None, callback=None, center=None):
        return few_step(denoiser, x, sigmas, cond, afs, callback, center)

    return solve


def _named_solver(card: dict) -> Solve:
    name = card.get("solver")
    if name not in SOLVERS:
        raise ValueError(f"the student file names solver {name!r}; known solvers: {sorted(SOLVERS)}")

    def solve(denoiser, x, sigmas, cond=None, callback=None, center=None):
        return SOLVERS[name](denoiser, x, sigmas.to(x.device), cond, callback)

    return solve


def renoise(denoiser, x: torch.Tensor, sigmas: torch.Tensor, cond: Cond = None,
            callback: Callable[[dict], None] | None = None, center=None) -> torch.Tensor:
    """Multistep sampling of a student that maps any noise level to an image (Song et al. 2023, Alg. 1;
    DMD2's multistep generator):

        x0_i = G(x_i, sigma_i),   x_{i+1} = x0_i + sigma_{i+1} n_i,   n_i ~ N(0, I) drawn afresh,

    ending with the image x0 where the schedule reaches 0. The fresh noise of each sample is drawn from a
    generator seeded by that sample's starting noise (``renoise_noise``): the same noise gives the same
    image, in any batch."""
    sigmas = sigmas.to(x.device)
    fresh = renoise_noise(x, len(sigmas) - 1)
    for i in range(len(sigmas) - 1):
        x = denoiser(x, sigmas[i], cond)
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * fresh[i]
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i + 1]})
    return x


def renoise_noise(x: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """``steps`` standard normal draws shaped like ``x``, each sample's from a generator seeded by the CRC of
    its own values in ``x``."""
    draws = []
    for sample in x.detach().float().cpu():
        gen = torch.Generator().manual_seed(zlib.crc32(sample.numpy().tobytes()))
        draws.append(torch.randn((steps, *sample.shape), generator=gen))
    return list(torch.stack(draws, 1).to(x.device, x.dtype))


#: sampler key (a method's ``sampler``, stored in its student files) -> the solver for a card
SAMPLERS: dict[str, Callable[[dict], Solve]] = {
    "euler_afs": _euler_afs, "solver": _named_solver, "renoise": lambda card: renoise,
}


def sampler_key(card: dict) -> str:
    """The sampler a student card names (files written before the key say it by ``solver`` or ``afs``)."""
    return card.get("sampler") or ("solver" if card.get("solver") else "euler_afs")


def sampler_for(card: dict) -> Solve:
    """The solver of a student card (``sampler_key``)."""
    key = sampler_key(card)
    if key not in SAMPLERS:
        raise ValueError(f"the student file needs sampler {key!r}, which this engine does not have "
                         f"(known: {sorted(SAMPLERS)}); update comfyui-distill")
    return SAMPLERS[key](card)


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
    schedule. ``w`` is the guidance scale for students distilled with guidance mode "cfg" and for
    guidance-conditioned students (LCM: w is an input of the network, within the range it was trained on);
    by default the card's. Runs on the student's device (noise and conditions are moved there; so is the
    result)."""
    device = next(student.net.parameters()).device
    noise, cond = noise.to(device), move_cond(cond, device)
    sigmas = student.sigmas(steps)
    center = guided_centers(student.afs_means, cond, student.guidance_w(w))
    return sampler_for(student.card)(student.denoiser(steps, w), noise, sigmas, cond, callback, center)


def comfy_sigmas(card: dict, sigmas: torch.Tensor) -> torch.Tensor:
    """A student's schedule as ComfyUI's samplers give it to the model: sigma itself, or for a flow model
    (``comfy_noise: flow`` in its card) the time t = sigma / (1 + sigma)."""
    return sigma_to_t(sigmas) if card.get("comfy_noise") == "flow" else sigmas


def k_sampler(card: dict):
    """The sampler of a student card as a k-diffusion-style function ``f(model, x, sigmas, extra_args=None,
    callback=None, disable=None)``, where ``model(x, sigma_batch, **extra_args)`` returns x0: what ComfyUI's
    KSAMPLER wraps into a SAMPLER for SamplerCustom. For a flow model ComfyUI's ``sigmas`` are times t and
    its ``x`` is x_t = x / (1 + sigma) (``denoisers.flow``): the sampler solves in sigma and x, and
    gives back x_t at the last time (ComfyUI then divides by 1 - t, which is x again)."""
    solve = sampler_for(card)
    flow = card.get("comfy_noise") == "flow"

    def sample_student(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        ones = x.new_ones(x.shape[0])
        last = {}  # the latest x0 prediction: ComfyUI's previews show "denoised"
        if flow:
            if float(sigmas[0]) >= 1:
                raise ValueError("a flow model's few-step student starts below t = 1: use the sigmas of the "
                                 "Student sigmas + sampler node")
            sigmas = t_to_sigma(sigmas)
            x = x * (1 + sigmas[0])

        def denoiser(x, sigma, cond=None):
            if flow:
                x, sigma = x / (1 + sigma), sigma_to_t(sigma)
            last["x0"] = model(x, sigma * ones, **extra_args)
            return last["x0"]

        def report(info: dict) -> None:
            if callback is not None:
                callback({**info, "sigma_hat": info["sigma"], "denoised": last.get("x0", info["x"])})

        out = solve(denoiser, x, sigmas, None, report)
        return out / (1 + sigmas[-1]) if flow else out

    return sample_student
