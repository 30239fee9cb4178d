"""One typed configuration for a distillation run, shared by the command line, the nodes, the panel and
the benchmarks. It loads from a flat YAML mapping: the run's own fields (below) and the fields of the
chosen method's ``Config`` (``methods/<method>.py``) side by side; ``cfg.options`` holds the method's,
and ``cfg.<field>`` reads either kind.

The run's defaults: the student schedule ends at sigma_min = 0.006 for EDM-style pixel teachers (no final
step to 0; Stable-Diffusion-style latent teachers use 0.1, as in the official SFD code), Adam at lr 2e-4
(SFD's 5e-5 is for runs of hours), and an iteration count and batch chosen so that distilling the
built-in teacher to 4 steps finishes within 10 minutes on 2 CPU cores; ``QUALITY`` is the longer preset.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from distill_core.atomic import write_text
from distill_core.options import check, coerce, option, settings

#: sigma_min of the student schedule for EDM-style (pixel) teachers: no final step to 0; the
#: student's output at sigma_min is the image.
EDM_SIGMA_MIN = 0.006
#: sigma_min for Stable-Diffusion-style latent teachers (the official SFD code's choice).
SD_SIGMA_MIN = 0.1

#: training's random generators take seeds in [TRAINING_SEED_BASE, 2^32) (``training_seed``), evaluation sets
#: seeds below it, so a student never trains on the noise it is evaluated on (torch's CPU generator keeps
#: only the low 32 bits of a seed: a larger base would alias)
TRAINING_SEED_BASE = 1 << 31


def training_seed(value: int) -> int:
    """The generator seed of a training stream: ``value`` folded into [TRAINING_SEED_BASE, 2^32)."""
    return TRAINING_SEED_BASE + value % TRAINING_SEED_BASE

GUIDANCE_MODES = ("distilled", "cfg")
PRECISIONS = ("no", "bf16")
FROZEN_PRECISIONS = ("as-loaded", "bf16", "fp8")
STUDENT_KINDS = ("full", "lora")
#: how --images pairs with the prompts (``reference_images.image_files``)
IMAGE_PAIRINGS = ("in-order", "every")
OPTIMIZERS = ("adam", "adamw", "adam8bit")
LR_SCHEDULES = ("step", "cosine", "constant")


@dataclass(init=False)
class DistillConfig:
    """Everything a distillation run needs; ``None`` means "the teacher's or the method's own value".
    Built from flat keyword arguments: the run's fields below, the rest go to the method's ``Config``."""

    # what to distil
    teacher: str = option("builtin", "the teacher to distil: builtin, builtin-flow, builtin-bold, a digits teacher "
                          "file that train-teacher --out wrote, or a diffusers model directory (a local folder; "
                          "nothing is downloaded)")
    classes: int = option(0, "a teacher from a directory: train on class labels 0 .. N-1 (0: unconditional)", min=0)
    null_class: int | None = option(None, "a teacher from a directory: its unconditional class label, for "
                                    "classifier-free guidance (None: no guidance)", min=0)
    prompts: str | None = option(None, "a text-to-image pipeline directory: a text file of training prompts, one "
                                 "per line (None: the shipped list: of prompts, of edits for an editing pipeline, of "
                                 "motions for an image-to-video one)")
    images: str | None = option(None, "an editing or image-to-video pipeline directory (Flux Kontext, "
                                "Qwen-Image-Edit, Flux.2, Wan, LTX-Video and HunyuanVideo 1.5 I2V): the image "
                                "each prompt edits or starts its clip from, one file for every prompt or a folder "
                                "with one image per prompt in file-name order, scaled as its pipeline scales it; "
                                "for Flux.2 and Qwen-Image-Edit Plus also a folder of folders, each a set of images "
                                "one prompt's edit reads together")
    pairing: str = option("in-order", "with --images: in-order, prompt k with image k (one image: with every "
                          "prompt); every, each prompt with each image (prompts x images training conditions)",
                          choices=IMAGE_PAIRINGS)
    negative: str | None = option(None, "a text-to-image pipeline directory: the negative prompt, CFG's other side "
                                  "(None: the pipeline's own: the empty prompt, SDXL's zeros)")
    resolution: int | None = option(None, "a teacher from a directory: the side of its square images in pixels, "
                                    "or with width their height (None: the model's own, e.g. 512 for SD 1.5, 1024 "
                                    "for SDXL, SD3 and Flux)", min=8)
    width: int | None = option(None, "a teacher from a directory: the width of its images in pixels, where it "
                               "differs from their height, resolution (None: square; Qwen-Image-Edit without "
                               "resolution: its images' own size at a megapixel, as its pipeline draws)", min=8)
    frames: int = option(1, "a video pipeline from a directory (Wan): the video frames of each training clip, as "
                         "many as the student will sample (Wan 2.1: 81); 1 distils on still images", min=1)
    method: str = option("sfd", "the distillation method (python -m distill_core distill --help lists them)")
    steps: int = option(4, "network evaluations (NFE) per sample of the student", min=1, max=1000)
    sigma_min: float = option(EDM_SIGMA_MIN, "the lowest noise level of the student's schedule", min=0)
    sigma_max: float | None = option(None, "the highest noise level (None: the teacher's)", min=0)
    # guidance: "distilled" = teacher at w, student sampled without CFG (1 evaluation per step);
    # "cfg" = distilled at w = 1, CFG with w applied when sampling (2 evaluations per step)
    guidance: float | None = option(None, "CFG scale w (None: the teacher's); a guidance-distilled teacher (Flux dev) "
                                    "takes it as its guidance input and samples without CFG", min=0)
    guidance_mode: str = option("distilled", "distil w into the student, or apply CFG when sampling",
                                choices=GUIDANCE_MODES)
    # the student: "full" (every weight trained) or "lora" (low-rank adapters on the frozen teacher, which
    # is the same network with the adapters off: one copy of the base weights)
    student: str = option("full", "train every weight, or LoRA adapters on the frozen teacher",
                          choices=STUDENT_KINDS)
    lora_rank: int = option(16, "LoRA rank r", min=1, max=1024)
    lora_alpha: float | None = option(None, "LoRA alpha (None: the rank, update scale 1)", min=0)
    init_from: str | None = option(None, "a student file of this teacher whose weights the trained network starts "
                                   "from instead of the teacher's: continue a student with another method (a "
                                   "1-step regression student refined by DMD2) (None: the teacher)")
    # optimisation
    lr: float = option(2e-4, "learning rate of the student", min=1e-9, max=1)
    lr_decay_at: float = option(0.5, "the 'step' schedule divides the lr by 10 from this fraction of the run",
                                min=0, max=1)
    lr_warmup: int | None = option(None, "linear lr warmup in iterations (None: the method's own, at most a "
                                   "tenth of the run)", min=0)
    iters: int = option(220, "training iterations", min=1)
    batch: int = option(64, "samples per iteration", min=1)
    grad_accum: int = option(1, "micro-batches per iteration (the batch is split); 0: as few as fit the GPU's free "
                             "memory by the memory plan (1 on the CPU)", min=0)
    clip_grad: float | None = option(None, "clip the gradient norm to this value", min=0)
    ema: float | None = option(None, "EMA decay of the student's weights", min=0, max=0.999999)
    mixed_precision: str = option("no", "bf16 autocast on CUDA", choices=PRECISIONS)
    # memory levers (``memory_plan`` estimates what they save before a run starts)
    frozen_precision: str = option("as-loaded", "the frozen teacher's weights: as loaded, cast to bf16 (half the "
                                   "memory of float32), or for a LoRA student fp8 (its Linear layers' weights in 8 "
                                   "bits with a scale per row, computed in bf16: half of bf16's memory, at some of "
                                   "the teacher's precision); trained weights stay float32", choices=FROZEN_PRECISIONS)
    grad_checkpointing: bool = option(False, "recompute the trained networks' activations in the backward pass: "
                                      "far less memory, about a third more time per iteration")
    shard_teacher: bool = option(False, "split the frozen teacher's weights over the processes of a multi-process "
                                 "run (accelerate launch --multi_gpu --num_processes N), each holding 1/N: for "
                                 "teachers that do not fit one GPU")
    teacher_cache: str | None = option(None, "a folder of teacher targets shared between runs: a solve found there "
                                       "is read instead of computed, the rest are written there (SFD's "
                                       "trajectories, teacher pairs; python -m distill_core precompute fills it "
                                       "ahead) (None: off)")
    optimizer: str | None = option(None, "adam, adamw, or adam8bit (Adam's states in 8 bits, from bitsandbytes on "
                                   "CUDA: a quarter of their memory, for full-weight students) (None: the method's "
                                   "own)", choices=OPTIMIZERS)
    weight_decay: float | None = option(None, "weight decay (None: the method's own)", min=0)
    lr_schedule: str | None = option(None, "step, cosine or constant after the warmup (None: the method's own)",
                                     choices=LR_SCHEDULES)
    seed: int = option(0, "seed of noise, conditions and new layers", min=0)
    # bookkeeping
    out: str = option("runs/main", "the run's folder")
    checkpoint_every: int = option(30, "write a resumable checkpoint every this many iterations (0: at the end)",
                                   min=0)
    sample_every: int = option(0, "write a sample grid every this many iterations (0: none)", min=0)
    eval_samples: int = option(100, "samples for the report's metrics", min=1)
    report_solvers: str | None = option(None, "the training-free solvers the report compares the student with, "
                                        "comma-separated (unipc,dpmpp_2m), each on every grid the teacher is "
                                        "sampled on; on a large teacher they are most of the report's time (None: "
                                        "all nine)")
    reference_steps: int | None = option(None, "Heun steps of the teacher's reference solve that the report "
                                         "measures against, 2 x steps - 1 teacher evaluations a sample (None: 128 "
                                         "for the built-in teachers, 32 for a teacher from a directory)", min=2)
    extra: dict = option(None, "free-form notes kept with the run", factory=dict)
    options: object = None  # the method's own settings (an instance of its Config)

    def __init__(self, options=None, **values):
        from distill_core.methods.registry import method_class

        own = {s.name: s for s in settings(DistillConfig)}
        for name, s in own.items():
            setattr(self, name, coerce(s, values.pop(name, s.default)) if name != "extra" else
                    dict(values.pop(name, None) or {}))
        Config = method_class(self.method).Config
        if options is not None and not isinstance(options, Config):
            raise TypeError(f"options of method {self.method!r} are a {Config.__name__}")
        theirs = {s.name: s for s in settings(Config)}
        unknown = sorted(set(values) - set(theirs))
        if unknown:
            raise ValueError(
                f"unknown config keys {unknown} for method {self.method!r}; known keys: "
                f"{sorted([*own, *theirs])}"
            )
        self.options = options or Config(**{k: coerce(theirs[k], v) for k, v in values.items()})
        check(self)
        check(self.options)
        if self.grad_accum and self.batch % self.grad_accum:
            raise ValueError(f"batch {self.batch} is not divisible by grad_accum {self.grad_accum}")
        if self.sigma_max is not None and not self.sigma_min < self.sigma_max:
            raise ValueError(f"sigma_min {self.sigma_min} must lie below sigma_max {self.sigma_max}")
        if self.sigma_min <= 0:
            raise ValueError(f"sigma_min must be above 0, got {self.sigma_min}")
        if self.report_solvers is not None:
            from distill_core.solvers import solver_names

            solver_names(self.report_solvers)

    def __getattr__(self, name: str):
        """The method's settings read like the run's own (``cfg.teacher_substeps``)."""
        options = self.__dict__.get("options")
        if options is not None and name in {f.name for f in fields(options)}:
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__} of method {self.__dict__.get('method')!r} has no {name!r}")

    def __eq__(self, other) -> bool:
        return isinstance(other, DistillConfig) and self.to_dict() == other.to_dict()

    def to_dict(self) -> dict:
        """The flat mapping a YAML file holds: the run's fields, then the method's."""
        d = {s.name: getattr(self, s.name) for s in settings(DistillConfig)}
        d.update(dataclasses.asdict(self.options))
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def replace(self, **changes) -> DistillConfig:
        """A copy with ``changes`` applied (``None`` values are ignored: "not given on the command line").
        A change of method keeps the settings the new method also declares."""
        changes = {k: v for k, v in changes.items() if v is not None}
        d = self.to_dict()
        if changes.get("method", self.method) != self.method:
            from distill_core.methods.registry import method_class

            theirs = {f.name for f in fields(method_class(changes["method"]).Config)}
            d = {k: v for k, v in d.items() if k in theirs or k in {s.name for s in settings(DistillConfig)}}
        return DistillConfig(**{**d, **changes})

    @staticmethod
    def from_dict(d: dict) -> DistillConfig:
        return DistillConfig(**d)

    @staticmethod
    def from_yaml(path: str | Path) -> DistillConfig:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ValueError(f"{path}: cannot read it ({e.strerror or e}); give a YAML file of settings, such as "
                             "a run's config.yaml") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            line = f" at line {where.line + 1}" if where is not None else ""
            raise ValueError(f"{path}: not valid YAML{line} ({getattr(e, 'problem', None) or e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config is a YAML mapping of keys to values")
        try:
            return DistillConfig.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def to_yaml(self, path: str | Path) -> Path:
        path = Path(path)
        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path


#: The ``--quality`` preset: 600 iterations on fresh teacher trajectories (SFD's choice: reuse trades fresh
#: trajectories for iterations where minutes are short; about 25 to 30 minutes of training on 2 CPU cores).
QUALITY = {"iters": 600, "batch": 64, "teacher_reuse": 1.0, "eval_samples": 500}
