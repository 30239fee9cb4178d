"""The analytic first step's centre: SFD's 0 or the teacher's class means, estimated once, guided
linearly, used in training and sampling, and closer to the built-in teacher's own first step."""

from __future__ import annotations

import pytest
import torch

from distill_core.afs import afs_direction, class_means, guided_centers, resolve_center
from distill_core.config import DistillConfig
from distill_core.methods import build_method
from distill_core.methods.base import MicroBatch, TeacherSource
from distill_core.sampling import euler_step, sample
from distill_core.sources import builtin_source
from distill_core.student_files import load_student, save_student
from distill_core.teacher import CFGTeacher

NULL = torch.tensor([10])


def test_the_direction_is_taken_about_the_center():
    x, mu = torch.randn(3, 1, 4, 4) * 80, torch.randn(3, 1, 4, 4)
    assert torch.allclose(afs_direction(x, 80.0, mu), (x - mu) / (1 + 80.0**2) ** 0.5)
    assert torch.equal(afs_direction(x, 80.0), afs_direction(x, 80.0, torch.zeros(1, 1, 4, 4)))


def test_auto_centres_on_class_means_only_where_conditions_are_class_labels():
    assert resolve_center("auto", 10) == "class_mean" and resolve_center("auto", 0) == "zero"
    assert resolve_center("zero", 10) == "zero"
    with pytest.raises(ValueError, match="conditions are prompts: use afs_center 'zero'"):
        resolve_center("class_mean", 0)
    with pytest.raises(ValueError, match="afs_center must be one of"):
        DistillConfig(afs_center="mean")


def test_class_means_are_the_teachers_mean_at_sigma_max_and_guidance_combines_them(tiny_edm):
    rng = torch.get_rng_state()
    table = class_means(tiny_edm, 10, NULL, (1, 8, 8), 80.0, samples=16, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream is untouched
    assert table.shape == (11, 1, 8, 8)
    z = torch.randn((16, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for label in (0, 7, 10):
            direct = tiny_edm(80 * z, 80.0, torch.full((16,), label)).mean(0)
            assert torch.allclose(table[label], direct, atol=1e-6)
        # the mean of the guided D is the guided combination of the means (CFG is linear in D)
        labels = torch.tensor([2, 5])
        guided = CFGTeacher(tiny_edm, 3.0, NULL)
        expected = torch.stack([guided(80 * z, 80.0, torch.full((16,), int(c))).mean(0) for c in labels])
    assert torch.allclose(guided_centers(table, labels, 3.0), expected, atol=1e-5)
    assert torch.equal(guided_centers(table, labels, 1.0), table[labels])
    with pytest.raises(ValueError, match="null condition to be the label 10"):
        class_means(tiny_edm, 10, torch.tensor([0]), (1, 8, 8), 80.0, samples=2)
    with pytest.raises(ValueError, match="sample it with class labels"):
        guided_centers(table, torch.randn(2, 4), 2.0)


def _sfd(tiny_edm, **kw):
    source = TeacherSource("tiny", tiny_edm, (1, 8, 8), lambda b, g: torch.randint(10, (b,), generator=g), NULL,
                           2.0, 10)
    return build_method(source, DistillConfig(**{"iters": 2, "batch": 4, "steps": 3, "teacher_reuse": 1, **kw}))


@pytest.mark.parametrize("mode", ["distilled", "cfg"])
def test_training_takes_the_first_step_about_the_class_mean_at_the_teachers_scale(tiny_edm, mode):
    m = _sfd(tiny_edm, guidance_mode=mode)
    assert m.afs_center == "class_mean" and m.teacher_evaluations == 11 * 100
    drawn, seen = [], []
    trajectories = m.trajectories
    m.trajectories = lambda *a: drawn.append(trajectories(*a)) or drawn[-1]
    m.student.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    next(iter(m.losses(m.plan(torch.Generator()), MicroBatch(0, 1, 4), torch.Generator().manual_seed(0))))
    (x, cond, _), t = drawn[0], m.sigmas[3]
    w = 2.0 if mode == "distilled" else 1.0  # the teacher's scale in training
    expected = euler_step(None, x, t[0], t[1], analytic=True, center=guided_centers(m.afs_means, cond, w))
    assert torch.allclose(seen[0], expected, atol=1e-5)
    assert not torch.allclose(seen[0], euler_step(None, x, t[0], t[1], analytic=True), atol=1e-3)
    paper = _sfd(tiny_edm, guidance_mode=mode, afs_center="zero")
    assert paper.afs_means is None and paper.file_tensors() == {} and paper.card()["afs_center"] == "zero"


def test_on_the_builtin_teacher_the_class_mean_step_lands_near_the_teachers_own_step():
    """SFD's step about 0 lands about 0.63 rms from the teacher's Euler step at sigma 26; about the class
    means, about 0.1 (docs/sfd_recipes.md)."""
    source = builtin_source()
    table = class_means(source.denoiser, source.classes, source.uncond, source.shape, 80.0)
    teacher = CFGTeacher(source.denoiser, source.guidance, source.uncond)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn((64, *source.shape), generator=gen) * 80
    labels = torch.randint(10, (64,), generator=gen)
    t0, t1 = torch.tensor(80.0), torch.tensor(26.0)
    with torch.no_grad():
        teacher_step = euler_step(teacher, x, t0, t1, labels)
    about_zero = euler_step(None, x, t0, t1, analytic=True)
    about_means = euler_step(None, x, t0, t1, analytic=True, center=guided_centers(table, labels, source.guidance))
    rms_zero = (about_zero - teacher_step).square().mean().sqrt()
    rms_means = (about_means - teacher_step).square().mean().sqrt()
    assert rms_zero > 0.4 and rms_means < 0.3 * rms_zero


def test_a_cfg_student_samples_its_first_step_about_the_centre_at_the_chosen_scale(tiny_edm, tmp_path):
    m = _sfd(tiny_edm, guidance_mode="cfg")
    path = save_student(tmp_path / "s.safetensors", m.student, m.card(), m.file_tensors())
    student = load_student(path, CFGTeacher(tiny_edm, 2.0, NULL))
    seen = []
    student.net.register_forward_pre_hook(lambda mod, args: seen.append(args[0][:2].clone()))
    x, y, t = torch.randn(2, 1, 8, 8) * 80, torch.tensor([1, 6]), student.sigmas()
    for w in (3.0, 1.5):
        seen.clear()
        sample(student, x, y, w=w)
        expected = euler_step(None, x, t[0], t[1], analytic=True, center=guided_centers(student.afs_means, y, w))
        assert torch.allclose(seen[0], expected, atol=1e-5)
