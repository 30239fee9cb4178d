"""Phased DMD (Fan et al. 2025, "Phased DMD: Few-step Distribution Matching Distillation via Score
Matching within Subintervals", arXiv 2510.27684): DMD2 phase by phase, one expert per phase, on the
shared loop of ``methods.distribution``.

**Phases and experts.** The noise range is split into K phases (K = ``steps``) with boundaries

    s_0 = sigma_max > s_1 > ... > s_{K-1} > s_K = 0

(the K-phase partition of ``methods.phases``, uniform or adaptive in log sigma, its last boundary
sigma_min replaced by 0). Expert G_k (a mixture of experts over noise levels, ``students.Experts``) maps
x at s_k to an image and the student samples with ``sampling.renoise``, the expert chosen by sigma:

    x_{s_{k+1}} = G_k(x_{s_k}, s_k) + s_{k+1} n_k,   n_k ~ N(0, I).

**Progressive training.** The run's iterations are split evenly over the phases, trained in order: during
phase k only G_k trains; the experts before it are frozen and give it its inputs x_{s_k} by backward
simulation. G_k starts from G_{k-1}'s weights (adapters, in shared-base mode), not from the teacher's:
G_{k-1} has already learnt the guided, sharp one-step map one phase up, which is far closer to what G_k
must learn than the teacher's blurry posterior mean; the first expert starts as the teacher.

**DMD inside the subinterval.** G_k's sample x_s = x0_k + s n (s = s_{k+1}) is matched to the teacher's
marginal at s by noising it only further, to t in (s, s_k] (uniform Karras positions inside the phase,
as ``moments.step_levels``, clipped to ``u_range``):

    x_t = x_s + sqrt(t^2 - s^2) n'.

The marginal p_t of x_t is the diffusion's at t, and by Tweedie's formula for the Gaussian kernel from
x_s to x_t (variance t^2 - s^2) its score is

    grad log p_t(x_t) = (E[x_s | x_t] - x_t) / (t^2 - s^2),

so F = E[x_s | x_t] corresponds to the x0-form denoiser D = x_t + t^2 grad log p_t(x_t):

    D(x_t) = x_t + t^2 / (t^2 - s^2) (F(x_t) - x_t),   F(x_t) = x_t + (1 - s^2 / t^2) (D(x_t) - x_t).

The fake score is trained by score matching within the subinterval on detached expert samples: its
estimate of E[x_s | x_t] regresses on x_s,

    L_fake = E[ lambda' || F_fake(x_t, t) - x_s ||^2 ],
    lambda' = 1 / (t^2 - s^2) + 1 / (sigma_data^2 + s^2)

(the EDM weight of the subinterval's own denoising problem: noise sqrt(t^2 - s^2) on data of variance
sigma_data^2 + s^2). The network itself stays an x0-form denoiser at t, D_fake, as the teacher it starts
from (F_fake is read from it by the second identity), so the fresh fake score is the real score and its
training only follows the gap between the expert's distribution and the teacher's. The real score is the
guided teacher's D_real(x_t, t); the generator takes DMD2's normalised score difference at x_s,

    g = dmd_gradient(x_s, D_real, D_fake),   L_G = 1/2 || x_s - sg(x_s - g) ||^2,

back-propagated through x_s = x0_k + s n to G_k. The last phase (s_K = 0: x_s = x0, F = D,
lambda' = DMD2's lambda) is DMD2. ``critic_updates`` fake-score updates per generator update, as DMD2.
The fake score is one network for every phase: phase k only ever evaluates it at t in (s_{k+1}, s_k].

Networks: ``student: lora`` trains one LoRA per expert and one for the fake score on the one frozen base
(which is also the teacher); ``full``, a full copy each. The student file holds every expert (under
``expert.{k}.``) and the boundaries (``student_files.save_student``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distill_core.denoisers.base import Cond, per_sample
from distill_core.methods import phases
from distill_core.methods.distribution import DistributionConfig, critic_weight, karras_at
from distill_core.methods.dmd2 import DMD2
from distill_core.methods.phased import teacher_probe
from distill_core.methods.phases import PARTITIONS
from distill_core.methods.registry import register
from distill_core.options import option
from distill_core.students import Experts, make_networks
from distill_core.teacher import CFGTeacher


@dataclass
class PhasedDMDConfig(DistributionConfig):
    """Phased DMD's own settings (``steps`` is its number of phases and experts K)."""

    partition: str = option("uniform", "phase boundaries: uniform in log sigma, or adaptive (shorter phases where "
                            "the teacher's prediction changes fastest, measured first on a batch of probe "
                            "trajectories)", choices=PARTITIONS)
    probe_batch: int = option(16, "adaptive: teacher trajectories that measure where its prediction changes", min=1)
    probe_steps: int = option(32, "adaptive: steps of the probe trajectories", min=2)


def phase_boundaries(kind: str, K: int, sigma_min: float, sigma_max: float,
                     probe: phases.Probe | None = None) -> torch.Tensor:
    """s_0 = sigma_max > ... > s_{K-1} > s_K = 0: the ``kind`` partition of [sigma_min, sigma_max] into K
    phases (``phases.partition``), its last boundary sigma_min replaced by 0."""
    part = phases.partition(kind, K, sigma_min, sigma_max, probe)
    return torch.tensor([*part.boundaries[:-1], 0.0])


def phase_lengths(iters: int, K: int) -> list[int]:
    """The run's iterations split evenly over K phases (the first ``iters mod K`` phases one more)."""
    return [iters // K + (k < iters % K) for k in range(K)]


def karras_position(sigma: float, sigma_min: float, sigma_max: float, rho: float) -> float:
    """u(sigma) = (s_max^(1/rho) - sigma^(1/rho)) / (s_max^(1/rho) - s_min^(1/rho)), the inverse of
    ``karras_at`` (0 at sigma_max, 1 at sigma_min, above 1 below sigma_min)."""
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (hi - sigma ** (1 / rho)) / (hi - lo)


def subinterval_mean(x_t: torch.Tensor, denoised: torch.Tensor, t: torch.Tensor, s: float) -> torch.Tensor:
    """F = E[x_s | x_t] = x_t + (1 - s^2 / t^2) (D - x_t) of the x0-form denoiser D at noise t (one t per
    sample), for x_t = x_s + sqrt(t^2 - s^2) n: the inverse of D = x_t + t^2 / (t^2 - s^2) (F - x_t)."""
    shrink = per_sample((1 - s**2 / t.double() ** 2).to(x_t), x_t)
    return x_t + shrink * (denoised - x_t)


@register("phased-dmd")
class PhasedDMD(DMD2):
    """Phased DMD: K experts trained one phase after another, each by DMD inside its phase."""

    Config = PhasedDMDConfig
    summary = "Phased DMD: one expert per step, each matched to the teacher inside its phase of the noise " \
              "range, phase after phase (Fan et al. 2025)"
    partial_updates = True  # only the phase's expert trains

    def __init__(self, source, cfg):
        self.phase, self.phase_iterations = 0, 0  # the phase being trained, and its iterations so far
        super().__init__(source, cfg)
        for k in range(cfg.steps):
            a, b = self.phase_positions(k)
            if not a < b:
                raise ValueError(f"phase {k} ({float(self.sigmas[k + 1]):g}, {float(self.sigmas[k]):g}] lies outside "
                                 f"the matching range u_range {self.opts.u_range}: choose fewer steps or another "
                                 "partition")

    def schedule(self) -> torch.Tensor:
        """The phase boundaries (``phase_boundaries``; an adaptive partition probes the guided teacher first)."""
        opts, probe = self.opts, None
        if opts.partition == "adaptive":
            teacher = CFGTeacher(self.source.denoiser, self.w, self.source.uncond)
            probe = teacher_probe(teacher, self.source, self.cfg, self.sigma_max)
            self.teacher_evaluations += opts.probe_batch * (opts.probe_steps + 1) * teacher.evaluations()
        return phase_boundaries(opts.partition, self.cfg.steps, self.sigma_min, self.sigma_max, probe)

    def networks(self, denoiser: nn.Module) -> tuple[dict[str, nn.Module], nn.Module]:
        """``generator``: the K experts on the boundaries; ``fake_score``; the teacher's denoiser next to them."""
        cfg, names = self.cfg, [f"expert.{k}" for k in range(self.cfg.steps)]
        nets, teacher = make_networks(denoiser, (*names, "fake_score"), cfg.student, cfg.lora_rank, cfg.lora_alpha)
        return {"generator": Experts([nets[n] for n in names], self.sigmas.tolist()),
                "fake_score": nets["fake_score"]}, teacher

    @property
    def experts(self) -> Experts:
        return getattr(self.generator, "module", self.generator)

    def plan(self, generator: torch.Generator) -> dict:
        """Phase k of this iteration: the next phase once the current one has had its share of the run's
        iterations (its expert then starts from the previous expert's weights)."""
        lengths, experts = phase_lengths(self.cfg.iters, self.cfg.steps), self.experts.experts
        while self.phase < self.cfg.steps - 1 and self.phase_iterations >= lengths[self.phase]:
            self.phase, self.phase_iterations = self.phase + 1, 0
            experts[self.phase].load_saved_state(experts[self.phase - 1].saved_state())
        self.phase_iterations += 1
        return {"step": self.phase}

    # ------------------------------------------------------------------ the subinterval of phase k
    def phase_positions(self, step: int) -> tuple[float, float]:
        """Karras positions [u(s_k), u(s_{k+1})] of phase k, clipped to ``u_range``."""
        lo, hi = self.opts.u_range
        u = [karras_position(float(self.sigmas[i]), self.sigma_min, self.sigma_max, self.opts.rho)
             for i in (step, step + 1)]
        return max(lo, u[0]), min(hi, u[1])

    def phase_levels(self, batch: int, step: int, generator: torch.Generator) -> torch.Tensor:
        """t in (s_{k+1}, s_k] at uniform Karras positions inside phase k, in float64 (t^2 - s^2 stays
        positive however close t comes to s)."""
        a, b = self.phase_positions(step)
        u = a + (b - a) * torch.rand(batch, generator=generator, dtype=torch.float64)
        return karras_at(u, self.sigma_min, self.sigma_max, self.opts.rho)

    def subinterval(self, x0: torch.Tensor, step: int, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """(x_s, x_t, t, s) for images x0 of expert k: x_s = x0 + s n with x0's gradient, s = s_{k+1}, and
        x_t = x_s + sqrt(t^2 - s^2) n' (detached), t drawn in the phase (float64, on the CPU)."""
        s = float(self.sigmas[step + 1])
        t = self.phase_levels(x0.shape[0], step, generator)
        x_s = x0 + s * torch.randn(x0.shape, generator=generator).to(x0.device)
        spread = per_sample((t**2 - s**2).sqrt().float().to(x0.device), x0)
        return x_s, x_s.detach() + spread * torch.randn(x0.shape, generator=generator).to(x0.device), t, s

    # ------------------------------------------------------------------ losses
    def critic_loss(self, x0: torch.Tensor, cond: Cond, step: int, generator: torch.Generator) -> torch.Tensor:
        """Score matching within the subinterval: lambda' || F_fake(x_t, t) - x_s ||^2 (module docstring)."""
        x_s, x_t, t, s = self.subinterval(x0, step, generator)
        denoised = self.nets["fake_score"](x_t, t.float().to(x0.device), cond)
        mean = subinterval_mean(x_t.float(), denoised.float(), t, s)
        weight = critic_weight((t**2 - s**2).sqrt(), (self.sigma_data**2 + s**2) ** 0.5)
        return (per_sample(weight.float().to(x0.device), mean) * (mean - x_s.float()).square()).mean()

    def generator_loss(self, x0: torch.Tensor, cond: Cond, step: int, generator: torch.Generator) -> torch.Tensor:
        """DMD2's loss at x_s = x0 + s n, the scores compared at x_t inside the phase."""
        x_s, x_t, t, _ = self.subinterval(x0, step, generator)
        return self.dmd_loss(x_s, x_t, t.float().to(x0.device), cond)

    # ------------------------------------------------------------------ progress and the student file
    def state_dict(self) -> dict:
        return {"phase": self.phase, "phase_iterations": self.phase_iterations}

    def load_state_dict(self, state: dict) -> None:
        self.phase, self.phase_iterations = int(state.get("phase", 0)), int(state.get("phase_iterations", 0))

    def card(self) -> dict:
        card = super().card()
        card["schedule"] = {"name": "phases_then_zero", "partition": self.opts.partition,
                            "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}
        return card
