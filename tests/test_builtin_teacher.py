"""The shipped teacher is good enough to distil: its 64-step Heun samples at the default guidance are
classified as the requested digit at least 90 % of the time by the shipped metric classifier
(measured: 100 of 100 at w = 2; ``bench/teacher_grid.py`` draws them in ``docs/teacher_heun64.png``)."""

from __future__ import annotations

import torch

from distill_core import builtin
from distill_core.eval.fidelity import reference_solve
from distill_core.eval.frechet import class_accuracy
from distill_core.teacher import CFGTeacher


def test_teacher_heun64_samples_are_the_requested_digits():
    labels = torch.arange(builtin.NUM_CLASSES).repeat_interleave(10)
    teacher = CFGTeacher(builtin.load_builtin_teacher(), w=builtin.DEFAULT_GUIDANCE,
                         uncond=torch.full((labels.shape[0],), builtin.NUM_CLASSES))
    noise = torch.randn((labels.shape[0], *builtin.SHAPE), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        images = reference_solve(teacher, noise * teacher.sigma_max, labels, steps=64)
    assert class_accuracy(images, labels) >= 0.9
