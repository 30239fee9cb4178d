"""What a distillation method is, for the trainer, the student files, the command line, the nodes, the
panel and the benchmarks. A method is one module: a subclass of ``Method`` registered by name
(``methods.registry.register``), with

* ``__init__(source, cfg)``: refusals of settings it cannot train, then ``Method.__init__`` (what every method
  reads: teacher, settings, w, the teacher's fingerprint, the noise range), then its networks (``add_student``:
  a student of the teacher's network beside its CFG teacher; ``seeded``: new layers from the run's seed);
* ``Config``: its own settings dataclass (fields declared with ``options.option``: default, range, help),
  which generates its command-line flags, node widgets and panel form; a run's ``cfg.options``;
* ``nets``: its trainable networks by group name (SFD: ``{"student": ...}``; a distribution-matching
  method: ``{"generator": ..., "fake_score": ...}``), each with an ``OptimSpec`` from ``optim_groups``;
  ``exported`` names the group saved as the student file;
* ``plan(generator)`` / ``losses(plan, micro, generator)``: one iteration as a stream of ``StepLoss``,
  each naming the group it updates; the trainer back-propagates it and steps that group's optimizer
  (SFD yields ``student`` after every student step; a two-network method alternates its groups at its
  own ratio). ``plan`` draws what every micro-batch and every process must share (the trainer seeds its
  generator identically on every process); ``losses`` draws micro-batch ``micro.index`` of
  ``micro.count`` (``micro.size`` samples) from its own generator and yields its losses. A micro-batch's
  generator depends on the run's seed, the iteration and ``micro.index`` alone, so N processes with the
  same global batch train what one process does. Every micro-batch of an iteration
  yields the same sequence of groups;
* ``precompute(draws)``: optionally, the teacher targets of a whole run solved into the run's
  ``teacher_cache`` without training (``distill_core.teacher_cache``);
* ``start_from``: the exported network's weights from a student file (``init_from``);
* ``state_dict`` / ``load_state_dict``: its own progress (pools, rounds) for checkpoints;
  ``teacher_evaluations``: the teacher's network evaluations spent so far (the trainer keeps it across
  resumes);
* ``sampler``: a key into ``sampling.SAMPLERS``, written into the student file, from which engine
  sampling, the ComfyUI SAMPLER node and the panel sample it; ``card`` / ``file_tensors``: the rest of
  the student file;
* ``node``: optionally, the ComfyUI training node that exposes it (``NodeLayout``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, NamedTuple, TypeVar

import torch
from torch import nn

from distill_core.builtin import fingerprint
from distill_core.denoisers.base import Cond
from distill_core.student_files import start_from, student_card
from distill_core.students import StudentNet, make_student
from distill_core.teacher import CFGTeacher

if TYPE_CHECKING:
    from distill_core.config import DistillConfig

T = TypeVar("T")


@dataclass
class TeacherSource:
    """A teacher ready for distillation: its denoiser (frozen), the sample shape, a sampler of
    training conditions, the unconditional condition for CFG, the default guidance scale, and
    ``classes``: how many class labels its conditions are drawn from (labels 0 .. classes - 1, the null
    condition is label ``classes``), or 0 when they are not class labels (prompts). ``tuned``: method
    settings measured on this teacher, used where the run leaves them at ``None``; ``stock_sampling``: its
    students are sampled by a host's stock samplers (ComfyUI), which feed a network nothing but x, sigma
    and the condition; ``draw_data``: real images and their conditions, ``draw_data(batch, generator)``,
    where the teacher's data set is at hand (None: distillation is data-free); ``card``: entries every student
    file of this teacher carries (how a host samples it); ``decode``: its samples (latents) as images in
    [-1, 1] for the report's grid, where the teacher has a decoder; ``prompt_table``: its conditions 0 ..
    ``classes`` are rows of a table of encoded prompts, which its students may sample with another table, so
    nothing per condition (AFS's class means) may travel in their files; ``digits``: its samples are the
    built-in data set's 16x16 digits, measured in the metric classifier's features."""

    name: str
    denoiser: nn.Module
    shape: tuple[int, ...]
    draw_cond: Callable[[int, torch.Generator], Cond]
    uncond: Cond
    guidance: float
    classes: int = 0
    tuned: dict = field(default_factory=dict)
    stock_sampling: bool = False
    draw_data: Callable[[int, torch.Generator], tuple[torch.Tensor, Cond]] | None = None
    card: dict = field(default_factory=dict)
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    prompt_table: bool = False
    digits: bool = False

    def scale(self, w: float | None) -> float:
        """The guidance scale of a run: ``w`` as configured, else the teacher's own; 1 (no CFG) for a teacher
        that takes its guidance as an input (``embedded_guidance``: the run's w went there)."""
        if "embedded_guidance" in self.card:
            return 1.0
        return float(self.guidance if w is None else w)


class StepLoss(NamedTuple):
    """The loss of one update of network group ``group``; ``index`` names the update in the iteration's
    metrics (SFD: the student step)."""

    group: str
    index: int
    loss: torch.Tensor


class MicroBatch(NamedTuple):
    """Micro-batch ``index`` of ``count`` in one iteration's global batch (over every process), of ``size``
    samples; ``local``: its index among the micro-batches this process trains (0: its first)."""

    index: int
    count: int
    size: int
    local: int = 0


@dataclass
class OptimSpec:
    """How one group of networks is optimised. ``lr`` None: the run's ``lr``; ``optimizer``,
    ``weight_decay``, ``schedule`` are the method's defaults, which the run's config overrides where set;
    ``warmup``: linear lr warmup in iterations (capped at a tenth of the run unless the run sets it);
    ``ema``: an EMA decay of the group's weights (None: none, unless the run's ``ema`` asks for one on
    the exported group)."""

    optimizer: str = "adam"
    lr: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup: int = 0
    ema: float | None = None


@dataclass(frozen=True)
class Widget:
    """A node widget bound to a config field: ``name`` on the node (stable: saved workflows store it),
    ``field`` in the config (default: the same name); help, default and range come from the field unless
    given here; ``choices`` replaces the field's (a node may offer a subset, or strings for numbers)."""

    name: str
    field: str | None = None
    help: str | None = None
    default: object = None
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    step: float | None = None


@dataclass(frozen=True)
class NodeLayout:
    """The ComfyUI training node of a method: id (stable), menu name, description, widgets in order
    (between the teacher socket and the run inputs every training node shares), settings fixed by the
    node, the defaults of its run inputs, and whether its first output is the student as a MODEL.
    Methods that give the same id share one node, chosen by its ``method`` widget."""

    id: str
    display: str
    description: str
    widgets: tuple[Widget, ...]
    fixed: dict = field(default_factory=dict)
    save_name: str = "distilled"
    preview_every: int = 10
    checkpoint_every: int = 25
    model_output: bool = True
    refuses_comfy_models: str | None = None  # why the node takes only the built-in teacher (None: it takes any)
    auto: bool = False  # the method menu starts with "auto" (``methods.auto``: the method chosen from benchmarks)


class Method:
    """The base every method derives from (see the module's docstring for the protocol)."""

    name: ClassVar[str] = ""  # set by ``registry.register``
    Config: ClassVar[type]
    sampler: ClassVar[str]
    exported: ClassVar[str] = "student"
    node: ClassVar[NodeLayout | None] = None
    #: one line for menus and ``--help``
    summary: ClassVar[str] = ""
    #: its students' ODE paths are meant to be straight (benchmarks measure ``reflow.straightness``)
    straightens: ClassVar[bool] = False
    #: an update may leave some of a network's trained weights out of its loss (one expert per phase): under
    #: several processes DDP then looks for them in every backward pass
    partial_updates: ClassVar[bool] = False

    source: TeacherSource
    cfg: DistillConfig  # the run's settings (``cfg.options``: the method's own)
    teacher: CFGTeacher  # the teacher it distils (a LoRA student's: the shared network with adapters off)
    nets: dict[str, nn.Module]
    sigma_min: float  # the lowest noise level of the student's schedule
    sigma_max: float  # the noise level x_N = sigma_max z starts from
    teacher_fingerprint: str  # the teacher's ``fingerprint`` as loaded, which the student file names
    teacher_evaluations: int = 0

    def __init__(self, source: TeacherSource, cfg: DistillConfig):
        """What every method reads: the teacher ``source``, the run's settings ``cfg`` and its own ``opts``, the
        guidance scale w of the run, the noise range [sigma_min, sigma_max] (the teacher's sigma_max unless the run
        sets one) and the teacher's fingerprint. The fingerprint is taken here, once, before the method adapts the
        teacher's network (LoRA hooks) or the trainer shards it."""
        self.source, self.cfg, self.opts = source, cfg, cfg.options
        self.w = source.scale(cfg.guidance)
        self.teacher_fingerprint = fingerprint(source.denoiser)
        self.sigma_min = cfg.sigma_min
        self.sigma_max = cfg.sigma_max or source.denoiser.sigma_max
        self.teacher_evaluations = 0

    def seeded(self, build: Callable[[], T]) -> T:
        """``build()`` under the torch random state of the run's seed, restored after: the layers it makes (LoRA
        adapters, step or guidance embeddings, a smaller student) start the same whatever ran before."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            return build()

    def add_student(self, step_conditioned: bool = False, w_conditioned: bool = False) -> StudentNet:
        """The usual pair, set up and returned: ``nets["student"]``, the run's trainable student of the teacher's
        network (``students.make_student``: a full copy or LoRA adapters, as ``cfg.student``, ``lora_rank`` and
        ``lora_alpha`` say, with the step count or guidance scale as an input where asked; new layers
        ``seeded``), and ``teacher``, the CFG-aware teacher beside it (a LoRA student's: the shared network with
        the adapters off), guided at w where the run distils guidance, else at 1 (the student is guided when it
        samples)."""
        cfg = self.cfg
        student, teacher_denoiser = self.seeded(lambda: make_student(
            self.source.denoiser, step_conditioned, cfg.student, cfg.lora_rank, cfg.lora_alpha, w_conditioned))
        self.nets = {"student": student.train()}
        self.teacher = CFGTeacher(teacher_denoiser, self.w if cfg.guidance_mode == "distilled" else 1.0,
                                  self.source.uncond)
        return student

    def optim_groups(self) -> dict[str, OptimSpec]:
        raise NotImplementedError

    def to(self, device: torch.device) -> Method:
        """Move the frozen parts (teacher, cached teacher work) to ``device``; the trainer places ``nets``."""
        self.source.denoiser.to(device)
        return self

    def plan(self, generator: torch.Generator) -> dict:
        return {}

    def losses(self, plan: dict, micro: MicroBatch, generator: torch.Generator) -> Iterator[StepLoss]:
        raise NotImplementedError

    def precompute(self, draws: Iterator[tuple[dict, MicroBatch, torch.Generator]]) -> None:
        """Solve, into the run's ``teacher_cache``, the teacher targets the run will train on, without training
        (``python -m distill_core precompute``). ``draws`` yields every micro-batch of the run in order, with
        its iteration's plan and its generator (pulling one draws the plan). A method that trains on the
        teacher's pairs solves its pool; one whose targets depend on the student has none to solve ahead."""
        pairs = getattr(self, "pairs", None)
        if pairs is None:
            raise ValueError(f"method {self.name!r} has no teacher targets to solve ahead: its teacher sees the "
                             "student's samples or the data set's images")
        pairs.pool(next(self.source.denoiser.parameters()).device)

    def start_from(self, path: str) -> None:
        """The exported network's weights from the student file at ``path`` instead of the teacher's
        (``init_from``; ``student_files.start_from``: a student of this teacher). A method that keeps something
        made from the starting weights (LCM's target network theta-) makes it again here."""
        start_from(path, self.nets[self.exported], self.teacher_fingerprint)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def preview_steps(self) -> int:
        """The step count previews and grids show: the run's ``steps``."""
        return self.cfg.steps

    def preview(self, noise: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Images from the current exported network, sampled as its file will be."""
        raise NotImplementedError

    def card(self) -> dict:
        """The student file's card (most methods: ``student_card`` with their schedule and own entries)."""
        raise NotImplementedError

    def student_card(self, sigmas: dict[int, torch.Tensor], schedule: dict, training: dict | None = None,
                     **extra) -> dict:
        """A card with what every method writes into its student file (``student_files.student_card``): its name
        and sampler, the step counts of ``sigmas`` and their schedules, ``schedule`` (a name and its parameters)
        on [sigma_min, sigma_max], the run's guidance mode and w, the teacher's fingerprint and name, and under
        ``training`` the method's settings (``opts``, with ``training``'s entries over them: values it resolved)
        beside the run's lr, iterations, batch and student kind; ``extra``: the method's own entries."""
        cfg = self.cfg
        return student_card(
            self.name, self.sampler, list(sigmas), sigmas,
            {**schedule, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max},
            cfg.guidance_mode, self.w, self.teacher_fingerprint,
            teacher=self.source.name,
            training={**vars(self.opts), **(training or {}), "lr": cfg.lr, "iters": cfg.iters, "batch": cfg.batch,
                      "student": cfg.student},
            **extra,
        )

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    @classmethod
    def settings_for_steps(cls, steps: int) -> dict:
        """Settings that follow from a step count where a form asks only for one (SFD-v: its range)."""
        return {}

    @classmethod
    def bench_runs(cls, nfes: list[int], iters: int) -> list[tuple[str, dict]]:
        """The students a benchmark over ``nfes`` trains, each a run name and its settings (by default one
        student per NFE at ``iters`` iterations)."""
        return [(f"{cls.name}-{n}", {"steps": n, **cls.settings_for_steps(n)}) for n in nfes]

    @classmethod
    def steps_label(cls, config: dict) -> str | None:
        """The student's step count as a run's table shows it, from the run's config mapping."""
        steps = config.get("steps")
        return str(steps) if isinstance(steps, int) and not isinstance(steps, bool) else None
