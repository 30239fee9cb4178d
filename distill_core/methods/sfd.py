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
half time (``teacher_solver: dpmpp_3m``, ``teacher_substeps: 4``, ``teacher_one_step_above: .inf``,
``lr_schedule: step``). The defaults spend the same time better on the CPU (docs/methods/sfd.md): UniPC
at K = 3, every teacher batch trained on twice (``teacher_reuse: 2``; the paper: ``1``), the saving spent
on more iterations, and a cosine lr schedule after a linear warmup over the first 10 iterations (at
most a tenth of the run; ``lr_warmup``; the paper: ``0``): the first gradients are the run's largest,
and Adam's first updates, normalised by a second moment estimated from a handful of them, are full lr
steps. A teacher may say that its ODE is straight enough at high noise for one teacher step on the
intervals that start above some sigma (``TeacherSource.tuned``: the built-in teacher, above sigma 20);
``teacher_one_step_above`` overrides it.

SFD-v: the student also sees the step count (``students.ScalarEmbedding``); every iteration draws
NFE uniformly from the trained range and uses that NFE's schedule.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from distill_core.afs import AFS_CENTERS, CLASS_MEAN_SAMPLES, class_means, guided_centers, resolve_center
from distill_core.denoisers.base import Cond, cat_all, index_cond, move_cond
from distill_core.methods.base import Method, MicroBatch, NodeLayout, OptimSpec, StepLoss, TeacherSource, Widget
from distill_core.methods.registry import register
from distill_core.options import option
from distill_core.sampling import euler_step, few_step, intervals_for
from distill_core.schedules import flow_time, karras, nest, nested_index, substeps_per_interval
from distill_core.solvers import SOLVERS
from distill_core.students import AFS_MEANS_KEY, AtSteps
from distill_core.teacher import CFGTeacher
from distill_core.teacher_cache import TeacherCache, source_fingerprint

LOSSES = ("l1", "l2", "huber")
GRIDS = ("auto", "karras", "flow")


@dataclass
class SFDConfig:
    """SFD's own settings."""

    nfe_range: tuple[int, int] = option((2, 5), "SFD-v: the step counts (lo, hi) one student serves", min=1,
                                        max=1000)
    schedule: str = option("auto", "the student's grid: karras (polynomial rho), flow (uniform in the flow time "
                           "t = sigma / (1 + sigma), as flow-matching models are sampled), or auto: flow for a "
                           "flow-matching teacher, else karras", choices=GRIDS)
    rho: float = option(7.0, "the student schedule's polynomial rho (Karras grid)", min=0.1)
    afs: bool = option(True, "analytic first step: the first step without a network evaluation")
    afs_center: str = option("auto", "the first step's centre: zero (SFD), the teacher's class means, or auto "
                             "(class means where conditions are class labels)", choices=AFS_CENTERS)
    teacher_solver: str = option("unipc", "the solver of the teacher's targets", choices=tuple(SOLVERS))
    teacher_substeps: int = option(3, "K: teacher steps per student interval", min=1, max=1000)
    teacher_one_step_above: float | None = option(
        None, "one teacher step on intervals starting above this sigma (None: the teacher's tuned value, else "
        "K everywhere; .inf: K everywhere)", min=0)
    teacher_reuse: float = option(2.0, "iterations each teacher trajectory trains the student (1: fresh "
                                  "trajectories every iteration, as in SFD)", min=1)
    teacher_pool: int = option(0, "teacher trajectories solved at once (0: one batch)", min=0)
    loss: str = option("huber", "the distance d: l1 (SFD), l2, or the pseudo-Huber sqrt(delta^2 + c^2) - c",
                       choices=LOSSES)
    huber_c: float = option(0.01, "the pseudo-Huber c (images in [-1, 1])", min=0)

    def __post_init__(self):
        self.nfe_range = tuple(int(n) for n in self.nfe_range)
        lo, hi = self.nfe_range
        if lo > hi:
            raise ValueError(f"nfe_range must be (lo, hi) with lo <= hi, got {self.nfe_range}")


def student_grid(grid: str, intervals: int, sigma_min: float, sigma_max: float, rho: float,
                 shift: float = 1.0) -> torch.Tensor:
    """The student's ``intervals`` + 1 sigmas: Karras's rho grid, or the flow time grid (``schedules.flow_time``)
    with the teacher's time ``shift``."""
    if grid == "flow":
        return flow_time(intervals, sigma_min, sigma_max, shift)
    return karras(intervals, sigma_min, sigma_max, rho)


def auto_grid(denoiser) -> str:
    """The student grid ``schedule: auto`` picks: the flow time grid for a flow-matching teacher, else Karras's."""
    return "flow" if getattr(denoiser, "prediction", None) == "flow" else "karras"


def distance(x: torch.Tensor, y: torch.Tensor, kind: str, huber_c: float = SFDConfig.huber_c) -> torch.Tensor:
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


def pool_serves(opts: SFDConfig, batch: int) -> tuple[int, int]:
    """A teacher pool's size (``teacher_pool``, or one iteration's batch when 0) and the iterations it
    serves before a fresh one replaces it: ``teacher_reuse`` x size / batch, at least one."""
    size = opts.teacher_pool or batch
    return size, max(1, round(opts.teacher_reuse * size / batch))


@register("sfd")
class SFD(Method):
    """SFD: one student for exactly ``steps`` network evaluations."""

    Config = SFDConfig
    sampler = "euler_afs"
    summary = "SFD: a student for exactly N steps, trained on the teacher's trajectories (Zhou et al. 2024)"
    step_conditioned = False
    node = NodeLayout(
        "DistillToSteps", "Distill to N steps",
        "Distils the teacher into a student that samples in N steps (by default SFD, Zhou et al. 2024; the method "
        "menu offers the other trajectory and consistency methods). Saves the student under loras/ (LoRA) or "
        "diffusion_models/ (full) with its sampling recipe in the file, and a resumable run under "
        "output/distill_runs/<save_name>.",
        widgets=(
            Widget("steps", help="network evaluations per image of the student (SFD-v: the top of its range)",
                   default=4, max=16),
            Widget("method", help="auto: the method, settings and training length that won at N steps in the "
                   "benchmark on the built-in teacher (its iterations and batch replace the widgets'; SFD for "
                   "ComfyUI models); sfd: one student for exactly N steps; sfd-v: one student for 2..N steps; "
                   "lcm-lora: a consistency LoRA for the stock lcm sampler (lcm: with a guidance input, engine "
                   "only); progressive: rounds that halve the steps; reflow: straightened ODE, Euler sampling; "
                   "kd: a 1-step student (steps 1); sfddm: one fold from the teacher's steps (needs a data set: "
                   "the built-in teacher)"),
            Widget("iterations", "iters", "training iterations (every batch of teacher trajectories serves two of "
                   "them)", 200, max=100000),
            Widget("learning_rate", "lr", "Adam learning rate (reached after a warmup of 10 iterations, or a tenth "
                   "of the run if shorter, then decays to 0 on a cosine)", 2e-4, min=1e-6, max=1e-2, step=1e-5),
            Widget("batch", help="trajectories per iteration", default=8, max=512),
            Widget("seed", help="seed of noise, prompt draws and new layers"),
            Widget("guidance_mode", help="distilled: w baked in, sample with cfg 1 (one evaluation per step); cfg: "
                   "distil at w = 1 and use CFG when sampling (two per step, w free); auto: distilled for the "
                   "built-in teacher, cfg for ComfyUI models (as SFD does for Stable Diffusion)",
                   default="auto", choices=("auto", "distilled", "cfg")),
            Widget("student", help="lora: small adapters on the frozen model (what artists share); full: every "
                   "weight trained (a copy of the model in memory)", default="lora", choices=("lora", "full")),
            Widget("lora_rank", help="LoRA rank r (adapter size)", max=256),
        ),
        save_name="distilled_4step",
        auto=True,
    )

    def __init__(self, source: TeacherSource, cfg):
        opts = cfg.options
        if 0 < opts.teacher_pool < cfg.batch:
            raise ValueError(f"teacher_pool must be 0 or at least the batch {cfg.batch} (got {opts.teacher_pool})")
        super().__init__(source, cfg)
        self.add_student(self.step_conditioned)
        self.nfes = list(range(opts.nfe_range[0], opts.nfe_range[1] + 1)) if self.step_conditioned else [cfg.steps]
        self.grid = opts.schedule if opts.schedule != "auto" else auto_grid(source.denoiser)
        self.shift = getattr(source.denoiser, "shift", 1.0)
        self.sigmas = {n: student_grid(self.grid, intervals_for(n, opts.afs), self.sigma_min, self.sigma_max, opts.rho,
                                       self.shift) for n in self.nfes}
        one_step_above = opts.teacher_one_step_above
        if one_step_above is None:
            one_step_above = source.tuned.get("teacher_one_step_above")
        self.one_step_above = one_step_above
        self.teacher_steps = {n: teacher_steps(s, opts.teacher_substeps, one_step_above)
                              for n, s in self.sigmas.items()}
        labels = 0 if source.prompt_table else source.classes  # prompts: no centre per condition
        self.afs_center = resolve_center(opts.afs_center, labels) if opts.afs else "zero"
        self.afs_means = None
        if self.afs_center == "class_mean":  # computed once: (classes + 1) x CLASS_MEAN_SAMPLES evaluations
            means = TeacherCache(cfg.teacher_cache, lambda: {
                "solve": "afs class means", "teacher": source_fingerprint(source), "sigma_max": self.sigma_max,
                "samples": CLASS_MEAN_SAMPLES, "precision": cfg.mixed_precision}, in_memory=True)
            self.afs_means, self.teacher_evaluations = means.solve(
                torch.Generator().manual_seed(cfg.seed),  # class_means draws its noises from this seed
                lambda: (class_means(self.teacher.denoiser, source.classes, source.uncond, source.shape, self.sigma_max,
                                     seed=cfg.seed, device=next(source.denoiser.parameters()).device),
                         (source.classes + 1) * CLASS_MEAN_SAMPLES),
                torch.device("cpu"))
        self.cache = TeacherCache(cfg.teacher_cache, lambda: {
            "solve": "sfd trajectories", "teacher": source_fingerprint(source), "w": self.teacher.w,
            "sigmas": {n: s.tolist() for n, s in self.sigmas.items()}, "teacher_steps": self.teacher_steps,
            "solver": opts.teacher_solver, "precision": cfg.mixed_precision})
        self._pools: dict[int, tuple[torch.Tensor, Cond, list[torch.Tensor]]] = {}
        self._pool_state: dict[int, tuple[int, int]] = {}  # per NFE: iterations its pool served, its seed

    @property
    def student(self):
        return self.nets["student"]

    def optim_groups(self) -> dict[str, OptimSpec]:
        return {"student": OptimSpec("adam", schedule="cosine", warmup=10)}

    def plan(self, generator: torch.Generator) -> dict:
        nfe = self.nfes[int(torch.randint(len(self.nfes), (1,), generator=generator))]
        if self.opts.teacher_pool or self.opts.teacher_reuse > 1:
            return {"nfe": nfe, "served": self.serve(nfe, generator)}
        return {"nfe": nfe}

    def serve(self, nfe: int, generator: torch.Generator) -> torch.Tensor:
        """This iteration's batch from the teacher pool of ``nfe``: pool indices drawn without replacement
        (its micro-batches are disjoint slices of them), and a fresh pool, from a seed drawn here, after the
        pool served ``teacher_reuse`` x pool / batch iterations, so each trajectory trains the student about
        ``teacher_reuse`` times. Drawn in ``plan``: every micro-batch and every process shares it."""
        size, serves = pool_serves(self.opts, self.cfg.batch)
        uses, seed = self._pool_state.get(nfe, (0, None))
        if uses % serves == 0:
            seed = int(torch.randint(2**62, (1,), generator=generator))
            self._pools.pop(nfe, None)
        self._pool_state[nfe] = (uses + 1, seed)
        return torch.randperm(size, generator=generator)[: self.cfg.batch]

    def trajectories(self, nfe: int, batch: int, generator: torch.Generator,
                     device: torch.device) -> tuple[torch.Tensor, Cond, list[torch.Tensor]]:
        """Fresh starts x_N = sigma_max z, conditions, and the teacher's states at the student's points (read
        from the run's ``teacher_cache`` where it holds them)."""

        def solve() -> tuple[tuple, int]:
            t = self.sigmas[nfe].to(device)
            x = (torch.randn((batch, *self.source.shape), generator=generator) * self.sigma_max).to(device)
            cond = move_cond(self.source.draw_cond(batch, generator), device)
            with torch.no_grad():
                targets = teacher_states(self.teacher, x, t, cond, self.teacher_steps[nfe], self.opts.teacher_solver)
            return (x, cond, targets), sum(self.teacher_steps[nfe]) * batch * self.teacher.evaluations()

        (x, cond, targets), spent = self.cache.solve(generator, solve, device, nfe=nfe, batch=batch)
        self.teacher_evaluations += spent
        return x, cond, targets

    def precompute(self, draws: Iterator[tuple[dict, MicroBatch, torch.Generator]]) -> None:
        device = next(self.student.parameters()).device
        for plan, micro, generator in draws:
            self.targets(plan, micro, generator, device)

    def targets(self, plan: dict, micro: MicroBatch, generator: torch.Generator,
                device: torch.device) -> tuple[torch.Tensor, Cond, list[torch.Tensor]]:
        """Micro-batch ``micro``'s starts, conditions and teacher states: from the pool (``pooled``), or fresh
        trajectories drawn from its generator (SFD's random stream)."""
        if self.opts.teacher_pool or self.opts.teacher_reuse > 1:
            return self.pooled(plan["nfe"], micro, plan["served"], device)
        return self.trajectories(plan["nfe"], micro.size, generator, device)

    def pooled(self, nfe: int, micro: MicroBatch, served: torch.Tensor,
               device: torch.device) -> tuple[torch.Tensor, Cond, list[torch.Tensor]]:
        """Micro-batch ``micro`` of this iteration's batch ``served`` (``serve``) from the current pool of this
        NFE: ``teacher_pool`` trajectories (one iteration's batch when 0) solved at once from the pool's own
        seed, kept in ``state_dict``, so a resumed run solves the pool it stopped in again (with several
        processes, each solves the whole pool)."""
        size, _ = pool_serves(self.opts, self.cfg.batch)
        if nfe not in self._pools:
            pool_gen = torch.Generator().manual_seed(self._pool_state[nfe][1])
            chunks = [self.trajectories(nfe, min(self.cfg.batch, size - start), pool_gen, device)
                      for start in range(0, size, self.cfg.batch)]
            self._pools[nfe] = (
                torch.cat([c[0] for c in chunks]),
                cat_all([c[1] for c in chunks]),
                [torch.cat(states) for states in zip(*(c[2] for c in chunks))],
            )
        x, cond, targets = self._pools[nfe]
        idx = served[micro.index * micro.size:(micro.index + 1) * micro.size].to(device)
        return x[idx], index_cond(cond, idx), [y[idx] for y in targets]

    def state_dict(self) -> dict:
        """What a resumed run needs besides the student: per NFE, the uses of its pool and the pool's seed."""
        return {str(nfe): list(state) for nfe, state in self._pool_state.items()}

    def load_state_dict(self, state: dict) -> None:
        self._pool_state = {int(nfe): tuple(v) for nfe, v in state.items()}
        self._pools.clear()

    def losses(self, plan: dict, micro: MicroBatch, generator: torch.Generator) -> Iterator[StepLoss]:
        nfe, device = plan["nfe"], next(self.student.parameters()).device
        t = self.sigmas[nfe].to(device)
        opts = self.opts
        x, cond, targets = self.targets(plan, micro, generator, device)
        student = AtSteps(self.student, nfe)
        for i in range(len(t) - 1):
            if opts.afs and i == 0:
                center = guided_centers(self.afs_means, cond, self.teacher.w)  # at the teacher's scale
                x = euler_step(None, x, t[0], t[1], analytic=True, center=center)
                continue
            out = euler_step(student, x, t[i], t[i + 1], cond)
            yield StepLoss("student", i, distance(out, targets[i], opts.loss, opts.huber_c))
            x = out.detach()

    def preview_steps(self) -> int:
        return self.nfes[-1]

    @torch.no_grad()
    def preview(self, noise: torch.Tensor, cond: Cond, nfe: int | None = None) -> torch.Tensor:
        nfe = self.nfes[-1] if nfe is None else nfe
        student = AtSteps(self.student, nfe)
        if self.cfg.guidance_mode == "cfg":
            student = CFGTeacher(student, self.w, self.source.uncond)
        center = guided_centers(self.afs_means, cond, self.w)
        return few_step(student, noise, self.sigmas[nfe], cond, self.opts.afs, center=center)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.afs_means is None else {AFS_MEANS_KEY: self.afs_means}

    def card(self) -> dict:
        opts = self.opts
        return self.student_card(
            self.sigmas, {"name": self.grid, **({"rho": opts.rho} if self.grid == "karras" else {"shift": self.shift})},
            {"teacher_one_step_above": self.one_step_above}, afs=opts.afs, afs_center=self.afs_center,
        )


@register("sfd-v")
class SFDv(SFD):
    """SFD-v: one step-conditioned student for every NFE in ``nfe_range``."""

    summary = "SFD-v: one student for a range of step counts (the step count is an input of the network)"
    step_conditioned = True
    node = SFD.node  # one node offers both, by its method widget

    def __init__(self, source: TeacherSource, cfg):
        if source.stock_sampling:
            raise ValueError("SFD-v students of ComfyUI models need a step embedding that stock samplers cannot "
                             "feed; choose method sfd (one student per step count)")
        super().__init__(source, cfg)

    @classmethod
    def settings_for_steps(cls, steps: int) -> dict:
        return {"nfe_range": (min(2, steps), steps)}

    @classmethod
    def bench_runs(cls, nfes: list[int], iters: int) -> list[tuple[str, dict]]:
        """One student for the whole range, trained twice as long as a student for one NFE."""
        return [(cls.name, {"steps": max(nfes), "nfe_range": (min(nfes), max(nfes)), "iters": 2 * iters})]

    @classmethod
    def steps_label(cls, config: dict) -> str | None:
        lo_hi = config.get("nfe_range")
        return f"{lo_hi[0]}-{lo_hi[1]}" if isinstance(lo_hi, list) and len(lo_hi) == 2 else None
