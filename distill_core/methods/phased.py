"""Phased score distillation: a lighter student matched to the teacher's score phase by phase.

The horizon [sigma_min, sigma_max] is split into K phases I_k (``methods.phases``: uniform or adaptive
in t = log sigma) with weights alpha_k, and the student minimises

    L(theta) = sum_k alpha_k E_{t in I_k, x ~ p_t} lambda(sigma) || s_theta(x, sigma) - s_T(x, sigma) ||^2.

In the engine's denoiser convention a score is s = (D(x, sigma) - x) / sigma^2 (Tweedie: D is the
posterior mean of x0), so for one x the score difference is a denoiser difference,

    || s_theta - s_T ||^2 = || D_theta - D_T ||^2 / sigma^4,

and the loss matches x0 predictions with the weight lambda(sigma) / sigma^4. lambda = 1 (the equation
as written) puts a weight 1 / sigma^4 on D, which spans 10^33 over [0.006, 80]: the last phase would
take every gradient. We use EDM's weighting (Karras et al. 2022, sec. 5),

    lambda(sigma) = sigma^2 (sigma^2 + sigma_data^2) / sigma_data^2,   i.e. the D-space weight
    w(sigma) = lambda(sigma) / sigma^4 = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,

under which a denoiser error of the network's own output scale costs the same at every noise level
(the EDM network's output F enters D as c_out F, and w c_out^2 = 1): the weighting between noise
levels is then exactly alpha_k (and the uniform density of t inside a phase), as the phased loss intends.
Per sample the distance is summed over elements; each phase's expectation is the mean over its
samples of the batch (``phases.sample_weights``).

x ~ p_t comes from data (``phase_inputs="data"``: forward-noised MNIST, x = x0 + sigma n, the student
and the teacher conditioned on x0's class) or without data (``"trajectories"``: states of teacher
trajectories solved once, read at any sigma by a DDIM step from the stored state above it). The
target is the CFG-aware teacher at w (guidance is distilled: the student needs one evaluation per step).

The student is the teacher's UNet family with a width / depth multiplier, initialised by *weight
selection* (Xu et al. 2024, "Initializing models with larger ones": every student tensor takes the
leading slice of the teacher tensor of the same name) or from scratch; other teachers keep their own
architecture. Stabilisers: AdamW with weight decay and a cosine learning rate by default (config
``optimizer``, ``weight_decay``, ``lr_schedule``), gradient clipping (``clip_grad``), optional
spectral-norm clipping of every conv / linear weight, a target pool whose teacher outputs are cached
(``teacher_pool``) or smoothed by an EMA over the slot's visits (``target_ema``), bf16 on CUDA and
gradient checkpointing. The student samples with a training-free solver on the phase-aware schedule
``schedules.phased`` (its points are the adaptive partition's boundaries).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from distill_core.denoisers.base import Cond, index_cond, move_cond, per_sample
from distill_core.methods import phases
from distill_core.methods.base import Method, MicroBatch, NodeLayout, OptimSpec, StepLoss, TeacherSource, Widget
from distill_core.methods.phase_inputs import DataInputs, TrajectoryInputs
from distill_core.methods.phases import PARTITIONS, PHASE_WEIGHTS
from distill_core.methods.registry import register
from distill_core.nets.surgery import clip_spectral_norms, lighter_student
from distill_core.options import option
from distill_core.schedules import phased
from distill_core.solvers import SOLVERS
from distill_core.student_files import architecture
from distill_core.students import AtSteps, StudentNet
from distill_core.teacher import CFGTeacher
from distill_core.teacher_cache import source_fingerprint

PHASE_INPUTS = ("data", "trajectories")


@dataclass
class PhasedConfig:
    """Phased score distillation's own settings (``steps`` is its sampling steps S)."""

    phases: int = option(8, "K: phases the noise range is split into", min=1, max=64)
    partition: str = option("adaptive", "uniform: equal phases in log sigma; adaptive: shorter phases where the "
                            "teacher's prediction changes fastest", choices=PARTITIONS)
    phase_weights: str = option("dt", "each phase's share of the loss: its length in log sigma, or the teacher-"
                                "score variance inside it", choices=PHASE_WEIGHTS)
    phase_inputs: str = option("data", "inputs x ~ p_t: forward-noised data, or states on cached teacher "
                               "trajectories (data-free)", choices=PHASE_INPUTS)
    target_ema: float = option(0.0, "> 0: teacher targets smoothed by an EMA over a pool slot's visits", min=0,
                               max=0.99)
    teacher_pool: int = option(0, "pool of fixed inputs with cached teacher targets (0: fresh targets)", min=0)
    student_width: float = option(0.5, "channels of the student relative to the teacher", min=0.05, max=1.0)
    student_depth: float = option(1.0, "blocks of the student relative to the teacher", min=0.05, max=1.0)
    student_init: str = option("teacher", "weight selection from the teacher, or scratch",
                               choices=("teacher", "scratch"))
    spectral_norm: float | None = option(None, "clip every layer's spectral norm to this bound", min=0)
    phased_solver: str = option("dpmpp_2m", "the student's sampler on the phase-aware schedule",
                                choices=tuple(SOLVERS))
    probe_batch: int = option(64, "teacher trajectories that estimate drift and variance", min=1)
    probe_steps: int = option(64, "steps of the probe trajectories", min=2)


def score_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """w(sigma) = lambda(sigma) / sigma^4 = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def phased_loss(d_student: torch.Tensor, d_teacher: torch.Tensor, sigma: torch.Tensor, weights: torch.Tensor,
                sigma_data: float = 0.5) -> torch.Tensor:
    """sum_i weights_i w(sigma_i) || D_theta - D_T ||_i^2 = sum_i weights_i lambda(sigma_i) || s_theta - s_T ||_i^2."""
    per_sample = (d_student - d_teacher).float().flatten(1).square().sum(1)
    return (weights * score_weight(sigma.float(), sigma_data) * per_sample).sum()


# ---------------------------------------------------------------------------------------- the method
_PROBES: dict[tuple, phases.Probe] = {}
#: teacher trajectories solved once for data-free inputs, and target-pool slots, when teacher_pool is 0
TRAJECTORIES = 256
POOL = 1024


def teacher_probe(teacher: CFGTeacher, source: TeacherSource, cfg, sigma_max: float) -> phases.Probe:
    """The probe of ``phases.probe`` on ``probe_batch`` trajectories (cached per teacher source, its weights and
    its condition distribution, and settings)."""
    batch, steps = cfg.options.probe_batch, cfg.options.probe_steps
    key = (source_fingerprint(source), teacher.w, cfg.sigma_min, sigma_max, batch, steps, cfg.seed)
    if key not in _PROBES:
        gen = torch.Generator().manual_seed(cfg.seed + 4242)
        noise = torch.randn((batch, *source.shape), generator=gen) * sigma_max
        cond, device = source.draw_cond(batch, gen), next(source.denoiser.parameters()).device
        _PROBES[key] = phases.probe(teacher, noise.to(device), move_cond(cond, device), cfg.sigma_min, sigma_max,
                                    steps)
    return _PROBES[key]


@register("phased")
class Phased(Method):
    """Phased score distillation: one update per iteration on a stratified batch over the K phases."""

    Config = PhasedConfig
    sampler = "solver"
    summary = "phased score matching: a lighter student matched to the teacher's score phase by phase"
    node = NodeLayout(
        "DistillPhasedScoreDistill", "Phased score distill",
        "Phased score distillation: a lighter student (a fraction of the teacher's width) learns the guided "
        "teacher's score in each of K phases of the noise range, then samples in S steps on the phase boundaries "
        "with DPM-Solver++(2M). Built-in teacher only. Saves the student (its architecture, phases and schedule in "
        "the file) under diffusion_models/ and a resumable run under output/distill_runs/<save_name>.",
        widgets=(
            Widget("phases", help="K: how many phases the noise range is split into (each gets its share of the "
                   "loss)", choices=("4", "8", "16", "32")),
            Widget("partition", help="uniform: equal phases in log sigma; adaptive: more, shorter phases where the "
                   "teacher's prediction changes fastest (measured on probe trajectories first)"),
            Widget("phase_weights", help="each phase's share of the loss: dt, its length in log sigma; variance, "
                   "the teacher-score variance inside it"),
            Widget("student_width", help="channels of the student relative to the teacher (0.5: about a quarter "
                   "of its FLOPs per step)", min=0.25, max=1.0, step=0.25),
            Widget("steps", help="S: sampling steps of the student (one evaluation each), on the phase-aware "
                   "schedule", default=8, max=64),
            Widget("iterations", "iters", "training iterations (one batch of noised inputs each)", 800,
                   max=100000),
            Widget("learning_rate", "lr", "AdamW learning rate, decayed to 0 along a cosine", 1e-3, min=1e-6,
                   max=1e-2, step=1e-5),
            Widget("batch", help="inputs per iteration, spread evenly over the phases", default=64, max=512),
            Widget("seed", help="seed of the data draws and the probe"),
            Widget("targets", "phase_inputs", "where the student's inputs come from: data, forward-noised digits "
                   "of the built-in data set; trajectories, states of teacher solves (data-free; 256 solves "
                   "first, about a minute on 2 CPU cores)"),
            Widget("smoothing", "target_ema", "teacher-target smoothing: EMA decay over a pool of fixed inputs "
                   "(0: off, fresh teacher targets every iteration)", step=0.01),
        ),
        fixed={"guidance_mode": "distilled", "student": "full"},
        save_name="phased_8step", preview_every=50, checkpoint_every=100, model_output=False,
        refuses_comfy_models="Phased score distill makes a lighter copy of the built-in teacher's network; a "
        "ComfyUI MODEL keeps its own architecture. Connect the Built-in teacher, or distil this model with "
        "Distill to N steps",
    )

    def __init__(self, source: TeacherSource, cfg):
        if cfg.guidance_mode != "distilled":
            raise ValueError("phased distillation distils guidance into the student (guidance_mode 'distilled')")
        super().__init__(source, cfg)
        opts = self.opts
        self.teacher = CFGTeacher(source.denoiser, self.w, source.uncond)
        denoiser = self.seeded(lambda: lighter_student(source.denoiser, opts.student_width, opts.student_depth,
                                                       opts.student_init))
        self.nets = {"student": StudentNet(denoiser).train()}
        self.architecture = architecture(denoiser)
        needs_probe = opts.partition == "adaptive" or opts.phase_weights == "variance"
        self.probe = teacher_probe(self.teacher, source, cfg, self.sigma_max) if needs_probe else None
        self.partition = phases.partition(opts.partition, opts.phases, self.sigma_min, self.sigma_max, self.probe)
        self.alpha = phases.phase_weights(self.partition, opts.phase_weights, self.probe)
        self.sigmas = {cfg.steps: phased(cfg.steps, self.partition.refinement)}
        probed = 0 if self.probe is None else opts.probe_batch * (opts.probe_steps + 1)
        self.teacher_evaluations = probed * self.teacher.evaluations()
        self._inputs = None
        self._pool: dict | None = None
        self._sn_vectors: dict[str, torch.Tensor] = {}

    @property
    def student(self):
        return self.nets["student"]

    def optim_groups(self) -> dict[str, OptimSpec]:
        return {"student": OptimSpec("adamw", weight_decay=0.01, schedule="cosine")}

    def to(self, device: torch.device) -> Phased:
        """The teacher, and the teacher's work kept so far (trajectory inputs, target pool), to ``device``."""
        self.source.denoiser.to(device)
        if isinstance(self._inputs, TrajectoryInputs):
            self._inputs.to(device)
        if self._pool is not None:
            self._pool = {
                k: tuple(move_cond(b, device) for b in v) if isinstance(v, tuple) else move_cond(v, device)
                for k, v in self._pool.items()
            }
        return self

    def inputs(self):
        """The source of x ~ p_t (built on first use: MNIST is read, or teacher trajectories solved)."""
        if self._inputs is None:
            cfg = self.cfg
            if cfg.options.phase_inputs == "data":
                self._inputs = DataInputs(self.source.shape)
            else:
                n = cfg.options.teacher_pool or TRAJECTORIES
                gen = torch.Generator().manual_seed(cfg.seed * 1000 + 17)
                self._inputs = TrajectoryInputs(self.teacher, self.source, n, self.sigma_min, self.sigma_max,
                                                cfg.options.probe_steps, gen)
                self.teacher_evaluations += self._inputs.evaluations * self.teacher.evaluations()
                self._inputs.to(next(self.student.parameters()).device)
        return self._inputs

    def _teacher(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        self.teacher_evaluations += x.shape[0] * self.teacher.evaluations()
        with torch.no_grad():
            return self.teacher(x, sigma, cond)

    def draw(self, batch: int, generator: torch.Generator, device: torch.device):
        """(x, sigma, phase, cond, teacher target) for one micro-batch."""
        if self.cfg.options.teacher_pool or self.cfg.options.target_ema:
            return self._from_pool(batch, generator, device)
        base, cond = self.inputs().draw(batch, generator)
        k = phases.draw_phases(self.partition.K, batch, generator)
        sigma = phases.draw_sigmas(self.partition, k, generator).to(device)
        base, cond = tuple(b.to(device) for b in base), move_cond(cond, device)
        x = self.inputs().at(base, sigma)
        return x, sigma, k.to(device), cond, self._teacher(x, sigma, cond)

    def _from_pool(self, batch: int, generator: torch.Generator, device: torch.device):
        """A batch from a pool of ``teacher_pool`` slots (base input, condition, phase, sigma) drawn once from
        the config's seed. Without smoothing each slot's teacher target is cached; with ``target_ema`` = beta,
        every visit forms the slot's input again (forward-noised data: fresh noise at the slot's sigma) and
        the target is T <- beta T + (1 - beta) D_T(x, sigma) (the first visit: D_T), an average of the
        teacher's predictions at one noise level."""
        cfg = self.cfg
        if self._pool is None:
            gen = torch.Generator().manual_seed(cfg.seed * 1000 + 29)
            n = cfg.options.teacher_pool or POOL
            base, cond = self.inputs().draw(n, gen)
            k = phases.draw_phases(self.partition.K, n, gen)
            sigma = phases.draw_sigmas(self.partition, k, gen).to(device)
            base, cond = tuple(b.to(device) for b in base), move_cond(cond, device)
            pool = {"base": base, "cond": cond, "k": k.to(device), "sigma": sigma}
            if not cfg.options.target_ema:
                x = self.inputs().at(base, sigma)
                chunks = torch.arange(n, device=device).split(cfg.batch)
                targets = [self._teacher(x[ix], sigma[ix], index_cond(cond, ix)) for ix in chunks]
                pool.update(x=x, target=torch.cat(targets))
            else:
                pool.update(target=torch.zeros((n, *self.source.shape), device=device),
                            seen=torch.zeros(n, dtype=torch.bool, device=device))
            self._pool = pool
        pool = self._pool
        idx = torch.randint(pool["k"].shape[0], (batch,), generator=generator).to(device)
        k, sigma, cond = pool["k"][idx], pool["sigma"][idx], index_cond(pool["cond"], idx)
        if not cfg.options.target_ema:
            return pool["x"][idx], sigma, k, cond, pool["target"][idx]
        x = self.inputs().at(self.inputs().redraw(tuple(b[idx] for b in pool["base"]), generator), sigma)
        fresh = self._teacher(x, sigma, cond)
        seen = per_sample(pool["seen"][idx], x)
        beta = cfg.options.target_ema
        target = torch.where(seen, beta * pool["target"][idx] + (1 - beta) * fresh, fresh)
        pool["target"][idx], pool["seen"][idx] = target, True
        return x, sigma, k, cond, target

    def losses(self, plan: dict, micro: MicroBatch, generator: torch.Generator) -> Iterator[StepLoss]:
        device, batch = next(self.student.parameters()).device, micro.size
        if self.cfg.options.spectral_norm:
            clip_spectral_norms(getattr(self.student, "module", self.student), self.cfg.options.spectral_norm,
                                self._sn_vectors)
        x, sigma, k, cond, target = self.draw(batch, generator, device)
        weights = phases.sample_weights(self.alpha.to(device), k)
        d = self.student(x, sigma, cond)
        sigma_data = getattr(self.source.denoiser, "sigma_data", 0.5)
        yield StepLoss("student", 0, phased_loss(d, target, sigma, weights, sigma_data))

    @torch.no_grad()
    def preview(self, noise: torch.Tensor, cond: Cond) -> torch.Tensor:
        sigmas = self.sigmas[self.cfg.steps].to(noise.device)
        return SOLVERS[self.cfg.options.phased_solver](AtSteps(self.student, None), noise, sigmas, cond)

    def card(self) -> dict:
        opts = self.opts
        return self.student_card(
            self.sigmas, {"name": "phased", "partition": opts.partition, "refinement": self.partition.refinement},
            solver=opts.phased_solver,
            architecture=self.architecture,
            phases={**self.partition.to_dict(), "alpha": opts.phase_weights, "weights": self.alpha.tolist()},
        )
