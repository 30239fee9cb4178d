"""SFDDM: single-fold distillation (Hong et al., "SFDDM: Single-fold Distillation for Diffusion models",
ECML PKDD 2025; code ``ChiHong-Xtautau/SFDDM_Diffusion_Distillation``): a T-step teacher distilled into a
T'-step student in one fold, for any T'.

The teacher's T discrete steps are the Karras grid of T intervals, t_0 = sigma_max > t_1 > ... > t_T =
sigma_min (``teacher_steps``). The student's forward process lives on a subsequence of them,

    s_k = t_{i_k},   0 = i_0 < i_1 < ... < i_{T'} = T,   T' = ``steps``,

every c-th teacher step, i_k = k c with c = T / T' (i_k = floor(k T / T') where T' does not divide T), or
the steps ``indices`` names (the T' starts i_0 .. i_{T'-1}; i_{T'} = T). The student's hidden variable
x'_k stands for the teacher's x_{i_k}. Sampling is DDIM on the subsequence, which in the VE convention is
Euler with the noise prediction eps = (x - D(x, s)) / s:

    x'_{k+1} = x'_k + (s_{k+1} - s_k) eps_theta(x'_k, s_k),

and the output at s_{T'} = sigma_min is the image (sampler ``euler_afs``, card ``afs: false``).

Every iteration, per sample: a real image x0 with its class c from the teacher's data set
(``TeacherSource.draw_data``), a student step k ~ U{0 .. T'-1} and n ~ N(0, I),

    x = x0 + s_k n                                     (x_{i_k} of the teacher's forward process)
    x_{j+1} = x_j + (t_{j+1} - t_j) eps_T(x_j, t_j),   j = i_k .. i_{k+1} - 1,  x_{i_k} = x
                                                       (the teacher's c_k = i_{k+1} - i_k DDIM steps)
    eps* = sum_j (t_{j+1} - t_j) / (s_{k+1} - s_k) eps_T(x_j, t_j)

so that x + (s_{k+1} - s_k) eps* = x_{i_{k+1}}: the one student step with eps* lands exactly where the
teacher's c_k steps land (the single-fold match of x'_{k+1} to x_{i_{k+1}}); eps* is the step-weighted
mean of the teacher's noise predictions along its steps. The loss, as the paper's, is L1 on the noise
prediction plus the hidden-feature match at the same input,

    L = mean |eps_theta(x, s_k) - eps*| + lambda mean |h_theta(x, s_k) - h_T(x, s_k)|,

where h is the network's last feature map (the input of its output head, read by a forward hook) and
lambda = ``feature_weight``. The student is the teacher's network made trainable (full or LoRA; the
paper trains it from scratch), so both feature maps have the teacher's channels. The teacher is the
CFG-aware teacher at the run's w (guidance mode "distilled"; w = 1 with mode "cfg", CFG then applied when
sampling), and its feature map is guided like its output, h_T = h_u + w (h_c - h_u). With c = 1 (T = T')
at initialisation, and w = 1, the student is its teacher and both terms are zero.

The feature match is off by default (lambda = 0; the paper: 1). On the built-in teacher the feature term
is about twenty times the noise term at initialisation, and with guidance distilled its target need not
agree with eps*: the head (GroupNorm, SiLU, conv) is not linear, so the guided output is not the head's
output at h_u + w (h_c - h_u). There, at w = 2, a 4-step student on T = 32 with lambda = 1 stays at
Euler's quality whatever the budget (fd_teacher 0.27 at 100, 200 and 400 iterations; 4-step Euler:
0.30); with lambda = 0 it scores 0.053. T = 32 gives the paper's c = 8 at T' = 4 (its CIFAR-10 student:
1024 -> 128 steps).

Cost: each sample costs the teacher c_k evaluations (two with CFG) and the student one forward and
backward pass, so a T'-step student on a T-step teacher costs about 2 T / T' teacher evaluations per
sample; memory is the student and the teacher (one copy of the weights with LoRA).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distill_core.denoisers.base import Cond, index_cond, move_cond, per_sample
from distill_core.methods.base import Method, MicroBatch, OptimSpec, StepLoss, TeacherSource
from distill_core.methods.registry import register
from distill_core.methods.sfd import SFD
from distill_core.options import option
from distill_core.sampling import few_step
from distill_core.schedules import karras
from distill_core.teacher import CFGTeacher, guide

#: names of the module whose input is a network's last feature map: its output head (the built-in UNet's
#: and ComfyUI / LDM's ``out``, diffusers' ``conv_norm_out``)
HEAD_NAMES = ("out", "conv_norm_out")


@dataclass
class SFDDMConfig:
    """SFDDM's own settings (``steps`` is the student's T')."""

    teacher_steps: int = option(32, "T: the teacher's DDIM steps on the Karras grid from sigma_max to sigma_min; "
                                "the student's steps are a subsequence of them", min=1, max=100_000)
    indices: str = option("", "the teacher steps the student's steps start at, comma-separated: increasing, from 0, "
                          "below T, one per student step (empty: every c-th, c = T / T')")
    feature_weight: float = option(0.0, "lambda: weight of the L1 match of the last feature maps (0: off; the "
                                   "paper: 1)", min=0)
    rho: float = option(7.0, "the teacher grid's polynomial rho (Karras grid)", min=0.1)


def student_indices(steps: int, teacher_steps: int, indices: str = "") -> list[int]:
    """i_0 .. i_{T'}: the teacher steps of the student's points, for T' = ``steps`` on T = ``teacher_steps``;
    ``indices``: the starts i_0 .. i_{T'-1} (comma-separated), else every c-th step, i_k = floor(k T / T')."""
    if steps > teacher_steps:
        raise ValueError(f"the student's steps are a subsequence of the teacher's: steps {steps} must not exceed "
                         f"teacher_steps {teacher_steps}")
    if not indices.strip():
        return [k * teacher_steps // steps for k in range(steps)] + [teacher_steps]
    try:
        starts = [int(i) for i in indices.split(",")]
    except ValueError:
        raise ValueError(f"indices must be comma-separated integers, got {indices!r}") from None
    if len(starts) != steps:
        raise ValueError(f"indices name the teacher step each student step starts at: {steps} of them for steps "
                         f"{steps}, got {len(starts)} ({indices!r})")
    if starts[0] != 0:
        raise ValueError(f"the student's first step starts at the top of the teacher's grid: indices must start "
                         f"at 0, got {starts[0]}")
    if any(b <= a for a, b in zip(starts, starts[1:])):
        raise ValueError(f"indices must increase, got {indices!r}")
    if starts[-1] >= teacher_steps:
        raise ValueError(f"indices must lie below teacher_steps {teacher_steps} (the last student step ends at "
                         f"its step {teacher_steps}, sigma_min), got {starts[-1]}")
    return starts + [teacher_steps]


@torch.no_grad()
def single_fold_target(teacher, x: torch.Tensor, cond: Cond, grid: torch.Tensor, start: torch.Tensor,
                       stop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's DDIM (Euler) steps from ``x`` at grid[start] down to grid[stop], per sample, and eps*:

        x_{j+1} = x_j + (t_{j+1} - t_j) eps_T(x_j, t_j),   eps* = sum_j (t_{j+1} - t_j) / (t_stop - t_start) eps_T

    so that x + (t_stop - t_start) eps* = x_stop. Returns (eps*, x_stop). Every sample takes its first step
    in one batched call (the caller may read the teacher's features there)."""
    span = grid[stop] - grid[start]
    target, landing = torch.zeros_like(x), x.clone()
    for j in range(int((stop - start).max())):
        active = torch.nonzero(start + j < stop).squeeze(1)
        t, t_next = grid[start[active] + j], grid[start[active] + j + 1]
        x_j = landing[active]
        eps = (x_j - teacher(x_j, t, index_cond(cond, active))) / per_sample(t, x_j)
        landing[active] = x_j + per_sample(t_next - t, x_j) * eps
        target[active] += per_sample((t_next - t) / span[active], eps) * eps
    return target, landing


def head_of(denoiser: nn.Module) -> nn.Module:
    """The output head of ``denoiser``'s network (the first module named one of ``HEAD_NAMES``), whose input is
    the last feature map."""
    for name, module in denoiser.named_modules():
        if name.split(".")[-1] in HEAD_NAMES:
            return module
    raise ValueError(f"the feature match reads the network's last feature map, the input of a module named one of "
                     f"{HEAD_NAMES}; a {type(denoiser).__name__} has none (set feature_weight 0)")


@contextlib.contextmanager
def first_input(module: nn.Module | None) -> Iterator[list[torch.Tensor]]:
    """Inside the block, the yielded list receives the input of ``module``'s first call (None: nothing)."""
    caught: list[torch.Tensor] = []
    if module is None:
        yield caught
        return

    def catch(mod: nn.Module, args: tuple) -> None:
        if not caught:
            caught.append(args[0])

    handle = module.register_forward_pre_hook(catch)
    try:
        yield caught
    finally:
        handle.remove()


@register("sfddm")
class SFDDM(Method):
    """SFDDM: a T'-step student on a subsequence of a T-step teacher's steps, one fold."""

    Config = SFDDMConfig
    sampler = "euler_afs"
    summary = ("SFDDM: a student on every c-th of the teacher's T steps, one student step per c teacher steps, on "
               "real images (Hong et al. 2025)")
    node = SFD.node  # the "Distill to N steps" node offers it by its method widget

    def __init__(self, source: TeacherSource, cfg):
        if source.draw_data is None:
            raise ValueError(f"sfddm trains on real images noised to the student's steps, and the teacher "
                             f"{source.name!r} comes without a data set: give it a data set of the model's images, "
                             "or choose method sfd (data-free)")
        super().__init__(source, cfg)
        opts = self.opts
        self.indices = student_indices(cfg.steps, opts.teacher_steps, opts.indices)
        self.grid = karras(opts.teacher_steps, self.sigma_min, self.sigma_max, opts.rho)
        self.sigmas = self.grid[self.indices]
        student = self.add_student()
        features = opts.feature_weight > 0
        self.heads = (head_of(student.denoiser), head_of(source.denoiser)) if features else (None, None)

    @classmethod
    def bench_runs(cls, nfes: list[int], iters: int) -> list[tuple[str, dict]]:
        """One student per NFE, and the folds c = 4 and c = 2 of the teacher's T steps (T' = T / 4, T / 2: 8
        and 16 on the default T = 32), the step counts a single-fold student is made for."""
        T = cls.Config().teacher_steps
        return super().bench_runs(sorted({*nfes, T // 4, T // 2}), iters)

    @property
    def student(self):
        return self.nets["student"]

    def optim_groups(self) -> dict[str, OptimSpec]:
        """Adam (the paper's, at the run's lr; the paper: 2e-4), cosine after a short warmup for short runs."""
        return {"student": OptimSpec("adam", schedule="cosine", warmup=10)}

    def inputs(self, batch: int, generator: torch.Generator, device: torch.device
               ) -> tuple[torch.Tensor, Cond, torch.Tensor]:
        """Real images noised to drawn student steps, x = x0 + s_k n, their conditions, and k."""
        x0, cond = self.source.draw_data(batch, generator)
        k = torch.randint(self.cfg.steps, (batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        x = x0 + per_sample(self.sigmas[k], x0) * noise
        return x.to(device), move_cond(cond, device), k.to(device)

    def losses(self, plan: dict, micro: MicroBatch, generator: torch.Generator) -> Iterator[StepLoss]:
        device = next(self.student.parameters()).device
        x, cond, k = self.inputs(micro.size, generator, device)
        grid, indices = self.grid.to(device), torch.tensor(self.indices, device=device)
        start, stop = indices[k], indices[k + 1]
        s = grid[start]
        student_head, teacher_head = self.heads
        with first_input(teacher_head) as caught:
            target, _ = single_fold_target(self.teacher, x, cond, grid, start, stop)
        self.teacher_evaluations += int((stop - start).sum()) * self.teacher.evaluations()
        with first_input(student_head) as mine:
            eps = (x - self.student(x, s, cond)) / per_sample(s, x)
        loss = F.l1_loss(eps.float(), target.float())
        if student_head is not None:
            loss = loss + self.opts.feature_weight * F.l1_loss(mine[0].float(), self.teacher_features(caught[0], s))
        yield StepLoss("student", 0, loss)

    def teacher_features(self, h: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """h_T of the teacher's first call (at ``sigma``): guided as its output, h_u + w (h_c - h_u), where it ran a
        CFG pair (``CFGTeacher`` batches the conditional half first)."""
        if not self.teacher.guided(sigma):
            return h.float()
        h_c, h_u = h.float().chunk(2)
        return guide(h_c, h_u, self.teacher.w)

    @torch.no_grad()
    def preview(self, noise: torch.Tensor, cond: Cond) -> torch.Tensor:
        student = self.student
        if self.cfg.guidance_mode == "cfg":
            student = CFGTeacher(student, self.w, self.source.uncond)
        return few_step(student, noise, self.sigmas, cond, afs=False)

    def card(self) -> dict:
        opts = self.opts
        per_step = [b - a for a, b in zip(self.indices, self.indices[1:])]  # c_k
        return self.student_card(
            {self.cfg.steps: self.sigmas},
            {"name": "teacher_subsequence", "rho": opts.rho, "teacher_steps": opts.teacher_steps,
             "indices": self.indices, "c": per_step[0] if len(set(per_step)) == 1 else None},
            afs=False,
        )
