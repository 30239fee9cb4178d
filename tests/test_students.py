"""Student files: metadata, round trip, clear errors, and sampling on the stored schedule."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import randomise
from safetensors.torch import save_file

import distill_core
from distill_core.builtin import fingerprint
from distill_core.config import DistillConfig
from distill_core.methods import build_method
from distill_core.methods.base import TeacherSource
from distill_core.sampling import few_step, sample
from distill_core.student_files import load_student, save_student
from distill_core.teacher import CFGTeacher


def _method(denoiser, classes: int = 0, **kw):
    """An SFD method of a tiny teacher; ``classes`` = 10 declares its conditions class labels (then the
    analytic first step is centred on the class means by default)."""
    source = TeacherSource(
        "tiny",
        denoiser,
        (1, 8, 8),
        lambda b, g: torch.randint(10, (b,), generator=g),
        torch.tensor([10]),
        2.0,
        classes,
    )
    return build_method(source, DistillConfig(**{"iters": 1, "batch": 2, **kw}))


def _trained_a_little(m):
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return m


@pytest.mark.parametrize(
    "kw", [{}, {"method": "sfd-v", "nfe_range": (2, 3)}, {"guidance_mode": "cfg", "afs": False},
           {"classes": 10}, {"classes": 10, "guidance_mode": "cfg"}]
)
def test_round_trip_samples_like_the_trained_student(tiny_edm, tmp_path, kw):
    m = _trained_a_little(_method(tiny_edm, **kw))
    path = save_student(tmp_path / "s.safetensors", m.student, m.card(), m.file_tensors())
    student = load_student(path, CFGTeacher(tiny_edm, 2.0, torch.tensor([10])))
    card = student.card
    assert card["method"] == m.name and card["engine_version"] == distill_core.__version__
    assert card["teacher_fingerprint"] == fingerprint(tiny_edm) and card["afs"] == kw.get("afs", True)
    assert card["schedule"] == {"name": "karras", "rho": 7.0, "sigma_min": 0.006, "sigma_max": 80.0}
    assert card["guidance"] == {"mode": kw.get("guidance_mode", "distilled"), "w": 2.0}
    assert ("nfe_range" in card) == (m.name == "sfd-v")
    class_mean = kw.get("classes", 0) > 0
    assert card["afs_center"] == ("class_mean" if class_mean else "zero")
    assert (student.afs_means is not None) == class_mean
    if class_mean:
        assert torch.equal(student.afs_means, m.afs_means) and student.afs_means.shape == (11, 1, 8, 8)

    x, y = torch.randn(3, 1, 8, 8) * 80, torch.tensor([0, 5, 9])
    for n in student.nfe_choices:
        assert torch.equal(student.sigmas(n), m.sigmas[n])
        assert torch.allclose(sample(student, x, y, steps=n), m.preview(x, y, nfe=n), atol=1e-5)


def test_sample_uses_the_stored_schedule(tiny_edm, tmp_path):
    m = _method(tiny_edm, steps=2)
    card = m.card()
    card["sigmas"]["2"] = [80.0, 10.0, 1.0, 0.1]
    student = load_student(save_student(tmp_path / "s.safetensors", m.student, card), tiny_edm)
    x = torch.randn(2, 1, 8, 8) * 80
    expected = few_step(m.student, x, torch.tensor([80.0, 10.0, 1.0, 0.1]), None, afs=True)
    assert torch.allclose(sample(student, x, None), expected, atol=1e-5)


def test_clear_errors(tiny_edm, tmp_path):
    m = _method(tiny_edm, method="sfd-v", nfe_range=(2, 4))
    path = save_student(tmp_path / "s.safetensors", m.student, m.card())
    other = randomise(copy.deepcopy(tiny_edm), seed=1)
    with pytest.raises(ValueError, match="different teacher"):
        load_student(path, other)
    student = load_student(path, tiny_edm)
    with pytest.raises(ValueError, match=r"trained for NFE 2\.\.4 cannot sample with 6 steps"):
        sample(student, torch.randn(1, 1, 8, 8), None, steps=6)
    with pytest.raises(ValueError, match="distilled into this student"):
        sample(student, torch.randn(1, 1, 8, 8), None, steps=2, w=4.0)

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(1)}, str(plain))
    with pytest.raises(ValueError, match="no comfyui-distill metadata"):
        load_student(plain, tiny_edm)
    from distill_core import safetensors_io

    safetensors_io.save_atomic({"w": torch.zeros(1)}, tmp_path / "t.safetensors", {"kind": "teacher"})
    with pytest.raises(ValueError, match="not a student file"):
        load_student(tmp_path / "t.safetensors", tiny_edm)


def test_a_class_mean_student_needs_its_table_and_class_labels(tiny_edm, tmp_path):
    m = _method(tiny_edm, classes=10, steps=2)
    student = load_student(save_student(tmp_path / "s.safetensors", m.student, m.card(), m.file_tensors()),
                           tiny_edm)
    x = torch.randn(2, 1, 8, 8) * 80
    with pytest.raises(ValueError, match="sample it with class labels"):
        sample(student, x, None)
    with pytest.raises(ValueError, match=r"class labels must lie in 0\.\.10"):
        sample(student, x, torch.tensor([3, 11]))
    without_table = save_student(tmp_path / "broken.safetensors", m.student, m.card())
    with pytest.raises(ValueError, match="holds no afs.class_means"):
        load_student(without_table, tiny_edm)
