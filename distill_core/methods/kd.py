"""Knowledge distillation (Luhman & Luhman 2021, "Knowledge Distillation in Iterative Generative Models
for Improved Sampling Speed"): a one-step student that regresses the teacher's ODE solution from the
same noise,

    G_theta(z, c) = D_theta(sigma_max z, sigma_max, c),    L = E_{pair} [ d(G_theta(z, c), x0) ],

on the teacher's pairs (z, c, x0 = Phi(sigma_max z)) of ``methods.teacher_pairs`` (the pool reflow trains
on), with d summed over the elements and averaged over the batch (``sfd.distance``: the pseudo-Huber
distance by default; Luhman & Luhman use LPIPS, a network the engine does not ship). It is reflow's
regression cut to the segment's starting point (``reflow.PairRegression``), sampled as one Euler step
from sigma_max to 0, whose result is G_theta(z, c).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distill_core.methods.reflow import PairRegression
from distill_core.methods.registry import register
from distill_core.methods.sfd import LOSSES, SFD, distance
from distill_core.methods.teacher_pairs import PairsConfig
from distill_core.options import option


@dataclass
class KDConfig(PairsConfig):
    """Knowledge distillation's own settings."""

    loss: str = option("huber", "the distance d: l1, l2, or the pseudo-Huber sqrt(delta^2 + c^2) - c",
                       choices=LOSSES)
    huber_c: float = option(0.01, "the pseudo-Huber c (images in [-1, 1])", min=0)


@register("kd")
class KnowledgeDistillation(PairRegression):
    """Knowledge distillation: a one-step student on the teacher's pairs."""

    Config = KDConfig
    summary = "knowledge distillation: a 1-step student regressing the teacher's image from its noise (Luhman 2021)"
    node = SFD.node

    def __init__(self, source, cfg):
        if cfg.steps != 1:
            raise ValueError(f"knowledge distillation trains a one-step student, not {cfg.steps} steps: set steps 1 "
                             "(for more steps choose reflow or sfd)")
        super().__init__(source, cfg)

    def schedule(self) -> torch.Tensor:
        """sigma_max, then 0: one step."""
        return torch.tensor([float(self.sigma_max), 0.0])

    def schedule_info(self) -> dict:
        return {"name": "one_step"}

    def inputs(self, z: torch.Tensor, x0: torch.Tensor, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """x_N = sigma_max z at sigma_max."""
        return z * self.sigma_max, torch.full((z.shape[0],), float(self.sigma_max), device=z.device)

    def loss(self, denoised: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return distance(denoised, x0, self.opts.loss, self.opts.huber_c)

    @classmethod
    def bench_runs(cls, nfes: list[int], iters: int) -> list[tuple[str, dict]]:
        """The one-step student only."""
        return [(f"{cls.name}-1", {"steps": 1})]
