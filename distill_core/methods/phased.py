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

import copy
from collections.abc import Iterator

import torch
import torch.utils.checkpoint
from torch import nn

from distill_core.builtin import fingerprint
from distill_core.config import DistillConfig
from distill_core.data import load_mnist
from distill_core.denoisers.base import Cond, index_cond, move_cond
from distill_core.denoisers.edm import EDMDenoiser
from distill_core.methods import phases
from distill_core.methods.base import StepLoss, TeacherSource
from distill_core.nets.unet import Level, UNet
from distill_core.schedules import log_snr_uniform, phased
from distill_core.solvers import SOLVERS
from distill_core.students import AtSteps, StudentNet, architecture, student_card
from distill_core.teacher import CFGTeacher


def score_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """w(sigma) = lambda(sigma) / sigma^4 = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def phased_loss(d_student: torch.Tensor, d_teacher: torch.Tensor, sigma: torch.Tensor, weights: torch.Tensor,
                sigma_data: float = 0.5) -> torch.Tensor:
    """sum_i weights_i w(sigma_i) || D_theta - D_T ||_i^2 = sum_i weights_i lambda(sigma_i) || s_theta - s_T ||_i^2."""
    per_sample = (d_student - d_teacher).float().flatten(1).square().sum(1)
    return (weights * score_weight(sigma.float(), sigma_data) * per_sample).sum()


# ---------------------------------------------------------------------------------------- the student
def select_weights(student: nn.Module, teacher: nn.Module) -> int:
    """Weight selection: copy the leading slice of every same-named teacher tensor that is at least as
    large in every dimension; returns how many tensors were copied."""
    theirs, copied = teacher.state_dict(), 0
    with torch.no_grad():
        for name, t in student.state_dict().items():
            src = theirs.get(name)
            if src is not None and src.ndim == t.ndim and all(a >= b for a, b in zip(src.shape, t.shape)):
                t.copy_(src[tuple(slice(0, n) for n in t.shape)])
                copied += 1
    return copied


class _CheckpointedLevel(Level):
    """A UNet level whose activations are recomputed in the backward pass instead of stored."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(super().forward, x, emb, use_reentrant=False)


def enable_checkpointing(denoiser: nn.Module) -> None:
    """Gradient checkpointing: per level for the built-in UNet, diffusers' own switch otherwise."""
    levels = [m for m in denoiser.modules() if type(m) is Level]
    for m in levels:
        m.__class__ = _CheckpointedLevel
    if not levels:
        switch = next((m.enable_gradient_checkpointing for m in denoiser.modules()
                       if hasattr(m, "enable_gradient_checkpointing")), None)
        if switch is None:
            raise ValueError(f"no gradient checkpointing for a {type(denoiser).__name__}")
        switch()


def lighter_student(denoiser: nn.Module, width: float = 1.0, depth: float = 1.0, init: str = "teacher") -> nn.Module:
    """The student network: the built-in UNet family scaled by ``width`` / ``depth`` (weight selection
    from the teacher, or ``init="scratch"``); any other teacher is copied whole (same architecture)."""
    if init not in ("teacher", "scratch"):
        raise ValueError(f"student_init must be 'teacher' or 'scratch', got {init!r}")
    net = getattr(denoiser, "net", None)
    if not (isinstance(denoiser, EDMDenoiser) and isinstance(net, UNet)):
        if (width, depth) != (1.0, 1.0):
            raise ValueError("width / depth multipliers apply to the built-in UNet family only")
        return copy.deepcopy(denoiser).requires_grad_(True)
    student = EDMDenoiser(UNet(net.cfg.scaled(width, depth)), denoiser.sigma_data, denoiser.sigma_min,
                          denoiser.sigma_max)
    if init == "teacher":
        select_weights(student, denoiser)
    return student.requires_grad_(True)


@torch.no_grad()
def clip_spectral_norms(module: nn.Module, bound: float, vectors: dict[str, torch.Tensor]) -> None:
    """W <- W / max(1, sigma_1(W) / bound) for every conv / linear weight (as a matrix out x rest), sigma_1
    by one power iteration per call with the vector kept in ``vectors`` (Miyato et al. 2018's estimate;
    applied as a projection, Gouk et al. 2021, so the file format does not change)."""
    for name, m in module.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight.flatten(1)
            u = vectors.get(name)
            if u is None:
                u = torch.nn.functional.normalize(torch.ones(w.shape[0], device=w.device, dtype=w.dtype), dim=0)
            v = torch.nn.functional.normalize(w.T @ u, dim=0)
            u = torch.nn.functional.normalize(w @ v, dim=0)
            vectors[name] = u
            s = float(u @ w @ v)
            if s > bound:
                m.weight.mul_(bound / s)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


# ---------------------------------------------------------------------------------------- inputs x ~ p_t
class DataInputs:
    """Forward-noised MNIST: a draw is (x0, n) with x0's class; x(sigma) = x0 + sigma n."""

    def __init__(self, shape: tuple[int, ...]):
        self.images, self.labels = load_mnist("train")
        if tuple(self.images.shape[1:]) != tuple(shape):
            raise ValueError(f"data inputs are MNIST {tuple(self.images.shape[1:])}; the teacher's shape is {shape}")

    def draw(self, n: int, generator: torch.Generator) -> tuple[tuple[torch.Tensor, ...], Cond]:
        idx = torch.randint(self.images.shape[0], (n,), generator=generator)
        noise = torch.randn((n, *self.images.shape[1:]), generator=generator)
        return (self.images[idx], noise), self.labels[idx]

    def at(self, base: tuple[torch.Tensor, ...], sigma: torch.Tensor) -> torch.Tensor:
        x0, noise = base
        return x0 + sigma.view(-1, 1, 1, 1).to(x0) * noise


class TrajectoryInputs:
    """States of teacher trajectories solved once (DPM-Solver++(2M), log-uniform grid): a draw is a
    trajectory; x(sigma) = D_i + (sigma / sigma_i)(x_i - D_i) from the stored state at the grid point
    sigma_i >= sigma just above (a DDIM step with the teacher's stored x0 prediction)."""

    def __init__(self, teacher, source: TeacherSource, n: int, sigma_min: float, sigma_max: float, steps: int,
                 generator: torch.Generator, chunk: int = 64):
        self.grid = log_snr_uniform(steps, sigma_min, sigma_max)
        device = _device(source.denoiser)
        xs, ds, conds = [], [], []
        for start in range(0, n, chunk):
            b = min(chunk, n - start)
            noise = torch.randn((b, *source.shape), generator=generator) * sigma_max
            cond = source.draw_cond(b, generator)
            x, d = phases.trajectory(teacher, noise.to(device), self.grid, move_cond(cond, device))
            xs.append(x)
            ds.append(d)
            conds.append(cond)
        self.xs, self.ds = torch.cat(xs), torch.cat(ds)
        self.conds = torch.cat(conds) if isinstance(conds[0], torch.Tensor) else conds[0]
        self.evaluations = n * (steps + 1)

    def draw(self, n: int, generator: torch.Generator) -> tuple[tuple[torch.Tensor, ...], Cond]:
        idx = torch.randint(self.xs.shape[0], (n,), generator=generator)
        return (idx,), index_cond(self.conds, idx)

    def to(self, device: torch.device) -> None:
        self.xs, self.ds = self.xs.to(device), self.ds.to(device)

    def at(self, base: tuple[torch.Tensor, ...], sigma: torch.Tensor) -> torch.Tensor:
        (idx,) = base
        grid = self.grid.to(sigma.device)
        i = ((grid[None] >= sigma[:, None] * (1 - 1e-6)).sum(1) - 1).clamp(0, len(grid) - 1)
        x, d = self.xs[idx, i], self.ds[idx, i]
        return d + (sigma / grid[i]).view(-1, 1, 1, 1) * (x - d)


# ---------------------------------------------------------------------------------------- the method
_PROBES: dict[tuple, phases.Probe] = {}
#: teacher trajectories solved once for data-free inputs, and target-pool slots, when teacher_pool is 0
TRAJECTORIES = 256
POOL = 1024


def teacher_probe(teacher: CFGTeacher, source: TeacherSource, cfg: DistillConfig, sigma_max: float) -> phases.Probe:
    """The probe of ``phases.probe`` on ``cfg.probe_batch`` trajectories (cached per teacher and settings)."""
    key = (fingerprint(source.denoiser), teacher.w, cfg.sigma_min, sigma_max, cfg.probe_batch, cfg.probe_steps,
           cfg.seed)
    if key not in _PROBES:
        gen = torch.Generator().manual_seed(cfg.seed + 4242)
        noise = torch.randn((cfg.probe_batch, *source.shape), generator=gen) * sigma_max
        cond, device = source.draw_cond(cfg.probe_batch, gen), _device(source.denoiser)
        _PROBES[key] = phases.probe(teacher, noise.to(device), move_cond(cond, device), cfg.sigma_min, sigma_max,
                                    cfg.probe_steps)
    return _PROBES[key]


class Phased:
    """``method="phased"``: one update per iteration on a stratified batch over the K phases."""

    name = "phased"
    #: the trainer's defaults for this method (config fields left at None take these)
    optimizer, weight_decay, lr_schedule = "adamw", 0.01, "cosine"

    def __init__(self, source: TeacherSource, cfg: DistillConfig):
        if cfg.guidance_mode != "distilled":
            raise ValueError("phased distillation distils guidance into the student (guidance_mode 'distilled')")
        self.source, self.cfg = source, cfg
        self.w = float(source.guidance if cfg.guidance is None else cfg.guidance)
        self.teacher = CFGTeacher(source.denoiser, self.w, source.uncond)
        self.teacher_fingerprint = fingerprint(source.denoiser)
        self.sigma_min = cfg.sigma_min
        self.sigma_max = cfg.sigma_max or source.denoiser.sigma_max
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            denoiser = lighter_student(source.denoiser, cfg.student_width, cfg.student_depth, cfg.student_init)
        if cfg.grad_checkpointing:
            enable_checkpointing(denoiser)
        self.student = StudentNet(denoiser).train()
        self.architecture = architecture(denoiser)
        needs_probe = cfg.partition == "adaptive" or cfg.phase_weights == "variance"
        self.probe = teacher_probe(self.teacher, source, cfg, self.sigma_max) if needs_probe else None
        self.partition = phases.partition(cfg.partition, cfg.phases, self.sigma_min, self.sigma_max, self.probe)
        self.alpha = phases.phase_weights(self.partition, cfg.phase_weights, self.probe)
        self.sigmas = {cfg.steps: phased(cfg.steps, self.partition.refinement)}
        probed = 0 if self.probe is None else cfg.probe_batch * (cfg.probe_steps + 1)
        self.teacher_evaluations = probed * self._per_call()
        self._inputs = None
        self._pool: dict | None = None
        self._sn_vectors: dict[str, torch.Tensor] = {}

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
            if cfg.phase_inputs == "data":
                self._inputs = DataInputs(self.source.shape)
            else:
                n = cfg.teacher_pool or TRAJECTORIES
                gen = torch.Generator().manual_seed(cfg.seed * 1000 + 17)
                self._inputs = TrajectoryInputs(self.teacher, self.source, n, self.sigma_min, self.sigma_max,
                                                cfg.probe_steps, gen)
                self.teacher_evaluations += self._inputs.evaluations * self._per_call()
                self._inputs.to(next(self.student.parameters()).device)
        return self._inputs

    def _per_call(self) -> int:
        return 2 if self.teacher.w != 1 else 1

    def _teacher(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        self.teacher_evaluations += x.shape[0] * self._per_call()
        with torch.no_grad():
            return self.teacher(x, sigma, cond)

    def plan(self, generator: torch.Generator) -> dict:
        return {}

    def draw(self, batch: int, generator: torch.Generator, device: torch.device):
        """(x, sigma, phase, cond, teacher target) for one micro-batch."""
        if self.cfg.teacher_pool or self.cfg.target_ema:
            return self._from_pool(batch, generator, device)
        base, cond = self.inputs().draw(batch, generator)
        k = phases.draw_phases(self.partition.K, batch, generator)
        sigma = phases.draw_sigmas(self.partition, k, generator).to(device)
        base, cond = tuple(b.to(device) for b in base), move_cond(cond, device)
        x = self.inputs().at(base, sigma)
        return x, sigma, k.to(device), cond, self._teacher(x, sigma, cond)

    def _from_pool(self, batch: int, generator: torch.Generator, device: torch.device):
        """A batch from a pool of ``teacher_pool`` slots (base input, condition, phase) drawn once from the
        config's seed. Without smoothing each slot also has a fixed sigma and its teacher target is cached;
        with ``target_ema`` = beta, every visit re-draws sigma inside the slot's phase and the target is
        T <- beta T + (1 - beta) D_T(x, sigma) (the first visit: D_T)."""
        cfg = self.cfg
        if self._pool is None:
            gen = torch.Generator().manual_seed(cfg.seed * 1000 + 29)
            n = cfg.teacher_pool or POOL
            base, cond = self.inputs().draw(n, gen)
            k = phases.draw_phases(self.partition.K, n, gen)
            base, cond = tuple(b.to(device) for b in base), move_cond(cond, device)
            pool = {"base": base, "cond": cond, "k": k.to(device), "target": None, "seen": None}
            if not cfg.target_ema:
                sigma = phases.draw_sigmas(self.partition, k, gen).to(device)
                x = self.inputs().at(base, sigma)
                chunks = torch.arange(n, device=device).split(cfg.batch)
                targets = [self._teacher(x[ix], sigma[ix], index_cond(cond, ix)) for ix in chunks]
                pool.update(x=x, sigma=sigma, target=torch.cat(targets))
            else:
                pool.update(target=torch.zeros((n, *self.source.shape), device=device),
                            seen=torch.zeros(n, dtype=torch.bool, device=device))
            self._pool = pool
        pool = self._pool
        idx = torch.randint(pool["k"].shape[0], (batch,), generator=generator).to(device)
        k, cond = pool["k"][idx], index_cond(pool["cond"], idx)
        if not cfg.target_ema:
            return pool["x"][idx], pool["sigma"][idx], k, cond, pool["target"][idx]
        sigma = phases.draw_sigmas(self.partition, k.cpu(), generator).to(device)
        x = self.inputs().at(tuple(b[idx] for b in pool["base"]), sigma)
        fresh = self._teacher(x, sigma, cond)
        seen = pool["seen"][idx].view(-1, *([1] * (x.ndim - 1)))
        target = torch.where(seen, cfg.target_ema * pool["target"][idx] + (1 - cfg.target_ema) * fresh, fresh)
        pool["target"][idx], pool["seen"][idx] = target, True
        return x, sigma, k, cond, target

    def losses(self, plan: dict, batch: int, generator: torch.Generator) -> Iterator[StepLoss]:
        device = next(self.student.parameters()).device
        if self.cfg.spectral_norm:
            clip_spectral_norms(getattr(self.student, "module", self.student), self.cfg.spectral_norm,
                                self._sn_vectors)
        x, sigma, k, cond, target = self.draw(batch, generator, device)
        weights = phases.sample_weights(self.alpha.to(device), k)
        d = self.student(x, sigma, cond)
        yield StepLoss(0, phased_loss(d, target, sigma, weights, getattr(self.source.denoiser, "sigma_data", 0.5)))

    @torch.no_grad()
    def preview(self, noise: torch.Tensor, cond: Cond) -> torch.Tensor:
        sigmas = self.sigmas[self.cfg.steps].to(noise.device)
        return SOLVERS[self.cfg.phased_solver](AtSteps(self.student, None), noise, sigmas, cond)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def card(self) -> dict:
        cfg = self.cfg
        return student_card(
            self.name,
            [cfg.steps],
            self.sigmas,
            {"name": "phased", "partition": cfg.partition, "refinement": self.partition.refinement},
            False,
            "distilled",
            self.w,
            self.teacher_fingerprint,
            teacher=self.source.name,
            solver=cfg.phased_solver,
            architecture=self.architecture,
            phases={**self.partition.to_dict(), "alpha": cfg.phase_weights, "weights": self.alpha.tolist()},
            training={
                "phase_inputs": cfg.phase_inputs,
                "target_ema": cfg.target_ema,
                "teacher_pool": cfg.teacher_pool,
                "student_width": cfg.student_width,
                "student_depth": cfg.student_depth,
                "student_init": cfg.student_init,
                "lr": cfg.lr,
                "iters": cfg.iters,
                "batch": cfg.batch,
            },
        )
