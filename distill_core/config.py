"""One typed configuration for a distillation run, shared by the command line, the benchmarks and
(later) the ComfyUI nodes. It loads from YAML; command-line flags override single fields.

Defaults follow SFD (Zhou et al. 2024) and its official code where they apply: the polynomial rho = 7
grid, sigma 80 -> 0.006 for EDM-style teachers (Stable-Diffusion-style latent teachers use sigma_min =
0.1, as in the official code), the analytic first step on, Adam (lr 2e-4 here: the paper's 5e-5
is for runs of hours; measured on the built-in teacher, 2e-4 is better for short runs). Where the
paper's choice costs more for the same result on the CPU, the default departs from it and the paper's
value is one key away (``methods/sfd.py``; measured in docs/sfd_recipes.md): the teacher's targets
come from UniPC at K = 3 (the paper: DPM-Solver++(3M), K = 4) with one step on intervals starting
above sigma 20, every teacher batch trains the student twice (the paper: fresh trajectories every
iteration), the lr rises over 10 iterations and then decays on a cosine (the paper: no warmup, / 10 at
half time), for a class-conditional teacher the analytic first step is taken about the teacher's class
mean (the paper: about 0), and the distance is a pseudo-Huber with c = 0.01 per element (the paper: L1).
The iteration count and batch of the default run are chosen so that distilling the built-in teacher
finishes within 10 minutes on 2 CPU cores; ``QUALITY`` is the longer preset.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

#: sigma_min of the student schedule for EDM-style (pixel) teachers: no final step to 0; the
#: student's output at sigma_min is the image.
EDM_SIGMA_MIN = 0.006
#: sigma_min for Stable-Diffusion-style latent teachers (the official SFD code's choice).
SD_SIGMA_MIN = 0.1

METHODS = ("sfd", "sfd-v", "phased")
LOSSES = ("l1", "l2", "huber")
GUIDANCE_MODES = ("distilled", "cfg")
AFS_CENTERS = ("auto", "zero", "class_mean")
PRECISIONS = ("no", "bf16")
STUDENT_KINDS = ("full", "lora")
OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("step", "cosine", "constant")
PARTITIONS = ("uniform", "adaptive")
PHASE_WEIGHTS = ("dt", "variance")
PHASE_INPUTS = ("data", "trajectories")


@dataclass
class DistillConfig:
    """Everything a distillation run needs; ``None`` means "the teacher's own value"."""

    # what to distil
    teacher: str = "builtin"
    method: str = "sfd"
    steps: int = 4  # network evaluations (NFE) per sample of an SFD student
    nfe_range: tuple[int, int] = (2, 5)  # SFD-v: the step counts one student serves
    # schedule and teacher targets
    rho: float = 7.0
    sigma_min: float = EDM_SIGMA_MIN
    sigma_max: float | None = None
    afs: bool = True  # analytic first step: saves one evaluation
    # the first step's centre mu (distill_core.afs): "zero" is SFD's; "class_mean" the teacher's mean
    # D at sigma_max per class (+0.10 dB on five paired seeds of the built-in teacher); "auto": class means
    # where the conditions are class labels, else zero
    afs_center: str = "auto"
    # the teacher's targets: K steps of this solver per student interval (SFD's paper: DPM-Solver++(3M),
    # K = 4; UniPC at K = 3 is as accurate here for 3/4 of the cost, docs/sfd_recipes.md)
    teacher_solver: str = "unipc"
    teacher_substeps: int = 3
    # intervals that start above this sigma take one teacher step, not K: at high noise the ODE is
    # nearly straight (AFS's premise); None: K everywhere (an SD-style teacher's sigma_max is below 20)
    teacher_one_step_above: float | None = 20.0
    # each teacher trajectory trains the student this many times (1: fresh trajectories every iteration,
    # as in SFD). The teacher is most of an iteration's cost (22 of 34 forward passes per trajectory on
    # the built-in teacher), so reusing each batch for 2 iterations buys 1.5x the iterations
    teacher_reuse: float = 2.0
    # trajectories solved at once (0: one batch); a pool serves teacher_reuse x pool / batch iterations
    teacher_pool: int = 0
    # the student: "full" (every weight trained, as in SFD) or "lora" (low-rank adapters on the frozen
    # teacher, which is the same network with the adapters off: one copy of the base weights)
    student: str = "full"
    lora_rank: int = 16
    lora_alpha: float | None = None  # None: alpha = rank (update scale 1)
    # guidance: "distilled" = teacher at w, student sampled without CFG (1 evaluation per step);
    # "cfg" = distilled at w = 1, CFG with w applied when sampling (2 evaluations per step)
    guidance: float | None = None
    guidance_mode: str = "distilled"
    # optimisation
    # the distance d: "huber" (sqrt(delta^2 + c^2) - c per element) is L1 on errors above c, and quiets
    # the +-1 gradients L1 gives elements already within c of their target; c = 0.01 (images in [-1, 1])
    # gains +0.15 dB over SFD's L1 on five paired seeds of the built-in teacher (docs/sfd_recipes.md)
    loss: str = "huber"
    huber_c: float = 0.01
    lr: float = 2e-4  # SFD's 5e-5 suits long runs; on the built-in teacher's short run 2e-4 gains 0.65 dB
    lr_decay_at: float = 0.5  # lr / 10 from this fraction of the iterations on
    # the lr rises linearly over the first N iterations (factor (k + 1) / N at iteration k), then follows
    # lr_schedule; None: the method's own choice, at most a tenth of the run (SFD: 10, +0.05 dB on five
    # paired seeds of the built-in teacher, docs/sfd_recipes.md; phased: 0)
    lr_warmup: int | None = None
    # NFE 4, batch 64, teacher_reuse 2: 0.9 to 3.0 s per iteration on 2 CPU cores, by host (stops 15 to 22)
    iters: int = 220
    batch: int = 64
    grad_accum: int = 1
    clip_grad: float | None = None
    ema: float | None = None  # EMA decay of the student's weights (None: no EMA, as in SFD)
    mixed_precision: str = "no"  # "bf16" for CUDA (autocast forward passes); "no" on CPU
    # None: the method's own choice (SFD: Adam, no weight decay, cosine; phased: AdamW,
    # weight decay 0.01, cosine); "step" is lr / 10 at lr_decay_at, "cosine" decays to 0 over the run
    optimizer: str | None = None
    weight_decay: float | None = None
    lr_schedule: str | None = None
    seed: int = 0
    # phased score distillation (method "phased", methods/phased.py); ``steps`` is its sampling steps S
    phases: int = 8  # K
    partition: str = "adaptive"
    phase_weights: str = "dt"  # alpha_k proportional to the phase length, or to the teacher-score variance
    phase_inputs: str = "data"  # forward-noised data, or states on cached teacher trajectories
    target_ema: float = 0.0  # > 0: teacher targets smoothed by an EMA over a pool slot's visits
    student_width: float = 0.5  # the lighter student: channel and block multipliers of the teacher's UNet
    student_depth: float = 1.0
    student_init: str = "teacher"  # weight selection from the teacher, or "scratch"
    spectral_norm: float | None = None  # clip every layer's spectral norm to this bound
    grad_checkpointing: bool = False
    phased_solver: str = "dpmpp_2m"  # the student's sampler on the phase-aware schedule
    probe_batch: int = 64  # teacher trajectories that estimate drift and variance
    probe_steps: int = 64
    # bookkeeping
    out: str = "runs/main"
    checkpoint_every: int = 30
    sample_every: int = 0  # 0: no intermediate sample grids
    eval_samples: int = 100
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.nfe_range = tuple(int(n) for n in self.nfe_range)
        _check(self.method, METHODS, "method")
        _check(self.loss, LOSSES, "loss")
        _check(self.afs_center, AFS_CENTERS, "afs_center")
        _check(self.guidance_mode, GUIDANCE_MODES, "guidance_mode")
        _check(self.mixed_precision, PRECISIONS, "mixed_precision")
        _check(self.student, STUDENT_KINDS, "student")
        _check(self.optimizer or "adam", OPTIMIZERS, "optimizer")
        _check(self.lr_schedule or "step", LR_SCHEDULES, "lr_schedule")
        _check(self.partition, PARTITIONS, "partition")
        _check(self.phase_weights, PHASE_WEIGHTS, "phase_weights")
        _check(self.phase_inputs, PHASE_INPUTS, "phase_inputs")
        if self.phases < 1 or not 0 <= self.target_ema < 1:
            raise ValueError("phases must be at least 1 and target_ema in [0, 1)")
        if self.lr_warmup is not None and self.lr_warmup < 0:
            raise ValueError(f"lr_warmup must be 0 or more iterations, got {self.lr_warmup}")
        if self.steps < 1 or self.iters < 1 or self.batch < 1 or self.grad_accum < 1:
            raise ValueError("steps, iters, batch and grad_accum must be at least 1")
        if self.batch % self.grad_accum:
            raise ValueError(f"batch {self.batch} is not divisible by grad_accum {self.grad_accum}")
        lo, hi = self.nfe_range
        if not 1 <= lo <= hi:
            raise ValueError(f"nfe_range must be (lo, hi) with 1 <= lo <= hi, got {self.nfe_range}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["nfe_range"] = list(self.nfe_range)
        return d

    def replace(self, **changes) -> DistillConfig:
        """A copy with ``changes`` applied (``None`` values are ignored: "not given on the command line")."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @staticmethod
    def from_dict(d: dict) -> DistillConfig:
        known = {f.name for f in fields(DistillConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        return DistillConfig(**d)

    @staticmethod
    def from_yaml(path: str | Path) -> DistillConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config is a YAML mapping of keys to values")
        return DistillConfig.from_dict(data)

    def to_yaml(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path


#: The ``--quality`` preset: 600 iterations on fresh teacher trajectories (SFD's choice: reuse trades fresh
#: trajectories for iterations where minutes are short; about 25 to 30 minutes of training on 2 CPU cores).
QUALITY = {"iters": 600, "batch": 64, "teacher_reuse": 1.0, "eval_samples": 500}


def _check(value: str, allowed: tuple[str, ...], name: str) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
