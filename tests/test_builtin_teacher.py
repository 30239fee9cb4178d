"""The shipped teacher is good enough to distil: its 64-step Heun samples at the default guidance are
classified as the requested digit at least 90 % of the time by the shipped metric classifier
(measured: 100 of 100 at w = 2; ``bench/teacher_grid.py`` draws them in ``docs/teacher_heun64.png``)."""

from __future__ import annotations

from distill_core import builtin
from distill_core.eval.benchmark import builtin_samples
from distill_core.eval.frechet import class_accuracy


def test_teacher_heun64_samples_are_the_requested_digits():
    images, labels = builtin_samples(builtin.DEFAULT_GUIDANCE, per_class=10, steps=64, seed=0)
    assert class_accuracy(images, labels) >= 0.9
