"""Rectified flow by reflow (Liu et al., ICLR 2023, "Flow Straight and Fast"), on the teacher's pairs.

The teacher's ODE couples each noise z with an image x0 = Phi(sigma_max z) (``methods.teacher_pairs``).
Reflow trains a student whose ODE moves every pair along the straight segment between them. In flow time
t in [0, 1] the segment is x_t = (1 - t) x0 + t x_1 with x_1 = sigma_max z; in the engine's convention
(x = x0 + sigma n, sigma = t sigma_max) it reads

    x_sigma = (1 - sigma / sigma_max) x0 + sigma z,     dx/dsigma = z - x0 / sigma_max  (constant),

and the VE ODE dx/dsigma = (x - D(x, sigma)) / sigma follows that constant direction exactly when
D(x_sigma, sigma) = x0. So the student regresses the pair's image from any point of its segment,

    L = E_{sigma, pair} [ lambda(sigma) || D_theta(x_sigma, sigma, c) - x0 ||^2 ],
    lambda(sigma) = 1 / sigma^2 + 1 / sigma_data^2                      (the EDM weight),

with sigma drawn at a uniform position u ~ U[0, 1] of the Karras grid from sigma_max to sigma_min (the
noise levels the few-step sampler visits; Liu et al. draw t ~ U[0, 1]). Where every segment is straight,
Euler is exact at any step count; the student is sampled by Euler on the first ``steps`` points of the
Karras grid, then a last step to sigma = 0, whose result is D at the last point (sampler ``euler_afs``
without AFS; ComfyUI's stock ``euler``).

**Then SFD** (``sfd_fraction`` > 0): the last share of the iterations trains the same student by SFD
(``methods.sfd``, its default distance and teacher solver) against a frozen copy of the student as reflow
left it: the reflowed ODE is nearly straight, so its few-step targets are nearly exact, and SFD makes the
student land on them at exactly its ``steps``.

``straightness`` measures how far a denoiser's ODE paths are from straight lines.

A method whose pairs' segments are cut to their starting point is knowledge distillation
(``methods.kd``): this module's ``PairRegression`` holds what both share.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from distill_core.denoisers.base import Cond, move_cond, per_sample
from distill_core.methods.base import Method, MicroBatch, OptimSpec, StepLoss, TeacherSource
from distill_core.methods.distribution import critic_weight, generator_schedule, karras_at
from distill_core.methods.registry import register
from distill_core.methods.sfd import SFD, SFDConfig, distance, teacher_states
from distill_core.methods.teacher_pairs import PairsConfig, PoolCounted, TeacherPairs
from distill_core.options import option
from distill_core.sampling import euler_step, few_step
from distill_core.schedules import karras


@dataclass
class ReflowConfig(PairsConfig):
    """Reflow's own settings."""

    rho: float = option(7.0, "rho of the Karras grid that the sampling steps and the training noise levels use",
                        min=0.1)
    sfd_fraction: float = option(0.0, "the share of the iterations spent, after reflow, on SFD against the reflowed "
                                 "student (0: reflow only)", min=0, max=0.9)


class PairRegression(PoolCounted, Method):
    """A student trained to map points built from the teacher's pairs (z, c, x0) to x0: the shared part of
    reflow and knowledge distillation. Subclasses give ``inputs`` (the point and its noise level) and
    ``loss``."""

    sampler = "euler_afs"

    def __init__(self, source: TeacherSource, cfg):
        if cfg.guidance_mode != "distilled":
            raise ValueError(f"{self.name} learns the guided teacher's images (guidance_mode 'distilled')")
        super().__init__(source, cfg)
        self.add_student()
        self.pairs = TeacherPairs(self.teacher, source, self.opts, self.sigma_min, self.sigma_max, cfg.seed,
                                  cfg.teacher_cache, cfg.mixed_precision, draws=cfg.iters * cfg.batch)
        self.sigmas = self.schedule()

    @property
    def student(self):
        return self.nets["student"]

    def schedule(self) -> torch.Tensor:
        """The sampling schedule: the first ``steps`` points of the Karras grid, then 0."""
        return generator_schedule(self.cfg.steps, self.sigma_min, self.sigma_max, self.opts.rho)

    def schedule_info(self) -> dict:
        """The schedule's name and parameters, for the student file."""
        return {"name": "karras_then_zero", "rho": self.opts.rho}

    def optim_groups(self) -> dict[str, OptimSpec]:
        return {"student": OptimSpec("adam", schedule="cosine", warmup=10)}

    def inputs(self, z: torch.Tensor, x0: torch.Tensor, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's input built from the pairs (z, x0), and its noise levels (one per sample)."""
        raise NotImplementedError

    def loss(self, denoised: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def losses(self, plan: dict, micro: MicroBatch, generator: torch.Generator) -> Iterator[StepLoss]:
        device = next(self.student.parameters()).device
        z, cond, x0 = self.pairs.draw(micro.size, generator, device)
        x, sigma = self.inputs(z, x0, generator)
        yield StepLoss("student", 0, self.loss(self.student(x, sigma, cond), x0, sigma))

    @torch.no_grad()
    def preview(self, noise: torch.Tensor, cond: Cond) -> torch.Tensor:
        return few_step(self.student, noise, self.sigmas, cond, afs=False)

    def card(self) -> dict:
        return self.student_card({self.cfg.steps: self.sigmas}, self.schedule_info(), afs=False,
                                 comfyui_sampler="euler")


@register("reflow")
class Reflow(PairRegression):
    """Reflow: the student's ODE straightened onto the teacher's noise-to-image pairs."""

    Config = ReflowConfig
    summary = "reflow: straightens the teacher's ODE on its noise-to-image pairs (Liu et al. 2023), Euler sampling"
    node = SFD.node
    straightens = True

    def inputs(self, z: torch.Tensor, x0: torch.Tensor, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """x_sigma = (1 - sigma / sigma_max) x0 + sigma z at sigma(u), u ~ U[0, 1] on the Karras grid."""
        u = torch.rand(z.shape[0], generator=generator, dtype=torch.float64)
        sigma = karras_at(u, self.sigma_min, self.sigma_max, self.opts.rho).float().to(z.device)
        s = per_sample(sigma, z)
        return (1 - s / self.sigma_max) * x0 + s * z, sigma

    def __init__(self, source: TeacherSource, cfg):
        super().__init__(source, cfg)
        self.iteration = 0
        self.sfd_from = cfg.iters - round(self.opts.sfd_fraction * cfg.iters)  # the first SFD iteration
        self.reflowed = None  # the frozen student as reflow left it, the SFD teacher

    def loss(self, denoised: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma_data = float(getattr(self.source.denoiser, "sigma_data", 0.5))
        weight = per_sample(critic_weight(sigma, sigma_data), x0)
        return (weight * (denoised.float() - x0.float()).square()).mean()

    def plan(self, generator: torch.Generator) -> dict:
        self.iteration += 1
        if self.iteration > self.sfd_from and self.reflowed is None:
            self.reflowed = copy.deepcopy(self.student).requires_grad_(False).eval()
        return {}

    def losses(self, plan: dict, micro: MicroBatch, generator: torch.Generator) -> Iterator[StepLoss]:
        if self.reflowed is None:
            yield from super().losses(plan, micro, generator)
            return
        device = next(self.student.parameters()).device
        sfd = SFDConfig()
        x = (torch.randn((micro.size, *self.source.shape), generator=generator) * self.sigma_max).to(device)
        cond = move_cond(self.source.draw_cond(micro.size, generator), device)
        t = self.sigmas.to(device)

        def reflowed(x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
            self.spent += x.shape[0]  # the SFD teacher's evaluations count as the teacher's
            return self.reflowed(x, sigma, cond)

        with torch.no_grad():
            targets = teacher_states(reflowed, x, t, cond, sfd.teacher_substeps, sfd.teacher_solver)
        for i in range(len(t) - 1):
            out = euler_step(self.student, x, t[i], t[i + 1], cond)
            yield StepLoss("student", i, distance(out, targets[i], sfd.loss, sfd.huber_c))
            x = out.detach()

    def state_dict(self) -> dict:
        """The iteration, and past the switch to SFD, the reflowed student's saved weights."""
        state = {"iteration": self.iteration}
        if self.reflowed is not None:
            state["reflowed"] = self.reflowed.saved_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state.get("iteration", 0))
        if "reflowed" in state:
            self.reflowed = copy.deepcopy(self.student).requires_grad_(False).eval()
            self.reflowed.load_saved_state(state["reflowed"])


@torch.no_grad()
def straightness(denoiser, noise: torch.Tensor, cond: Cond, sigma_min: float, sigma_max: float,
                 steps: int = 32) -> float:
    """How far the ODE paths of ``denoiser`` from x_N = sigma_max ``noise`` are from straight lines:

        S = mean_i E|| D(x_i, sigma_i) - x_end ||^2 / E|| x_end - mean(x_end) ||^2,

    over the Euler solve on the Karras grid of ``steps`` steps (x_end its image). A VE path is a straight
    line into its image exactly when the x0 prediction D stays that image all along (dx/dsigma = (x - D) /
    sigma is then constant), so S is 0 for straight paths, where one Euler step is exact (Liu et al.'s
    straightness, read through the x0 prediction and normalised by the images' variance); a teacher whose
    early predictions are blurred class means scores a large fraction of 1."""
    sigmas = karras(steps, sigma_min, sigma_max).to(noise.device)
    x, predictions = noise * sigma_max, []
    for i in range(steps):
        predictions.append(denoiser(x, sigmas[i], cond))
        x = x + (sigmas[i + 1] - sigmas[i]) * (x - predictions[-1]) / sigmas[i]
    spread = (x - x.mean(0)).square().mean()
    return float(torch.stack([(p - x).square().mean() for p in predictions]).mean() / spread)
