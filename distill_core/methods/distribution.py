"""Distribution matching: what DMD2 (``dmd2``) and moment matching (``moments``) share. A student of
this family draws *a* good image from its noise, not the teacher's image from the same noise: it is
trained to match the teacher's distribution of images, not its trajectories.

The generator G_theta (the teacher's network, made trainable) samples in K steps on the schedule

    s_0 = sigma_max > s_1 > ... > s_{K-1} > s_K = 0     (the first K points of the Karras rho grid
                                                         from sigma_max to sigma_min, then 0)
    x_0 = s_0 z;   x0_k = G(x_k, s_k);   x_{k+1} = x0_k + s_{k+1} n_k,   n_k ~ N(0, I) afresh

(``sampling.renoise``, ComfyUI's stock ``lcm`` sampler); its image is x0_{K-1}. Every iteration trains
one step k, drawn uniformly and shared by the iteration's micro-batches, on the inputs G meets when it
samples: x_k comes from G's own k earlier steps without gradient ("backward simulation", DMD2 sec. 4.5;
without it multistep students collapse).

A critic network (DMD2's fake score, moment matching's auxiliary denoiser; teacher initialisation)
follows the generator's current distribution by denoising score matching on detached generator images,

    L_critic = E[ lambda(sigma) || F(x0 + sigma n, sigma, c) - x0 ||^2 ],
    lambda(sigma) = 1 / sigma^2 + 1 / sigma_data^2      (the EDM weight),

with ``critic_updates`` critic updates per generator update (DMD2's two time-scale rule), each on
fresh generator images. Noise levels are drawn as DMD2 draws timesteps, at a uniform position
u ~ U[u_lo, u_hi] on the Karras grid from sigma_min to sigma_max (DMD2: 2 % to 98 %).

A method of the family gives ``generator_loss(x0, cond, step, generator)``: the loss whose gradient
moves the generator's images x0 (with gradient) toward the teacher's distribution.

Networks: ``student: full`` trains a full copy of the teacher for each network (three copies of the
weights in memory, as the official DMD2); ``student: lora`` trains one LoRA per network on the one frozen
base, which is also the teacher with every adapter off ("shared base": one copy of the weights).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from distill_core.denoisers.base import Cond, move_cond, per_sample
from distill_core.methods.base import Method, MicroBatch, OptimSpec, StepLoss, TeacherSource
from distill_core.options import option
from distill_core.sampling import renoise
from distill_core.schedules import karras
from distill_core.students import make_networks
from distill_core.teacher import CFGTeacher


@dataclass
class DistributionConfig:
    """The settings every distribution-matching method shares."""

    rho: float = option(7.0, "the generator schedule's polynomial rho (Karras grid)", min=0.1)
    critic_updates: int = option(5, "critic (fake score / auxiliary denoiser) updates per generator update",
                                 min=1, max=100)
    critic_lr: float | None = option(None, "the critic's learning rate (None: the run's lr)", min=1e-9, max=1)
    u_range: tuple[float, float] = option((0.02, 0.98), "noise levels of the matching losses: positions (lo, hi) "
                                          "on the Karras grid from sigma_max (0) to sigma_min (1)", min=0, max=1)

    def __post_init__(self):
        self.u_range = tuple(float(u) for u in self.u_range)
        lo, hi = self.u_range
        if not lo < hi:
            raise ValueError(f"u_range must be (lo, hi) with lo < hi, got {self.u_range}")


def generator_schedule(steps: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """s_0 .. s_{K-1}: the first K points of the Karras grid of K intervals, then s_K = 0."""
    return torch.cat([karras(steps, sigma_min, sigma_max, rho)[:-1], torch.zeros(1)])


def karras_at(u: torch.Tensor, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """sigma(u) = (s_max^(1/rho) + u (s_min^(1/rho) - s_max^(1/rho)))^rho, u in [0, 1] (0: sigma_max)."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + u * (lo - hi)) ** rho


def critic_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = 1 / sigma^2 + 1 / sigma_data^2."""
    return sigma.pow(-2) + sigma_data ** -2


class DistributionMatching(Method):
    """The shared training loop: per iteration, ``critic_updates`` critic updates, then one generator update
    of step k. Subclasses set ``critic`` (the critic group's name, or None for a method without one) and
    give ``generator_loss``."""

    sampler = "renoise"
    exported = "generator"
    critic: ClassVar[str | None] = "fake_score"

    def __init__(self, source: TeacherSource, cfg):
        if cfg.guidance_mode != "distilled":
            raise ValueError(f"{self.name} distils guidance into the generator (guidance_mode 'distilled'): its "
                             "real score is the guided teacher")
        super().__init__(source, cfg)
        self.sigma_data = float(getattr(source.denoiser, "sigma_data", 0.5))
        self.sigmas = self.schedule()
        nets, teacher_denoiser = self.seeded(lambda: self.networks(source.denoiser))
        self.nets = {name: net.train() for name, net in nets.items()}
        self.teacher = CFGTeacher(teacher_denoiser, self.w, source.uncond)

    def schedule(self) -> torch.Tensor:
        """s_0 .. s_K, the generator's schedule (``generator_schedule``)."""
        return generator_schedule(self.cfg.steps, self.sigma_min, self.sigma_max, self.opts.rho)

    def networks(self, denoiser: nn.Module) -> tuple[dict[str, nn.Module], nn.Module]:
        """The trained networks by group, each starting as the teacher ``denoiser``, and the teacher's denoiser
        next to them (``students.make_networks``)."""
        names = ("generator",) if self.critic is None else ("generator", self.critic)
        cfg = self.cfg
        return make_networks(denoiser, names, cfg.student, cfg.lora_rank, cfg.lora_alpha)

    @classmethod
    def bench_runs(cls, nfes: list[int], iters: int) -> list[tuple[str, dict]]:
        """One generator per NFE at batch 16 and lr 1e-4, for twice a trajectory student's iterations: an update
        of this family is ``critic_updates`` + 1 passes through the trained networks."""
        return [(f"{cls.name}-{n}", {"steps": n, "batch": 16, "lr": 1e-4, "iters": 2 * iters}) for n in nfes]

    @property
    def generator(self):
        return self.nets["generator"]

    def optim_groups(self) -> dict[str, OptimSpec]:
        """AdamW with weight decay 0.01 at a constant lr for every network, as DMD2."""
        groups = {"generator": OptimSpec("adamw", weight_decay=0.01, schedule="constant")}
        if self.critic is not None:
            groups[self.critic] = OptimSpec("adamw", lr=self.opts.critic_lr, weight_decay=0.01, schedule="constant")
        return groups

    def plan(self, generator: torch.Generator) -> dict:
        return {"step": int(torch.randint(self.cfg.steps, (1,), generator=generator))}

    # ------------------------------------------------------------------ sampling the generator
    def starts(self, batch: int, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, Cond]:
        """x_0 = sigma_max z and conditions drawn from the teacher source."""
        x = torch.randn((batch, *self.source.shape), generator=generator) * self.sigmas[0]
        return x.to(device), move_cond(self.source.draw_cond(batch, generator), device)

    def simulate(self, x: torch.Tensor, cond: Cond, step: int, generator: torch.Generator) -> torch.Tensor:
        """x_step: the generator's own first ``step`` steps from x_0, without gradient (backward simulation)."""
        sigmas = self.sigmas.to(x.device)
        with torch.no_grad():
            for k in range(step):
                noise = torch.randn(x.shape, generator=generator).to(x.device)
                x = self.generator(x, sigmas[k], cond) + sigmas[k + 1] * noise
        return x

    def images(self, batch: int, step: int, generator: torch.Generator, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor, Cond]:
        """The generator's input x_step at step ``step`` (backward-simulated) and its conditions, and
        sigma_step."""
        x, cond = self.starts(batch, generator, device)
        return self.simulate(x, cond, step, generator), self.sigmas[step].to(device), cond

    def draw_noise_levels(self, batch: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """sigma(u), u ~ U[u_lo, u_hi]."""
        lo, hi = self.opts.u_range
        u = lo + (hi - lo) * torch.rand(batch, generator=generator, dtype=torch.float64)
        return karras_at(u, self.sigma_min, self.sigma_max, self.opts.rho).float().to(device)

    # ------------------------------------------------------------------ losses
    def critic_loss(self, x0: torch.Tensor, cond: Cond, step: int, generator: torch.Generator) -> torch.Tensor:
        """Denoising score matching of the critic on the detached generator images ``x0`` (of any step)."""
        sigma = self.draw_noise_levels(x0.shape[0], generator, x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        denoised = self.nets[self.critic](x0 + per_sample(sigma, x0) * noise, sigma, cond)
        weight = critic_weight(sigma, self.sigma_data)
        return (per_sample(weight, x0) * (denoised.float() - x0.float()).square()).mean()

    def generator_loss(self, x0: torch.Tensor, cond: Cond, step: int, generator: torch.Generator) -> torch.Tensor:
        """The loss of the generator's images ``x0`` (with gradient) of step ``step``."""
        raise NotImplementedError

    def losses(self, plan: dict, micro: MicroBatch, generator: torch.Generator) -> Iterator[StepLoss]:
        step, device = plan["step"], next(self.generator.parameters()).device
        if self.critic is not None:
            for update in range(self.opts.critic_updates):
                x, sigma, cond = self.images(micro.size, step, generator, device)
                with torch.no_grad():
                    x0 = self.generator(x, sigma, cond)
                yield StepLoss(self.critic, update, self.critic_loss(x0, cond, step, generator))
        x, sigma, cond = self.images(micro.size, step, generator, device)
        x0 = self.generator(x, sigma, cond)
        yield StepLoss("generator", step, self.generator_loss(x0, cond, step, generator))

    # ------------------------------------------------------------------ previews and the student file
    @torch.no_grad()
    def preview(self, noise: torch.Tensor, cond: Cond) -> torch.Tensor:
        return renoise(self.generator, noise, self.sigmas, cond)

    def card(self) -> dict:
        return self.student_card({self.cfg.steps: self.sigmas}, {"name": "karras_then_zero", "rho": self.opts.rho},
                                 comfyui_sampler="lcm")
