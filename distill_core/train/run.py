"""A training run from a config and a teacher to a student file: what the command line, the nodes and
the benchmarks all call."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from distill_core.builtin import CAST_DTYPES, cast_precision, cast_weights
from distill_core.config import DistillConfig
from distill_core.fp8 import FP8
from distill_core.memory_plan import MemoryPlan
from distill_core.methods.base import TeacherSource
from distill_core.methods.registry import build_method
from distill_core.student_files import release_teacher, save_student
from distill_core.train.callbacks import Callback, TqdmProgress
from distill_core.train.checkpoint import CHECKPOINTS, checkpoint_info, has_checkpoint
from distill_core.train.optim import keep_trainables_float32
from distill_core.train.resume import resume_changes
from distill_core.train.runlock import main_process, run_lock
from distill_core.train.trainer import Trainer

#: the student file a run writes into its folder
STUDENT_FILE = "student.safetensors"


@dataclass
class StudentRun:
    """A trained student file and what it cost; ``trained_params``: the trainable parameters of every network
    the method trained (a LoRA student's adapters, a two-network method's both); ``memory_plan``: the plan
    the run started with; ``main_process``: whether this process is the one that reports (under a
    multi-process launch, one of them); ``device``: where it trained (its evaluation runs there too)."""

    path: Path
    train_seconds: float
    teacher_evaluations: int
    trained_params: int
    memory_plan: MemoryPlan
    main_process: bool = True
    device: torch.device = torch.device("cpu")


def train_student(
    cfg: DistillConfig, source: TeacherSource, resume: bool = False, progress: bool = True,
    callbacks: tuple[Callback, ...] | list[Callback] = (),
) -> StudentRun | None:
    """Train ``cfg.method`` on ``source`` into ``cfg.out`` and save ``student.safetensors`` there
    (``None`` when training was interrupted: continue with ``resume=True``). ``callbacks`` see every
    iteration (progress bars of a host; one that raises stops the run after a checkpoint). The trainer
    moves the teacher to its device (CUDA when there is one); it is moved back where it was. The run folder
    is locked for the run (``runlock``); a resume is checked against the checkpoint before anything in the
    folder is written."""
    out = Path(cfg.out)
    if source.uncond is None and source.scale(cfg.guidance) != 1:
        raise ValueError(f"guidance {source.scale(cfg.guidance):g} needs the teacher's unconditional condition, "
                         f"and {source.name} has none: give its null class (--null-class K), or guidance 1")
    cfg = within_trained_range(cfg, source.denoiser)
    with run_lock(out):
        if resume:
            resume_changes(checkpoint_info(out / CHECKPOINTS)["config"], cfg, out / CHECKPOINTS)
        if main_process():  # one writer: another process's write could meet the folder not made yet
            cfg.to_yaml(out / "config.yaml")
        return _train(cfg, source, out, resume, progress, callbacks)


def refuse_replacing(out: str | Path, choices: str) -> None:
    """Refuse a new run in ``out`` while the folder holds another run's work (its student, its checkpoints),
    which the new run would replace; ``choices`` says, in the caller's words, how to continue it, replace it
    or keep it."""
    out = Path(out)
    held = [name for name, there in ((STUDENT_FILE, (out / STUDENT_FILE).is_file()),
                                     (f"{CHECKPOINTS}/", has_checkpoint(out / CHECKPOINTS))) if there]
    if held:
        raise ValueError(f"{out} holds a run ({', '.join(held)}), which a new run would replace: {choices}")


def within_trained_range(cfg: DistillConfig, denoiser) -> DistillConfig:
    """``cfg`` with the student's schedule ending inside the teacher's trained noise range: a ``sigma_min``
    below the teacher's lowest trained sigma (a DDPM model's first step, e.g. 0.029 for Stable Diffusion) is
    raised to it, with one line that says so (the network has never seen noise that low); one at or above the
    schedule's top (``sigma_max``, by default the teacher's) is refused."""
    top = cfg.sigma_max or float(getattr(denoiser, "sigma_max", math.inf))
    if cfg.sigma_min >= top:
        raise ValueError(f"sigma_min {cfg.sigma_min:g} lies at or above the schedule's top, sigma_max {top:g} (the "
                         "teacher's noise level at the first step): give a sigma_min below it")
    floor = float(getattr(denoiser, "sigma_min", 0.0))
    if cfg.sigma_min >= floor:
        return cfg
    print(f"sigma_min {cfg.sigma_min:g} is below the teacher's trained range (its lowest sigma is {floor:.4g}): "
          f"the student's schedule ends at {floor:.4g}; set sigma_min to {floor:.4g} or higher to silence this")
    return cfg.replace(sigma_min=floor)


def _train(cfg: DistillConfig, source: TeacherSource, out: Path, resume: bool, progress: bool,
           callbacks) -> StudentRun | None:
    frozen_precision(cfg, source)
    method = build_method(source, cfg)
    if cfg.init_from and not resume:  # a resumed run's weights are its checkpoint's
        keep_trainables_float32(method.nets[method.exported])  # the file's weights, not rounded to a bf16 copy's
        method.start_from(cfg.init_from)
    home = next(source.denoiser.parameters()).device
    bar = [TqdmProgress(f"{cfg.method} to {method.preview_steps()} steps")] if progress else []
    trainer = Trainer(method, cfg, out, [*bar, *callbacks])
    try:
        result = trainer.fit(resume=resume)
    finally:
        for name in method.nets:
            release_teacher(trainer.unwrapped(name))
        if not trainer.sharded:  # a sharded teacher stays in its shards: the caller loads it again to use it
            method.to(home)
    if result.status != "done":
        print(f"stopped at iteration {result.iteration}/{cfg.iters}; the checkpoint is in {trainer.ckpt_dir}")
        return None
    card = {**method.card(), **source.card}
    if cfg.frozen_precision != "as-loaded":  # the precision the frozen base computed in, which a LoRA samples on
        card["frozen_precision"] = cfg.frozen_precision
    card["training"].update(
        seconds=round(result.seconds, 1),
        iterations=result.iteration,
        nonfinite_grads=result.nonfinite_grads,
        teacher_evaluations=result.teacher_evaluations,
    )
    if cfg.init_from:
        card["training"]["init_from"] = Path(cfg.init_from).name
    path = out / STUDENT_FILE
    if trainer.acc.is_main_process:  # every process holds the same student; one writes it
        save_student(path, result.student, card, method.file_tensors())
    trainer.acc.wait_for_everyone()
    trained = sum(p.numel() for params in trainer.params.values() for p in params)
    return StudentRun(path, result.seconds, result.teacher_evaluations, trained, trainer.memory_plan,
                      trainer.acc.is_main_process, trainer.acc.device)


def precompute_targets(cfg: DistillConfig, source: TeacherSource) -> tuple[int, float]:
    """Solve every teacher target of the run ``cfg`` describes into ``cfg.teacher_cache`` without training
    (the run then reads them instead of solving); returns the entries written and the seconds it took."""
    if cfg.teacher_cache is None:
        raise ValueError("precompute writes the run's teacher targets into a folder: give --teacher-cache DIR")
    cfg = within_trained_range(cfg, source.denoiser)
    frozen_precision(cfg, source)
    folder = Path(cfg.teacher_cache)
    before = set(folder.glob("*.safetensors"))
    start = time.perf_counter()
    method = build_method(source, cfg)
    home = next(source.denoiser.parameters()).device
    trainer = Trainer(method, cfg)
    try:
        trainer.precompute()
    finally:
        for name in method.nets:
            release_teacher(trainer.unwrapped(name))
        method.to(home)
    return len(set(folder.glob("*.safetensors")) - before), time.perf_counter() - start


def frozen_precision(cfg: DistillConfig, source: TeacherSource) -> None:
    """The teacher in the precision the run's ``frozen_precision`` asks for: cast in place (bf16; fp8, which only a
    LoRA student's frozen base can be), or as loaded; a teacher an earlier run of this process cast to another
    precision can no longer be (a cast is not undone): refused."""
    wanted = CAST_DTYPES.get(cfg.frozen_precision)
    if wanted == FP8 and (cfg.student != "lora" or cfg.shard_teacher):
        raise ValueError("frozen_precision fp8 keeps the frozen base's weights in 8 bits, which only a LoRA student "
                         "trains on, and not in shards: give student lora, without shard_teacher, or frozen_precision "
                         "bf16")
    cast = cast_precision(source.denoiser)
    names = {dtype: name for name, dtype in CAST_DTYPES.items()}
    if cast is not None and cast != wanted:
        raise ValueError(f"this teacher's weights were cast to {names[cast]} by an earlier run in this process "
                         f"(frozen_precision {names[cast]}), which cannot be undone: load the teacher again for a run "
                         f"in another precision, or give this run frozen_precision {names[cast]} too")
    if wanted is not None and cast is None:
        cast_frozen_teacher(source, wanted)


def cast_frozen_teacher(source: TeacherSource, dtype: torch.dtype) -> None:
    """The teacher's weights in ``dtype``, in place (``frozen_precision``); trained networks copied from it or
    adapters on it are kept in float32 by the trainer. A host's model (ComfyUI's) is refused: the host owns
    its precision (ComfyUI's loaders choose it)."""
    if source.stock_sampling:
        raise ValueError("frozen_precision applies to teachers the engine loads; a ComfyUI model keeps the precision "
                         "its loader gave it (choose weight_dtype in the loader)")
    cast_weights(source.denoiser, dtype)  # its students still name the teacher as loaded
