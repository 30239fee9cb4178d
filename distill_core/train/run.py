"""A training run from a config and a teacher to a student file: what the command line, the nodes and
the benchmarks all call."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from distill_core.config import DistillConfig
from distill_core.methods.base import TeacherSource
from distill_core.methods.registry import build_method
from distill_core.students import save_student
from distill_core.train.callbacks import Callback, TqdmProgress
from distill_core.train.trainer import Trainer


@dataclass
class StudentRun:
    """A trained student file and what it cost."""

    path: Path
    train_seconds: float
    teacher_evaluations: int


def train_student(
    cfg: DistillConfig, source: TeacherSource, resume: bool = False, progress: bool = True,
    callbacks: tuple[Callback, ...] | list[Callback] = (),
) -> StudentRun | None:
    """Train ``cfg.method`` on ``source`` into ``cfg.out`` and save ``student.safetensors`` there
    (``None`` when training was interrupted: continue with ``resume=True``). ``callbacks`` see every
    iteration (progress bars of a host; one that raises stops the run after a checkpoint). The trainer
    moves the teacher to its device (CUDA when there is one); it is moved back where it was."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(out / "config.yaml")
    method = build_method(source, cfg)
    home = next(source.denoiser.parameters()).device
    bar = [TqdmProgress(f"{cfg.method} to {method.preview_steps()} steps")] if progress else []
    trainer = Trainer(method, cfg, out, [*bar, *callbacks])
    try:
        result = trainer.fit(resume=resume)
    finally:
        for name in method.nets:
            release_teacher(trainer.unwrapped(name))
        method.to(home)
    if result.status != "done":
        print(f"stopped at iteration {result.iteration}/{cfg.iters}; the checkpoint is in {trainer.ckpt_dir}")
        return None
    card = method.card()
    card["training"].update(
        seconds=round(result.seconds, 1),
        iterations=result.iteration,
        nonfinite_grads=result.nonfinite_grads,
        teacher_evaluations=result.teacher_evaluations,
    )
    path = save_student(out / "student.safetensors", result.student, card, method.file_tensors())
    return StudentRun(path, result.seconds, result.teacher_evaluations)


def release_teacher(net: torch.nn.Module) -> None:
    """Detach a LoRA student's adapters from the teacher network they were hooked into."""
    adapters = getattr(net, "lora", None)
    if adapters is not None:
        adapters.detach()
