"""Progressive distillation (Salimans & Ho, ICLR 2022, "Progressive Distillation for Fast Sampling of Diffusion
Models"), in the engine's VE convention x = x0 + s n: rounds of distillation, each teaching a student to take
in one step what its teacher takes in two, halving the step count from round to round.

**Grids.** With S = ``steps`` and N_0 = ``start_steps`` = S 2^R, the finest grid is the Karras grid of 2 N_0
intervals from sigma_max to sigma_min (``rho``). Round r = 0 .. R distils a teacher on every 2^r-th point of
it (2 N_0 / 2^r intervals) into a student on every 2^(r+1)-th point (N_0 / 2^r intervals): student point s_i
is teacher point 2i, and round r's student grid is round r + 1's teacher grid (the grids nest exactly). The
student steps run N_0 -> N_0 / 2 -> ... -> S; the last round's grid is the student file's schedule.

**Teachers.** DDIM in the VE convention is Euler,

    x_{i+1} = x_i + (s_{i+1} - s_i) (x_i - D(x_i, s_i)) / s_i.

Round 0's teacher is the CFG-aware teacher at the run's w (guidance is distilled into the student: one
evaluation per step); round r > 0's teacher is the student as it finished round r - 1, frozen, at w = 1 (the
guidance is already in it). The student starts as the teacher (``students.make_student``: LoRA or full) and
keeps training across the rounds.

**Target** (Salimans & Ho, Alg. 2 with alpha = 1). From x_t at a student point s = s_i, the teacher takes two
steps, to s' (teacher point 2i + 1) and s'' = s_{i+1}:

    x' = x_t + (s' - s) (x_t - D_T(x_t, s)) / s,    x'' = x' + (s'' - s') (x' - D_T(x', s')) / s'.

The student's one step from s to s'' lands on x'' when its x0 prediction x~ solves
x'' = x_t + (s'' - s) (x_t - x~) / s, that is

    x~ = (s'' x_t - s x'') / (s'' - s).

The grid ends at sigma_min, not 0: the student's output at sigma_min is the image (as in SFD), and on the last
interval (s'' = sigma_min) the same x~ makes the step land on the teacher's image x''; as sigma_min -> 0 it
tends to x~ = x'', the paper's last-step target.

**Loss** (truncated SNR weighting, Salimans & Ho sec. 4; SNR = alpha^2 / sigma^2 = 1 / s^2 in VE):

    L = E_{x0, i, n} [ max(1 / s_i^2, 1) || D_theta(x_t, s_i, c) - x~ ||^2 ],   x_t = x0 + s_i n,

with i uniform over the round's N_0 / 2^r student intervals (one per sample) and the squared distance the
mean over the elements. x0 and its condition c come from the teacher's data set (``TeacherSource.draw_data``)
or, data-free, from the teacher's own images (``teacher_pairs.TeacherPairs``, at most iters x batch of them,
the most a run draws): ``inputs``.

**Rounds and iterations.** ``iters`` is split evenly over the R + 1 rounds: iteration k (from 0) belongs to
round floor(k (R + 1) / iters), so every round gets floor or ceil of iters / (R + 1) consecutive iterations.
The round never goes back (a resumed run given more iterations stays in its round until the split catches
up). The round, the iteration and the frozen teacher of the current round are the method's checkpoint state.
``teacher_evaluations`` counts the network evaluations of every round's teacher (the frozen students' too) and
of the data-free pool.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.func import functional_call

from distill_core.denoisers.base import Cond, per_sample
from distill_core.methods.base import Method, MicroBatch, OptimSpec, StepLoss, TeacherSource
from distill_core.methods.registry import register
from distill_core.methods.sfd import SFD
from distill_core.methods.teacher_pairs import PairsConfig, TeacherPairs, training_images
from distill_core.options import option
from distill_core.sampling import few_step
from distill_core.schedules import karras

INPUTS = ("auto", "data", "pairs")
#: the first round's student steps when ``start_steps`` is left at None: the largest steps x 2^k up to this
START_STEPS = 32

Denoise = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]


@dataclass
class ProgressiveConfig(PairsConfig):
    """Progressive distillation's own settings (the teacher's pairs serve where the teacher has no data set)."""

    start_steps: int | None = option(None, "N_0: the first round's student steps, steps x a power of two; each "
                                     "round halves it down to steps (None: the largest such multiple up to 32)",
                                     min=1, max=4096)
    rho: float = option(7.0, "the polynomial rho of the grids (Karras)", min=0.1)
    inputs: str = option("auto", "x0 of the noised inputs: the teacher's data set (data), its own images (pairs, "
                         "data-free), or data where the teacher has a data set (auto)", choices=INPUTS)


def start_steps(steps: int, configured: int | None) -> int:
    """N_0: ``configured`` when it is ``steps`` times a power of two (a ValueError otherwise), else the largest
    steps x 2^k not above max(``START_STEPS``, steps)."""
    if configured is None:
        n = steps
        while 2 * n <= START_STEPS:
            n *= 2
        return n
    ratio, rest = divmod(configured, steps)
    if rest or ratio & (ratio - 1):
        raise ValueError(f"start_steps {configured} must be steps {steps} times a power of two (e.g. {steps * 8})")
    return configured


def round_of(iteration: int, iters: int, rounds: int) -> int:
    """The round of iteration ``iteration`` (from 0) of a run of ``iters`` split evenly over ``rounds``."""
    return min(iteration * rounds // iters, rounds - 1)


def ddim(denoiser: Denoise, x: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor, cond: Cond) -> torch.Tensor:
    """x + (s_next - s) (x - D(x, s)) / s: one DDIM (Euler) step, one noise level per sample."""
    return x + per_sample(s_next - s, x) * (x - denoiser(x, s, cond)) / per_sample(s, x)


def two_step_target(x_t: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor, x_next: torch.Tensor) -> torch.Tensor:
    """x~ = (s'' x_t - s x'') / (s'' - s): the x0 prediction whose one step from x_t at s lands on x'' at s''."""
    s, s_next = per_sample(s.double(), x_t), per_sample(s_next.double(), x_t)
    return ((s_next * x_t.double() - s * x_next.double()) / (s_next - s)).to(x_t.dtype)


def truncated_snr_loss(denoised: torch.Tensor, target: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """E[ max(1 / s^2, 1) || D - x~ ||^2 ], the squared distance the mean over elements."""
    weight = per_sample(s.float().pow(-2).clamp_min(1.0), denoised)
    return (weight * (denoised.float() - target.float()).square()).mean()


@register("progressive")
class Progressive(Method):
    """Progressive distillation: rounds halving the student's steps, each step two of its teacher's."""

    Config = ProgressiveConfig
    sampler = "euler_afs"
    summary = ("progressive distillation: rounds that halve the steps, one student step for two teacher steps "
               "(Salimans & Ho 2022)")
    node = SFD.node

    def __init__(self, source: TeacherSource, cfg):
        if cfg.guidance_mode != "distilled":
            raise ValueError("progressive distils guidance into the student (guidance_mode 'distilled'): its later "
                             "rounds' teachers are students at w = 1")
        opts = cfg.options
        self.start_steps = start_steps(cfg.steps, opts.start_steps)
        self.rounds = (self.start_steps // cfg.steps).bit_length()
        if cfg.iters < self.rounds:
            raise ValueError(f"{self.rounds} rounds ({self.start_steps} steps down to {cfg.steps}) need at least "
                             f"{self.rounds} iterations, got iters {cfg.iters}")
        super().__init__(source, cfg)
        self.finest = karras(2 * self.start_steps, self.sigma_min, self.sigma_max, opts.rho)
        self.sigmas = self.student_grid(self.rounds - 1)
        self.add_student()
        self.inputs = self.resolve_inputs(source, opts.inputs)
        self.pairs = None if self.inputs == "data" else TeacherPairs(
            self.teacher, source, opts, self.sigma_min, self.sigma_max, cfg.seed,
            cfg.teacher_cache, cfg.mixed_precision, draws=cfg.iters * cfg.batch)
        self.iteration, self.round = 0, 0
        self.frozen: dict[str, torch.Tensor] | None = None  # the round's teacher's parameters (round > 0)

    @staticmethod
    def resolve_inputs(source: TeacherSource, inputs: str) -> str:
        """"data" or "pairs": ``inputs`` as configured, auto choosing data where the teacher has a data set."""
        if inputs == "auto":
            return "pairs" if source.draw_data is None else "data"
        if inputs == "data" and source.draw_data is None:
            raise ValueError(f"inputs 'data' needs the teacher's data set, and the teacher {source.name!r} comes "
                             "without one: set inputs to pairs (or auto)")
        return inputs

    @property
    def student(self):
        return self.nets["student"]

    def module(self) -> torch.nn.Module:
        """The student's own module (unwrapped from DDP)."""
        return getattr(self.student, "module", self.student)

    # ------------------------------------------------------------------ grids and rounds
    def teacher_grid(self, r: int) -> torch.Tensor:
        """Round r's teacher grid: every 2^r-th point of the finest grid."""
        return self.finest[:: 2**r]

    def student_grid(self, r: int) -> torch.Tensor:
        """Round r's student grid: every 2^(r+1)-th point of the finest grid (round r + 1's teacher grid)."""
        return self.finest[:: 2 ** (r + 1)]

    def round_teacher(self) -> tuple[Denoise, int]:
        """The current round's teacher and its network evaluations per sample: the guided teacher in round 0,
        then the student's module with the parameters it had at the end of the previous round."""
        if self.frozen is None:
            return self.teacher, self.teacher.evaluations()
        module = self.module()

        def frozen(x: torch.Tensor, s: torch.Tensor, cond: Cond) -> torch.Tensor:
            return functional_call(module, self.frozen, (x, s, cond), strict=False)

        return frozen, 1

    def plan(self, generator: torch.Generator) -> dict:
        """The iteration's round; at a round's first iteration the student so far becomes its teacher."""
        r = round_of(self.iteration, self.cfg.iters, self.rounds)
        if r > self.round:
            self.frozen = {k: p.detach().clone() for k, p in self.module().named_parameters() if p.requires_grad}
            self.round = r
        self.iteration += 1
        return {"round": self.round}

    def state_dict(self) -> dict:
        """The iteration, the round, and the round's frozen teacher (its trained parameters) from round 1 on."""
        state = {"iteration": self.iteration, "round": self.round}
        return state if self.frozen is None else {**state, "teacher": self.frozen}

    def load_state_dict(self, state: dict) -> None:
        self.iteration, self.round = state.get("iteration", 0), state.get("round", 0)
        frozen = state.get("teacher")
        if frozen is None:
            self.frozen = None
            return
        # in the student's own memory layout (a checkpoint stores tensors contiguous; a channels-last
        # convolution sums in another order)
        params = dict(self.module().named_parameters())
        self.frozen = {k: torch.empty_like(params[k]).copy_(v) for k, v in frozen.items()}

    def to(self, device: torch.device) -> Progressive:
        super().to(device)
        if self.frozen is not None:
            self.frozen = {k: v.to(device) for k, v in self.frozen.items()}
        return self

    # ------------------------------------------------------------------ one iteration
    def optim_groups(self) -> dict[str, OptimSpec]:
        """Adam, one optimizer across every round, the lr on a cosine over the whole run after a warmup of 10
        iterations (as SFD)."""
        return {"student": OptimSpec("adam", schedule="cosine", warmup=10)}

    def losses(self, plan: dict, micro: MicroBatch, generator: torch.Generator) -> Iterator[StepLoss]:
        r, device = plan["round"], next(self.student.parameters()).device
        grid = self.teacher_grid(r).to(device)
        x0, cond, spent = training_images(self.source, self.pairs, micro.size, generator, device)
        self.teacher_evaluations += spent
        i = torch.randint((len(grid) - 1) // 2, (micro.size,), generator=generator).to(device)
        s, s_mid, s_next = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
        x_t = x0 + per_sample(s, x0) * torch.randn(x0.shape, generator=generator).to(device)
        teacher, evaluations = self.round_teacher()
        with torch.no_grad():
            x_next = ddim(teacher, ddim(teacher, x_t, s, s_mid, cond), s_mid, s_next, cond)
        self.teacher_evaluations += 2 * micro.size * evaluations
        target = two_step_target(x_t, s, s_next, x_next)
        yield StepLoss("student", r, truncated_snr_loss(self.student(x_t, s, cond), target, s))

    # ------------------------------------------------------------------ previews and the student file
    @torch.no_grad()
    def preview(self, noise: torch.Tensor, cond: Cond) -> torch.Tensor:
        return few_step(self.student, noise, self.sigmas, cond, afs=False)

    def card(self) -> dict:
        return self.student_card(
            {self.cfg.steps: self.sigmas}, {"name": "karras", "rho": self.opts.rho},
            {"inputs": self.inputs, "start_steps": self.start_steps},
            afs=False,
            comfyui_sampler="euler",
            start_steps=self.start_steps,
            rounds=[self.start_steps // 2**r for r in range(self.rounds)],
        )
