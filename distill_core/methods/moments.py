"""Moment matching (Salimans, Mensink, Heek and Hoogeboom 2024, "Multistep Distillation of Diffusion Models
via Moment Matching"), on the shared loop of ``methods.distribution``.

The generator's images x~ = g_eta(z_t, t) are right in distribution when, at every noise level s, the
generator's first moment E[x~ | z_s] equals the teacher's x^_theta(z_s) on its own noised images
z_s = x~ + s n. Two ways to push it there:

* **alternating**: an auxiliary denoiser g_phi (teacher initialisation) is fit to the generator's images
  (``distribution.DistributionMatching.critic_loss``: it estimates E[x~ | z_s]), and the generator takes
  the gradient of

      L(eta) = E[ w(s) x~^T sg( g_phi(z_s) - x^_theta(z_s) ) ],

  which moves each image toward the teacher's moment and away from the generator's own. The weight is
  ``weighting``: ``normalised`` (the default), DMD's per-sample w = 1 / mean_j |x~ - x^_theta(z_s)|_j, about
  1/s at low noise; or ``edm``, lambda(s) = 1/s^2 + 1/sigma_data^2, the teacher's own loss weight, under
  which the lowest noise levels, where g_phi - x^_theta is mostly the auxiliary's fitting error, dominate
  the gradient. The auxiliary takes ``critic_updates`` updates per generator update (default 5, DMD2's
  two time-scale rule; the paper alternates 1:1 at batch 2048). With both, at one step, the loss is
  DMD2's without its GAN and regression terms;
* **instant**: no auxiliary network. The moment mismatch is read from the teacher's own loss on the
  generator's images, L_theta(x~) = E[ w(s) || x^_theta(z_s) - x~ ||^2 ], whose parameter gradient is
  zero in expectation when the moments match. The generator minimises its preconditioned squared norm,
  estimated without bias from two independent half-batches A and B:

      L(eta) = grad_theta L_theta(x~_A)^T  Lambda  grad_theta L_theta(x~_B),
      Lambda = diag(1 / (sqrt(v) + eps)),  v: an EMA of the squared teacher gradients (an Adam-style
                                               second moment, kept in the run's state),

  back-propagated through the teacher's gradients to eta (second order, one teacher copy of gradients).

The noise level s of a generator trained at step k lies within that step's interval: at a uniform Karras
position u in [k/K, (k + 1)/K] (clipped to ``u_range``), as the paper draws s within 1/k below t. The
student's inputs come from its own earlier steps (backward simulation, data-free) where the paper noises
data; it samples with the shared ``renoise`` sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from distill_core.denoisers.base import Cond, index_cond, per_sample
from distill_core.methods.distribution import (
    DistributionConfig,
    DistributionMatching,
    critic_weight,
    karras_at,
)
from distill_core.methods.dmd2 import DISTRIBUTION_NODE, dmd_scale
from distill_core.methods.registry import register
from distill_core.options import option
from distill_core.students import AdaptersOff, disabled
from distill_core.teacher import CFGTeacher

VERSIONS = ("alternating", "instant")
WEIGHTINGS = ("normalised", "edm")


@dataclass
class MomentsConfig(DistributionConfig):
    """Moment matching's own settings."""

    critic_updates: int = option(5, "alternating: auxiliary-denoiser updates per generator update (the paper "
                                 "alternates 1:1 at batch 2048; at small batches one update lets the generator "
                                 "collapse)", min=1, max=100)
    version: str = option("alternating", "alternating: an auxiliary denoiser fit to the generator's images; "
                          "instant: no auxiliary network, the teacher's loss gradients on two half-batches",
                          choices=VERSIONS)
    weighting: str = option("normalised", "alternating: the generator loss's weight w(s): normalised, DMD's "
                            "per-sample 1 / mean|x~ - x^_theta(z_s)|; edm, lambda(s) = 1/s^2 + 1/sigma_data^2",
                            choices=WEIGHTINGS)
    precondition_decay: float = option(0.99, "instant: EMA decay of the squared teacher gradients (Lambda)",
                                       min=0, max=0.9999)


class TeacherAt:
    """The teacher's network evaluated at ``params``, fresh leaf copies of its weights in float32, so that
    gradients with respect to them can be taken (and differentiated again) without touching the frozen
    weights; with every adapter of a shared base off."""

    def __init__(self, network, teacher_denoiser):
        self.network = network
        self.adapters = teacher_denoiser.adapters if isinstance(teacher_denoiser, AdaptersOff) else []
        self.params = {k: p.detach().float().requires_grad_(True) for k, p in network.named_parameters()}
        self.sigma_min, self.sigma_max = network.sigma_min, network.sigma_max

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        # attention through the composite kernel: the fused ones have no second derivative
        with disabled(self.adapters), sdpa_kernel(SDPBackend.MATH):
            return functional_call(self.network, self.params, (x, sigma, cond))


@register("moments")
class Moments(DistributionMatching):
    """Moment matching, alternating (generator + auxiliary denoiser) or instant (generator alone)."""

    Config = MomentsConfig
    summary = "moment matching: 1- to 8-step generators whose conditional means match the teacher's " \
              "(Salimans et al. 2024)"
    node = DISTRIBUTION_NODE

    def __init__(self, source, cfg):
        self.critic = "auxiliary" if cfg.options.version == "alternating" else None
        if self.critic is None and cfg.batch % (2 * max(cfg.grad_accum, 1)):
            raise ValueError(f"instant moment matching splits every micro-batch in two halves: batch {cfg.batch} "
                             f"must be a multiple of 2 x grad_accum ({2 * max(cfg.grad_accum, 1)})")
        super().__init__(source, cfg)
        self.second_moment: list[torch.Tensor] | None = None  # v of the instant version
        self.preconditioned = 0  # updates of v

    def step_levels(self, batch: int, step: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """s at a uniform Karras position in [k/K, (k + 1)/K], clipped to ``u_range``."""
        lo, hi = self.opts.u_range
        K = self.cfg.steps
        a, b = max(lo, step / K), min(hi, (step + 1) / K)
        u = a + (b - a) * torch.rand(batch, generator=generator, dtype=torch.float64)
        return karras_at(u, self.sigma_min, self.sigma_max, self.opts.rho).float().to(device)

    def generator_loss(self, x0: torch.Tensor, cond: Cond, step: int, generator: torch.Generator) -> torch.Tensor:
        if self.critic is None:
            return self.instant_loss(x0, cond, step, generator)
        sigma = self.step_levels(x0.shape[0], step, generator, x0.device)
        z_s = x0.detach() + per_sample(sigma, x0) * torch.randn(x0.shape, generator=generator).to(x0.device)
        with torch.no_grad():
            teacher = self.teacher(z_s, sigma, cond).float()
            mismatch = self.nets["auxiliary"](z_s, sigma, cond).float() - teacher
        self.teacher_evaluations += x0.shape[0] * self.teacher.evaluations()
        if self.opts.weighting == "edm":
            weight = critic_weight(sigma, self.sigma_data)
        else:
            weight = 1 / dmd_scale(x0.detach().float(), teacher)
        return (per_sample(weight, x0) * x0.float() * mismatch).flatten(1).mean(1).mean()

    def instant_loss(self, x0: torch.Tensor, cond: Cond, step: int, generator: torch.Generator) -> torch.Tensor:
        """g_A^T Lambda g_B from the halves A, B of the micro-batch, g_h = grad_theta L_theta(x~_h)."""
        at = TeacherAt(self.source.denoiser, self.teacher.denoiser)
        params = at.params
        teacher = CFGTeacher(at, self.w, self.source.uncond)
        grads = []
        n = x0.shape[0] // 2
        for idx in (torch.arange(n), torch.arange(n, 2 * n)):
            half, c = x0[idx.to(x0.device)], index_cond(cond, idx.to(x0.device))
            sigma = self.step_levels(half.shape[0], step, generator, half.device)
            z_s = half + per_sample(sigma, half) * torch.randn(half.shape, generator=generator).to(half.device)
            weight = per_sample(critic_weight(sigma, self.sigma_data), half)
            loss = (weight * (teacher(z_s, sigma, c).float() - half.float()).square()).mean()
            grads.append(torch.autograd.grad(loss, list(params.values()), create_graph=True))
        self.teacher_evaluations += x0.shape[0] * self.teacher.evaluations()
        self._update_second_moment(grads)
        return sum(((a * b) / (v.sqrt() + 1e-8)).sum() for a, b, v in zip(*grads, self._v_hat()))

    def _update_second_moment(self, grads: list[tuple[torch.Tensor, ...]]) -> None:
        decay = self.opts.precondition_decay
        squares = [((a.detach() ** 2 + b.detach() ** 2) / 2) for a, b in zip(*grads)]
        if self.second_moment is None:
            self.second_moment = [torch.zeros(s.shape, device=s.device) for s in squares]  # contiguous, as resumed
        elif self.second_moment[0].device != squares[0].device:  # resumed from a checkpoint, read onto the CPU
            self.second_moment = [v.to(s.device) for v, s in zip(self.second_moment, squares)]
        for v, s in zip(self.second_moment, squares):
            v.mul_(decay).add_(s, alpha=1 - decay)
        self.preconditioned += 1

    def _v_hat(self) -> list[torch.Tensor]:
        """v bias-corrected as Adam's second moment: v / (1 - decay^n)."""
        correction = 1 - self.opts.precondition_decay ** self.preconditioned
        return [v / correction for v in self.second_moment]

    def state_dict(self) -> dict:
        return {} if self.second_moment is None else {"second_moment": self.second_moment,
                                                      "preconditioned": self.preconditioned}

    def load_state_dict(self, state: dict) -> None:
        moment = state.get("second_moment")
        self.second_moment = None if moment is None else [v.clone() for v in moment]
        self.preconditioned = int(state.get("preconditioned", 0))

