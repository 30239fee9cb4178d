"""Latent consistency distillation: LCM (Luo et al. 2023, "Latent Consistency Models") and LCM-LoRA (Luo et al.
2023, "LCM-LoRA: A Universal Stable-Diffusion Acceleration Module"), after the consistency distillation of
Song et al. 2023 ("Consistency Models", Alg. 2), in the engine's VE convention x = x0 + s n.

**Skeleton.** LCM's skipping-step DDIM skeleton of N intervals (``skeleton``, LCM: 50) is here the Karras
grid, ascending as in the papers: s_0 = sigma_min < s_1 < ... < s_N = sigma_max, point n at the position
u = n / N in s^(1/rho). One consistency step skips one skeleton interval.

**Boundary condition.** The student is f_theta(x, s, w) = c_skip(s) x + c_out(s) D_theta(x, s, w), D_theta the
teacher's network made trainable (w an input of it: ``students.ScalarEmbedding``), with LCM's

    c_skip(s) = s_d^2 / ((10 tau)^2 + s_d^2),   c_out(s) = 10 tau / sqrt((10 tau)^2 + s_d^2),   s_d = 0.5,

where LCM's tau is the discrete DDPM timestep (0 .. 999). Its DDIM skeleton puts point n at timestep
1000 n / N (LCM: 20 n - 1 for N = 50), at the position n / N of the timesteps from the least noisy to the
noisiest; the Karras skeleton puts s_n at the position u = n / N from sigma_min to sigma_max. So

    tau(s) = 1000 u(s),   u(s) = (s^(1/rho) - sigma_min^(1/rho)) / (sigma_max^(1/rho) - sigma_min^(1/rho)),

tau(s_n) = 1000 n / N: f(x, s_0) = x exactly (c_skip = 1, c_out = 0), and at every other skeleton point
c_skip <= c_skip(s_1) = 0.25 / ((10^4 / N)^2 + 0.25) (6.2e-6 for N = 50; below 1e-5 for N <= 63) while
c_out = sqrt(1 - c_skip). Hence sampling evaluates D directly: at the chosen points (s_1 and above)
|f - D| <= c_skip (|x| + |D|), below 1e-5 of the sample's scale.

**An iteration** (micro-batch of B images):

    x0 ~ the teacher's data (``TeacherSource.draw_data``), or, data-free, the teacher's own images
         (``teacher_pairs.TeacherPairs``: at most iters x batch of them, the most a run draws)
    n ~ U{0 .. N-1},   w ~ U[w_lo, w_hi] (``w_range``),   eps ~ N(0, I)
    x_{n+1} = x0 + s_{n+1} eps
    x^_n = x_{n+1} + (s_n - s_{n+1}) (x_{n+1} - D_w(x_{n+1}, s_{n+1})) / s_{n+1}     (the teacher's one CFG
         DDIM step, Euler in VE; D_w = D(., c_u) + w (D(., c) - D(., c_u)), one w per sample)
    L = d(f_theta(x_{n+1}, s_{n+1}, w), f_theta-(x^_n, s_n, w)),   d the pseudo-Huber
         sum_j sqrt(delta_j^2 + c^2) - c (``huber_c``; LCM: 1e-3 on latents; images here lie in [-1, 1])
    theta- <- mu theta- + (1 - mu) theta   after the optimizer step (``target_ema``, LCM: mu = 0.95)

The target network theta- is the EMA of the trained parameters (a full student's weights, a LoRA
student's adapters and embedding), evaluated on the student's module with those parameters swapped in.

**Sampling** (Song et al. 2023, Alg. 1; LCM's multistep sampler; the ``renoise`` sampler, ComfyUI's stock
``lcm``): K skeleton points evenly spaced in index from the top, s_{N - floor(k N / K)} for k = 0 .. K-1
(LCM's timesteps 999, 759, 499, 259 for K = 4 of N = 50), then 0; denoise at each, renoise at the next.
One student serves every K from 1 to ``steps``.

**LCM-LoRA** (``lcm-lora``): adapters on the frozen teacher, which is the same network with the adapters
off (one copy of the weights); w fixed at the run's guidance and not an input of the network (or 1 with
guidance mode ``cfg``, CFG applied when sampling); no EMA: the target is the student itself at the
stop-gradient, f_sg(theta)(x^_n, s_n). Its file is what ComfyUI's stock LoraLoader loads and KSampler's
``lcm`` sampler samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.func import functional_call

from distill_core.denoisers.base import Cond, expand_sigma, per_sample
from distill_core.methods.base import Method, MicroBatch, OptimSpec, StepLoss, TeacherSource
from distill_core.methods.registry import register
from distill_core.methods.sfd import SFD, distance
from distill_core.methods.teacher_pairs import PairsConfig, TeacherPairs, training_images
from distill_core.options import option
from distill_core.sampling import renoise
from distill_core.schedules import karras
from distill_core.students import AtSteps
from distill_core.teacher import CFGTeacher, guide

#: LCM's boundary scalings: sigma_data, and the factor on the timestep tau
SIGMA_DATA, TIMESTEP_SCALING = 0.5, 10.0


@dataclass
class ConsistencyConfig(PairsConfig):
    """The settings of LCM-LoRA (and of LCM, which adds its own); the teacher's pairs serve where the teacher
    comes without a data set."""

    skeleton: int = option(50, "N: intervals of the skipping-step skeleton (LCM's 50-step DDIM grid), the Karras "
                           "grid from sigma_min to sigma_max; one consistency step skips one interval", min=1,
                           max=1000)
    rho: float = option(7.0, "the skeleton's polynomial rho (Karras grid)", min=0.1)
    huber_c: float = option(1e-3, "the pseudo-Huber c of the consistency distance (LCM: 1e-3; images in [-1, 1])",
                            min=0)


@dataclass
class LCMConfig(ConsistencyConfig):
    """LCM's own settings."""

    w_range: tuple[float, float] = option(
        (1.0, 4.0), "guidance scales (lo, hi) drawn uniformly per image and fed to the student (LCM: 3..5 to 15 on "
        "Stable Diffusion); the run's guidance w must lie inside", min=0)
    target_ema: float = option(0.95, "EMA decay mu of the target network theta- (LCM: 0.95)", min=0, max=0.999999)

    def __post_init__(self):
        self.w_range = tuple(float(w) for w in self.w_range)
        lo, hi = self.w_range
        if lo > hi:
            raise ValueError(f"w_range must be (lo, hi) with lo <= hi, got {self.w_range}")


def karras_position(sigma: torch.Tensor, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """u(s) = (s^(1/rho) - sigma_min^(1/rho)) / (sigma_max^(1/rho) - sigma_min^(1/rho)), in float64: 0 at
    sigma_min, 1 at sigma_max, n / N at point n of the Karras grid of N intervals."""
    lo, hi = float(sigma_min) ** (1 / rho), float(sigma_max) ** (1 / rho)
    return ((sigma.double() ** (1 / rho) - lo) / (hi - lo)).clamp(0, 1)


def boundary_scalings(sigma: torch.Tensor, sigma_min: float, sigma_max: float, rho: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's (c_skip(s), c_out(s)) at tau(s) = 1000 u(s) (the module docstring), in sigma's dtype."""
    t = TIMESTEP_SCALING * 1000 * karras_position(sigma, sigma_min, sigma_max, rho)
    c_skip = SIGMA_DATA**2 / (t**2 + SIGMA_DATA**2)
    c_out = t / (t**2 + SIGMA_DATA**2).sqrt()
    return c_skip.to(sigma.dtype), c_out.to(sigma.dtype)


def sampling_sigmas(skeleton: torch.Tensor, steps: int) -> torch.Tensor:
    """The K = ``steps`` points of the ascending ``skeleton`` s_0 .. s_N evenly spaced in index from the top,
    s_{N - floor(k N / K)} for k = 0 .. K-1, then 0."""
    n = len(skeleton) - 1
    if not 1 <= steps <= n:
        raise ValueError(f"a skeleton of {n} intervals samples in 1 to {n} steps, not {steps}")
    return torch.cat([skeleton[[n - k * n // steps for k in range(steps)]], skeleton.new_zeros(1)])


def guided(teacher: CFGTeacher, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, w: torch.Tensor) -> torch.Tensor:
    """D_w = D(x, s, c_u) + w (D(x, s, c) - D(x, s, c_u)) with one w per sample (``teacher``'s network and
    unconditional condition; its own w unused), both passes in one batch."""
    x0_c, x0_u = teacher.both_sides(x, expand_sigma(sigma, x), cond)
    return guide(x0_c, x0_u, per_sample(w.to(x0_c.dtype), x0_c))


@register("lcm")
class LCM(Method):
    """LCM: a consistency student of the guided teacher, w an input of the network, an EMA target."""

    Config = LCMConfig
    sampler = "renoise"
    summary = ("LCM: a consistency student, 1 to N steps at any guidance scale of its range (Luo et al. 2023); "
               "built-in and diffusers teachers")
    node = SFD.node  # "Distill to N steps" offers it by its method widget
    w_conditioned = True

    def __init__(self, source: TeacherSource, cfg):
        self.refuse(source, cfg)
        super().__init__(source, cfg)
        opts = self.opts
        self.w_range = opts.w_range if self.w_conditioned else None
        if self.w_range is not None and not self.w_range[0] <= self.w <= self.w_range[1]:
            raise ValueError(f"the run's guidance w={self.w:g} lies outside w_range {list(self.w_range)}: the "
                             "student samples at it by default")
        self.skeleton = karras(opts.skeleton, self.sigma_min, self.sigma_max, opts.rho).flip(0)  # s_0 .. s_N
        self.sigmas = {k: sampling_sigmas(self.skeleton, k) for k in range(1, cfg.steps + 1)}
        self.add_student(w_conditioned=self.w_conditioned)
        self.pairs = None if source.draw_data is not None else TeacherPairs(
            self.teacher, source, opts, self.sigma_min, self.sigma_max, cfg.seed,
            cfg.teacher_cache, cfg.mixed_precision, draws=cfg.iters * cfg.batch)
        self.target_params = self.initial_target()

    def refuse(self, source: TeacherSource, cfg) -> None:
        """A clear error for runs LCM cannot serve."""
        if source.stock_sampling:
            raise ValueError("LCM students of ComfyUI models take the guidance scale w as an input, which stock "
                             "samplers cannot feed; choose method lcm-lora (w fixed, sampled by the stock lcm "
                             "sampler)")
        if cfg.guidance_mode != "distilled":
            raise ValueError("lcm feeds the guidance scale to the student (guidance_mode 'distilled'); for CFG when "
                             "sampling choose lcm-lora with guidance_mode 'cfg'")
        if self.w_conditioned and "embedded_guidance" in source.card:
            raise ValueError("lcm trains its student over CFG scales, and this teacher takes its guidance as an input "
                             "(Flux dev) and samples without CFG; choose method lcm-lora (the guidance input fixed at "
                             "the run's)")

    @property
    def student(self):
        return self.nets["student"]

    def module(self) -> torch.nn.Module:
        """The student's own module (unwrapped from DDP)."""
        return getattr(self.student, "module", self.student)

    # ------------------------------------------------------------------ the target network theta-
    def start_from(self, path: str) -> None:
        """The student from a file, and theta- from it: the target starts where the student does."""
        super().start_from(path)
        self.target_params = self.initial_target()

    def initial_target(self) -> dict[str, torch.Tensor] | None:
        """theta- = theta at the start: a float32 copy of every trained parameter."""
        return {k: p.detach().float().clone() for k, p in self.module().named_parameters() if p.requires_grad}

    def target(self, w: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]:
        """D_theta- at guidance ``w``: the student's module with the EMA parameters swapped in."""
        module = self.module()

        def denoise(x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
            return functional_call(module, self.target_params, (x, sigma, cond), {"w": w}, strict=False)

        return denoise

    @torch.no_grad()
    def update_target(self) -> None:
        """theta- <- mu theta- + (1 - mu) theta."""
        for name, p in self.module().named_parameters():
            if name in self.target_params:
                self.target_params[name].lerp_(p.detach().float(), 1 - self.opts.target_ema)

    def state_dict(self) -> dict:
        return {"target": self.target_params}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.get("target", {}).items():
            self.target_params[name].copy_(value)

    def to(self, device: torch.device) -> LCM:
        super().to(device)
        if self.target_params is not None:
            self.target_params = {k: v.to(device) for k, v in self.target_params.items()}
        return self

    # ------------------------------------------------------------------ one iteration
    def optim_groups(self) -> dict[str, OptimSpec]:
        """AdamW with weight decay 0.01 at a constant lr after a warmup, as LCM's training scripts."""
        return {"student": OptimSpec("adamw", weight_decay=0.01, schedule="constant", warmup=10)}

    def draw_w(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """w ~ U[w_lo, w_hi] per image."""
        lo, hi = self.w_range
        return lo + (hi - lo) * torch.rand(batch, generator=generator)

    def teacher_x0(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, w: torch.Tensor) -> torch.Tensor:
        """The guided teacher's D_w(x, s), at each image's own w."""
        self.teacher_evaluations += x.shape[0] * 2
        return guided(self.teacher, x, sigma, cond, w)

    def consistency(self, denoiser, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """f(x, s) = c_skip(s) x + c_out(s) D(x, s) (the boundary-condition parameterisation)."""
        c_skip, c_out = boundary_scalings(sigma, float(self.skeleton[0]), float(self.skeleton[-1]), self.opts.rho)
        return per_sample(c_skip, x) * x + per_sample(c_out, x) * denoiser(x, sigma, cond)

    def losses(self, plan: dict, micro: MicroBatch, generator: torch.Generator) -> Iterator[StepLoss]:
        device = next(self.student.parameters()).device
        b = micro.size
        x0, cond, spent = training_images(self.source, self.pairs, b, generator, device)
        self.teacher_evaluations += spent
        n = torch.randint(self.opts.skeleton, (b,), generator=generator)
        w = self.draw_w(b, generator).to(device)
        eps = torch.randn(x0.shape, generator=generator).to(device)
        s_n, s_next = self.skeleton[n].to(device), self.skeleton[n + 1].to(device)
        x_next = x0 + per_sample(s_next, x0) * eps
        with torch.no_grad():
            d = self.teacher_x0(x_next, s_next, cond, w)
            x_hat = x_next + per_sample((s_n - s_next) / s_next, x_next) * (x_next - d)
            target = self.consistency(self.target(w), x_hat, s_n, cond)
        out = self.consistency(AtSteps(self.student, None, w), x_next, s_next, cond)
        yield StepLoss("student", 0, distance(out, target, "huber", self.opts.huber_c))
        if micro.local == 0:  # resumed after the optimizer's step; once per iteration on every process
            self.update_target()

    # ------------------------------------------------------------------ previews and the student file
    def sampling_denoiser(self):
        """The student as its file samples it: at the run's w (an input of the network, or CFG when sampling)."""
        student = AtSteps(self.student, None, self.w)
        return CFGTeacher(student, self.w, self.source.uncond) if self.cfg.guidance_mode == "cfg" else student

    @torch.no_grad()
    def preview(self, noise: torch.Tensor, cond: Cond, steps: int | None = None) -> torch.Tensor:
        return renoise(self.sampling_denoiser(), noise, self.sigmas[steps or self.cfg.steps], cond)

    def card(self) -> dict:
        opts = self.opts
        card = self.student_card(
            self.sigmas, {"name": "lcm_skeleton", "skeleton": opts.skeleton, "rho": opts.rho},
            {"data": "teacher pairs" if self.pairs else "teacher data"}, comfyui_sampler="lcm",
        )
        if self.w_range is not None:
            card["guidance"]["w_range"] = list(self.w_range)
        return card

    @classmethod
    def bench_runs(cls, nfes: list[int], iters: int) -> list[tuple[str, dict]]:
        """One student for every NFE up to the largest (a consistency model serves them all)."""
        return [(cls.name, {"steps": max(nfes)})]

    @classmethod
    def steps_label(cls, config: dict) -> str | None:
        steps = super().steps_label(config)
        return None if steps is None else f"1-{steps}"


@register("lcm-lora")
class LCMLoRA(LCM):
    """LCM-LoRA: adapters on the frozen teacher, w fixed, the target the student itself at the stop-gradient."""

    Config = ConsistencyConfig
    summary = ("LCM-LoRA: a consistency LoRA for the stock LoraLoader and KSampler's lcm sampler, 1 to N steps "
               "(Luo et al. 2023)")
    w_conditioned = False

    def refuse(self, source: TeacherSource, cfg) -> None:
        if cfg.student != "lora":
            raise ValueError("lcm-lora trains LoRA adapters on the frozen teacher (student 'lora'); for a full "
                             "student choose lcm")

    def initial_target(self) -> None:
        return None

    def target(self, w: torch.Tensor):
        """f at theta itself (called without gradient: the stop-gradient)."""
        return AtSteps(self.student, None)

    def update_target(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def draw_w(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """The run's teacher scale for every image (no draw)."""
        return torch.full((batch,), self.teacher.w)

    def teacher_x0(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, w: torch.Tensor) -> torch.Tensor:
        self.teacher_evaluations += x.shape[0] * self.teacher.evaluations()
        return self.teacher(x, sigma, cond)

    @classmethod
    def bench_runs(cls, nfes: list[int], iters: int) -> list[tuple[str, dict]]:
        """One LoRA for every NFE up to the largest, at LCM-LoRA's lr 1e-4 (without an EMA target the run's
        2e-4 drifts) and the run's rank (16: LCM-LoRA's 64 exceeds the built-in network's widths)."""
        return [(cls.name, {"steps": max(nfes), "student": "lora", "lr": 1e-4})]
