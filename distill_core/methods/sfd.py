"""SFD: Simple and Fast Distillation (Zhou et al., NeurIPS 2024), and its step-conditioned SFD-v.

Student schedule t_0 > ... > t_n: the polynomial rho grid from sigma_max to sigma_min (n intervals,
n - 1 evaluations with the analytic first step, AFS). Every iteration, data-free:

    x_0 = sigma_max z,  z ~ N(0, I);  conditions drawn from the teacher source (each batch, with its
        teacher states, serves ``teacher_reuse`` iterations: ``pooled``)
    teacher (no grad): a multistep solver from x_0 over the nested grid with K steps per student
        interval (one step on intervals starting above ``teacher_one_step_above``); its states y_i at
        the student's points t_i (the grids nest exactly)
    student, for i = 0 .. n-1, from its own previous output, detached (no backprop through time):
        x_{i+1} = x_i + (t_{i+1} - t_i) (x_i - D_theta(x_i, t_i)) / t_i     (Euler; AFS at i = 0:
        D replaced by the centre mu, SFD's 0 or the teacher's class mean, ``distill_core.afs``)
        L_i = d(x_{i+1}, y_{i+1});  backward;  one optimizer step  (none for the analytic step)

d is summed over the elements j of delta = x_{i+1} - y_{i+1} and averaged over the batch: L1 (SFD's),
L2, or the pseudo-Huber sum_j sqrt(delta_j^2 + c^2) - c (the default, c = 0.01). The teacher is the
CFG-aware teacher: at w with guidance mode "distilled", at w = 1 with mode "cfg" (CFG is then applied to
the student when sampling).

The paper's teacher is DPM-Solver++(3M) with K = 4 on every interval, and its lr is divided by 10 at
half time (``teacher_solver: dpmpp_3m``, ``teacher_substeps: 4``, ``teacher_one_step_above: null``,
``lr_schedule: step``). Our defaults spend the same time better on the CPU (docs/sfd_recipes.md): UniPC
at K = 3 (targets 43 dB or better on the built-in teacher, against 44 for the paper's), a single teacher
step on intervals that start above sigma 20 (57 and 50 dB there), every teacher batch trained on
twice (``teacher_reuse: 2``; the paper: ``1``), the saving spent on more iterations, and a cosine lr
schedule after a linear warmup over the first 10 iterations (at most a tenth of the run;
``lr_warmup``; the paper: ``0``): the first gradients are the run's largest (norms of several hundred
against tens at the end), and Adam's first updates, normalised by a second moment estimated from a
handful of them, are full lr steps.

SFD-v: the student also sees the step count (``students.StepEmbedding``); every iteration draws
NFE uniformly from the trained range and uses that NFE's schedule.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from distill_core.afs import CLASS_MEAN_SAMPLES, class_means, guided_centers, resolve_center
from distill_core.builtin import fingerprint
from distill_core.config import DistillConfig
from distill_core.denoisers.base import Cond, cat_all, index_cond, move_cond
from distill_core.methods.base import StepLoss, TeacherSource
from distill_core.sampling import euler_step, few_step, intervals_for
from distill_core.schedules import karras, nest, nested_index, substeps_per_interval
from distill_core.solvers import SOLVERS
from distill_core.students import AFS_MEANS_KEY, AtSteps, make_student, student_card
from distill_core.teacher import CFGTeacher


def distance(x: torch.Tensor, y: torch.Tensor, kind: str, huber_c: float = DistillConfig.huber_c) -> torch.Tensor:
    """Per-element distance summed over each sample, averaged over the batch."""
    delta = (x - y).float().flatten(1)
    if kind == "l1":
        per = delta.abs()
    elif kind == "l2":
        per = delta.square()
    elif kind == "huber":
        per = (delta.square() + huber_c**2).sqrt() - huber_c
    else:
        raise ValueError(f"unknown loss {kind!r}: choose l1, l2 or huber")
    return per.sum(1).mean()


def teacher_states(
    teacher, x: torch.Tensor, sigmas: torch.Tensor, cond: Cond, substeps: int | Sequence[int],
    solver: str = "dpmpp_3m",
) -> list[torch.Tensor]:
    """The teacher's solution from ``x`` at sigmas[0] at every student point sigmas[1:], solved with
    ``substeps`` steps of ``solver`` per student interval (an int, or one K per interval) on the nested
    grid (one multistep run)."""
    per_interval = substeps_per_interval(substeps, len(sigmas) - 1)
    grid = nest(sigmas, per_interval)
    points = {nested_index(per_interval, i): i for i in range(1, len(sigmas) - 1)}
    states: dict[int, torch.Tensor] = {}

    def keep(info: dict) -> None:
        i = int(info["i"])
        if i in points:
            states[points[i]] = info["x"]

    final = SOLVERS[solver](teacher, x, grid.to(x.device), cond, callback=keep)
    states[len(sigmas) - 1] = final
    return [states[i] for i in range(1, len(sigmas))]


def teacher_steps(sigmas: torch.Tensor, substeps: int, one_step_above: float | None) -> list[int]:
    """The teacher's steps on every student interval: ``substeps`` (K), or 1 on the intervals that start
    above ``one_step_above``."""
    return [1 if one_step_above is not None and float(s) > one_step_above else substeps for s in sigmas[:-1]]


def pool_serves(cfg: DistillConfig, batch: int) -> tuple[int, int]:
    """A teacher pool's size (``teacher_pool``, or one batch when 0) and the iterations it serves before a
    fresh one replaces it: ``teacher_reuse`` x size / batch, at least one."""
    size = cfg.teacher_pool or batch
    return size, max(1, round(cfg.teacher_reuse * size / batch))


class SFD:
    """SFD (``method="sfd"``: one student per NFE) and SFD-v (``"sfd-v"``: one student for an NFE range)."""

    lr_schedule = "cosine"  # the trainer's defaults for this method (the paper: "step", no warmup)
    lr_warmup = 10

    def __init__(self, source: TeacherSource, cfg: DistillConfig):
        self.source, self.cfg = source, cfg
        self.name = cfg.method
        self.step_conditioned = cfg.method == "sfd-v"
        if cfg.teacher_reuse < 1 or 0 < cfg.teacher_pool < cfg.batch:
            raise ValueError(
                f"teacher_reuse must be at least 1 (got {cfg.teacher_reuse}) and teacher_pool 0 or at least "
                f"the batch {cfg.batch} (got {cfg.teacher_pool})"
            )
        w = source.guidance if cfg.guidance is None else cfg.guidance
        self.w = float(w)
        self.teacher_fingerprint = fingerprint(source.denoiser)
        with torch.random.fork_rng(devices=[]):  # new layers (SFD-v, LoRA) are initialised from the config's seed
            torch.manual_seed(cfg.seed)
            student, teacher_denoiser = make_student(
                source.denoiser, self.step_conditioned, cfg.student, cfg.lora_rank, cfg.lora_alpha
            )
        self.student = student.train()
        self.teacher = CFGTeacher(
            teacher_denoiser, self.w if cfg.guidance_mode == "distilled" else 1.0, source.uncond
        )
        self.sigma_min = cfg.sigma_min
        self.sigma_max = cfg.sigma_max or source.denoiser.sigma_max
        self.nfes = (
            list(range(cfg.nfe_range[0], cfg.nfe_range[1] + 1)) if self.step_conditioned else [cfg.steps]
        )
        self.sigmas = {
            n: karras(intervals_for(n, cfg.afs), self.sigma_min, self.sigma_max, cfg.rho) for n in self.nfes
        }
        self.teacher_steps = {n: teacher_steps(s, cfg.teacher_substeps, cfg.teacher_one_step_above)
                              for n, s in self.sigmas.items()}
        self.afs_center = resolve_center(cfg.afs_center, source.classes) if cfg.afs else "zero"
        self.afs_means = None
        self.teacher_evaluations = 0
        if self.afs_center == "class_mean":  # computed once: (classes + 1) x CLASS_MEAN_SAMPLES evaluations
            self.afs_means = class_means(
                teacher_denoiser, source.classes, source.uncond, source.shape, self.sigma_max, seed=cfg.seed,
                device=next(source.denoiser.parameters()).device,
            )
            self.teacher_evaluations = (source.classes + 1) * CLASS_MEAN_SAMPLES
        self._pools: dict[int, tuple[torch.Tensor, Cond, list[torch.Tensor]]] = {}
        self._pool_state: dict[int, tuple[int, int]] = {}  # per NFE: iterations its pool served, its seed

    def to(self, device: torch.device) -> SFD:
        self.source.denoiser.to(device)
        return self

    def plan(self, generator: torch.Generator) -> dict:
        return {"nfe": self.nfes[int(torch.randint(len(self.nfes), (1,), generator=generator))]}

    def trajectories(self, nfe: int, batch: int, generator: torch.Generator,
                     device: torch.device) -> tuple[torch.Tensor, Cond, list[torch.Tensor]]:
        """Fresh starts x_N = sigma_max z, conditions, and the teacher's states at the student's points."""
        t = self.sigmas[nfe].to(device)
        x = (torch.randn((batch, *self.source.shape), generator=generator) * self.sigma_max).to(device)
        cond = move_cond(self.source.draw_cond(batch, generator), device)
        with torch.no_grad():
            targets = teacher_states(self.teacher, x, t, cond, self.teacher_steps[nfe], self.cfg.teacher_solver)
        self.teacher_evaluations += sum(self.teacher_steps[nfe]) * batch * (2 if self.teacher.w != 1 else 1)
        return x, cond, targets

    def pooled(self, nfe: int, batch: int, generator: torch.Generator,
               device: torch.device) -> tuple[torch.Tensor, Cond, list[torch.Tensor]]:
        """A batch from the current pool of this NFE: ``teacher_pool`` trajectories (one batch when 0)
        solved at once, drawn without replacement by every iteration, and replaced by a fresh pool after
        serving ``teacher_reuse`` x pool / batch iterations, so each trajectory trains the student about
        ``teacher_reuse`` times. A pool is solved from its own seed, drawn from ``generator`` and kept
        in ``state_dict``, so a resumed run solves the pool it stopped in again."""
        size, serves = pool_serves(self.cfg, batch)
        uses, seed = self._pool_state.get(nfe, (0, None))
        if uses % serves == 0:
            seed = int(torch.randint(2**62, (1,), generator=generator))
            self._pools.pop(nfe, None)
        if nfe not in self._pools:
            pool_gen = torch.Generator().manual_seed(seed)
            chunks = [self.trajectories(nfe, min(self.cfg.batch, size - start), pool_gen, device)
                      for start in range(0, size, self.cfg.batch)]
            self._pools[nfe] = (
                torch.cat([c[0] for c in chunks]),
                cat_all([c[1] for c in chunks]),
                [torch.cat(states) for states in zip(*(c[2] for c in chunks))],
            )
        self._pool_state[nfe] = (uses + 1, seed)
        x, cond, targets = self._pools[nfe]
        idx = torch.randperm(size, generator=generator)[:batch].to(device)
        return x[idx], index_cond(cond, idx), [y[idx] for y in targets]

    def state_dict(self) -> dict:
        """What a resumed run needs besides the student: per NFE, the uses of its pool and the pool's seed."""
        return {str(nfe): list(state) for nfe, state in self._pool_state.items()}

    def load_state_dict(self, state: dict) -> None:
        self._pool_state = {int(nfe): tuple(v) for nfe, v in state.items()}
        self._pools.clear()

    def losses(self, plan: dict, batch: int, generator: torch.Generator) -> Iterator[StepLoss]:
        nfe, device = plan["nfe"], next(self.student.parameters()).device
        t = self.sigmas[nfe].to(device)
        # fresh trajectories (reuse 1, no pool) are a pool that serves one iteration; drawn directly, they
        # keep SFD's random stream, so runs of the paper's recipe reproduce the rows measured before pools
        draw = self.pooled if self.cfg.teacher_pool or self.cfg.teacher_reuse > 1 else self.trajectories
        x, cond, targets = draw(nfe, batch, generator, device)
        student = AtSteps(self.student, nfe)
        for i in range(len(t) - 1):
            if self.cfg.afs and i == 0:
                center = guided_centers(self.afs_means, cond, self.teacher.w)  # at the teacher's scale
                x = euler_step(None, x, t[0], t[1], analytic=True, center=center)
                continue
            out = euler_step(student, x, t[i], t[i + 1], cond)
            yield StepLoss(i, distance(out, targets[i], self.cfg.loss, self.cfg.huber_c))
            x = out.detach()

    @torch.no_grad()
    def preview(self, noise: torch.Tensor, cond: Cond, nfe: int | None = None) -> torch.Tensor:
        nfe = self.nfes[-1] if nfe is None else nfe
        student = AtSteps(self.student, nfe)
        if self.cfg.guidance_mode == "cfg":
            student = CFGTeacher(student, self.w, self.source.uncond)
        center = guided_centers(self.afs_means, cond, self.w)
        return few_step(student, noise, self.sigmas[nfe], cond, self.cfg.afs, center=center)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.afs_means is None else {AFS_MEANS_KEY: self.afs_means}

    def card(self) -> dict:
        cfg = self.cfg
        return student_card(
            self.name,
            self.nfes,
            self.sigmas,
            {"name": "karras", "rho": cfg.rho, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max},
            cfg.afs,
            cfg.guidance_mode,
            self.w,
            self.teacher_fingerprint,
            self.afs_center,
            teacher=self.source.name,
            training={
                "teacher_solver": cfg.teacher_solver,
                "teacher_substeps": cfg.teacher_substeps,
                "teacher_one_step_above": cfg.teacher_one_step_above,
                "teacher_pool": cfg.teacher_pool,
                "teacher_reuse": cfg.teacher_reuse,
                "loss": cfg.loss,
                "lr": cfg.lr,
                "iters": cfg.iters,
                "batch": cfg.batch,
            },
        )
