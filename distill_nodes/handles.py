"""What travels between this pack's nodes on its own socket types: a teacher (``DISTILL_TEACHER``)
and a trained student (``DISTILL_STUDENT``, also the run handle)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distill_core import safetensors_io
from distill_core.methods.base import TeacherSource
from distill_core.student_files import borrowing
from distill_core.students import Student
from distill_core.teacher import CFGTeacher


@dataclass
class TeacherHandle:
    """A teacher ready to distil. ``build`` makes its TeacherSource; nodes call it inside
    ``torch.inference_mode(False)``, so nothing built for training is an inference tensor."""

    name: str
    build: Callable[[], TeacherSource]
    sigma_min: float  # the student schedule's end (EDM pixel models 0.006, SD latent models 0.1)
    guidance: float  # the CFG scale w the teacher samples with
    model: object = None  # the ComfyUI MODEL, None for the built-in teacher
    low_model: object = None  # a two-expert model's low-noise MODEL (Wan 2.2 14B); ``model`` is its high-noise one
    _source: TeacherSource | None = field(default=None, repr=False)

    @property
    def models(self) -> list:
        """The ComfyUI MODELs the teacher runs (none for the built-in teacher)."""
        return [m for m in (self.model, self.low_model) if m is not None]

    def source(self) -> TeacherSource:
        if self._source is None:
            with torch.inference_mode(False):
                self._source = self.build()
        return self._source


@dataclass
class StudentHandle:
    """A student file with the teacher it belongs to and the run that trained it."""

    path: Path
    teacher: TeacherHandle
    run_dir: Path | None = None
    model: object = None  # the student as a ComfyUI MODEL (ComfyUI teachers only)

    @property
    def card(self) -> dict:
        return safetensors_io.read_card(self.path)

    def loaded(self) -> contextlib.AbstractContextManager[Student]:
        """The student ready to sample with the engine; a LoRA student borrows the teacher's network
        (no copy) and gives it back at the end of the block (``borrowing``)."""
        source = self.teacher.source()
        return borrowing(self.path, CFGTeacher(source.denoiser, self.card["guidance"]["w"], source.uncond))
