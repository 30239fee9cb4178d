"""SFDDM: the student's subsequence of the teacher's steps, the single-fold target (one student step lands
where the teacher's c steps land), the zero loss of a student that is its teacher, the refusal without a
data set, training, the student file, bit-exact resumes and the one-step student."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from distill_core.config import DistillConfig
from distill_core.methods import build_method
from distill_core.methods.base import MicroBatch, TeacherSource
from distill_core.methods.sfd import SFD
from distill_core.methods.sfddm import SFDDM, SFDDMConfig, single_fold_target, student_indices
from distill_core.safetensors_io import read_card
from distill_core.sampling import few_step, sample
from distill_core.schedules import karras
from distill_core.solvers import SOLVERS
from distill_core.student_files import load_student
from distill_core.teacher import CFGTeacher
from distill_core.train.run import train_student
from distill_core.train.trainer import Trainer
from tests.test_distribution import same_saved_state, whole_and_resumed

CPU = torch.device("cpu")


def tiny_source(denoiser, w: float = 2.0, data: bool = True) -> TeacherSource:
    """The tiny teacher with a data set of 64 images in [-1, 1] and their classes."""
    gen = torch.Generator().manual_seed(11)
    images, labels = torch.rand(64, 1, 8, 8, generator=gen) * 2 - 1, torch.randint(10, (64,), generator=gen)

    def draw_data(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(64, (batch,), generator=generator)
        return images[idx], labels[idx]

    return TeacherSource("tiny", denoiser, (1, 8, 8), lambda b, g: torch.randint(10, (b,), generator=g),
                         torch.tensor([10]), w, classes=10, draw_data=draw_data if data else None)


def sfddm(tiny_edm, out=None, **kw) -> SFDDM:
    settings = {"method": "sfddm", "steps": 2, "teacher_steps": 8, "batch": 4, "iters": 4, "seed": 1,
                "feature_weight": 1.0, "out": str(out or "unused"), "checkpoint_every": 2, **kw}
    return build_method(tiny_source(tiny_edm), DistillConfig(**settings))


def one_loss(m: SFDDM, batch: int = 8, seed: int = 0) -> torch.Tensor:
    (step,) = list(m.losses({}, MicroBatch(0, 1, batch), torch.Generator().manual_seed(seed)))
    assert step.group == "student" and step.loss.ndim == 0 and step.loss.requires_grad == torch.is_grad_enabled()
    return step.loss


def test_without_a_data_set_sfddm_refuses_and_names_what_to_choose(tiny_edm):
    cfg = DistillConfig(method="sfddm", steps=2, teacher_steps=8)
    with pytest.raises(ValueError, match="without a data set: give it a data set of the model's images, or choose "
                       "method sfd"):
        build_method(tiny_source(tiny_edm, data=False), cfg)
    assert SFDDM.node is SFD.node and SFDDM.sampler == "euler_afs"


def test_the_student_steps_on_every_c_th_teacher_step_or_the_given_ones():
    assert student_indices(4, 32) == [0, 8, 16, 24, 32]
    assert student_indices(1, 32) == [0, 32]
    assert student_indices(3, 8) == [0, 2, 5, 8]  # floor(k T / T') where T' does not divide T
    assert student_indices(3, 8, "0, 1, 4") == [0, 1, 4, 8]
    assert torch.allclose(karras(32, 0.006, 80.0)[student_indices(4, 32)], karras(4, 0.006, 80.0), rtol=1e-5)
    for indices, error in [("0,4,2", "must increase"), ("1,2,3", "must start at 0"), ("0,4,8", "below teacher_steps"),
                           ("0,4", "3 of them"), ("0,x,2", "comma-separated integers"), ("0,2,2", "must increase")]:
        with pytest.raises(ValueError, match=error):
            student_indices(3, 8, indices)
    with pytest.raises(ValueError, match="must not exceed teacher_steps 8"):
        student_indices(9, 8)


def test_one_step_with_the_target_lands_where_the_teachers_c_steps_land(tiny_edm):
    teacher = CFGTeacher(tiny_edm, 2.0, torch.tensor([10]))
    grid = karras(12, 0.006, 80.0)
    x, y = torch.randn(3, 1, 8, 8) * 5, torch.tensor([1, 2, 3])
    start, stop = torch.tensor([0, 3, 8]), torch.tensor([3, 8, 12])  # c = 3, 5, 4: one sample per student step
    target, landing = single_fold_target(teacher, x, y, grid, start, stop)
    span = (grid[stop] - grid[start]).view(-1, 1, 1, 1)
    assert torch.allclose(x + span * target, landing, atol=1e-5 * float(landing.abs().max()))
    with torch.no_grad():
        for b in range(3):
            alone = SOLVERS["euler"](teacher, x[b:b + 1], grid[int(start[b]):int(stop[b]) + 1], y[b:b + 1])
            assert torch.allclose(landing[b:b + 1], alone, atol=1e-5 * float(alone.abs().max()))
    # one teacher step: the target is the teacher's own noise prediction, bit for bit
    target, _ = single_fold_target(teacher, x, y, grid, start, start + 1)
    with torch.no_grad():
        s = grid[start]
        assert torch.equal(target, (x - teacher(x, s, y)) / s.view(-1, 1, 1, 1))


@pytest.mark.parametrize("student", ["full", "lora"])
def test_a_student_that_is_its_teacher_has_zero_loss_at_c_one(tiny_edm, student):
    """c = 1 at initialisation: the one teacher step is the student's own step, and their feature maps are one."""
    assert one_loss(sfddm(copy.deepcopy(tiny_edm), steps=4, teacher_steps=4, guidance=1.0, student=student,
                          lora_rank=2)).item() == 0.0
    assert one_loss(sfddm(copy.deepcopy(tiny_edm), steps=4, teacher_steps=4, guidance_mode="cfg",
                          student=student, lora_rank=2)).item() == 0.0
    assert one_loss(sfddm(copy.deepcopy(tiny_edm), steps=4, teacher_steps=8, guidance=1.0, student=student,
                          lora_rank=2)).item() > 1e-3
    # the distilled guidance: the student (the conditional teacher) is not yet the guided teacher
    assert one_loss(sfddm(copy.deepcopy(tiny_edm), steps=4, teacher_steps=4, student=student,
                          lora_rank=2)).item() > 1e-3


def test_the_loss_is_the_noise_match_plus_the_weighted_feature_match(tiny_edm):
    m = sfddm(tiny_edm, steps=2, teacher_steps=8, feature_weight=0.0)
    weighted = sfddm(tiny_edm, steps=2, teacher_steps=8, feature_weight=3.0)
    plain, both = one_loss(m).item(), one_loss(weighted).item()
    features = one_loss(sfddm(tiny_edm, steps=2, teacher_steps=8, feature_weight=1.0)).item() - plain
    assert features > 1e-4 and both == pytest.approx(plain + 3 * features, rel=1e-4)
    assert m.teacher_evaluations == 8 * 4 * 2  # 8 samples x c = 4 teacher steps x a CFG pair
    assert m.heads == (None, None) and weighted.heads[0] is not tiny_edm.net.out
    assert DistillConfig(method="sfddm").feature_weight == SFDDMConfig.feature_weight == 0.0
    assert weighted.heads[1] is tiny_edm.net.out
    # at initialisation the student's map is the conditional one: |h_c - (h_u + w (h_c - h_u))| = (w - 1) |h_c - h_u|
    x, y, k = m.inputs(8, torch.Generator().manual_seed(0), CPU)
    s = m.grid[torch.tensor(m.indices)[k]]
    caught = []
    hook = tiny_edm.net.out.register_forward_pre_hook(lambda mod, args: caught.append(args[0]))
    with torch.no_grad():
        tiny_edm(x, s, y), tiny_edm(x, s, torch.full_like(y, 10))
    hook.remove()
    assert features == pytest.approx((2.0 - 1) * (caught[0] - caught[1]).abs().mean().item(), rel=1e-3)


def test_training_lowers_the_loss_on_held_out_draws(tiny_edm, tmp_path):
    m = sfddm(tiny_edm, out=tmp_path, steps=2, teacher_steps=8, iters=40, batch=16, lr=5e-3, checkpoint_every=0,
              feature_weight=SFDDMConfig.feature_weight)  # the default: the noise match alone

    def held_out() -> float:  # the same draw of images, steps and noise, from a seed training never uses
        m.to(CPU)  # the trainer leaves the teacher and the student on its device
        m.student.to(CPU)
        with torch.no_grad():
            return one_loss(m, batch=32, seed=123).item()

    before = held_out()
    result = Trainer(m, m.cfg).fit()
    after = held_out()
    assert result.iteration == 40 and after < 0.6 * before, (before, after)


def test_the_student_file_samples_as_the_previews_did(tiny_edm, tmp_path):
    cfg = DistillConfig(method="sfddm", steps=2, teacher_steps=8, batch=4, iters=2, student="lora", lora_rank=2,
                        feature_weight=1.0, seed=1, out=str(tmp_path), checkpoint_every=0, eval_samples=4)
    source = tiny_source(copy.deepcopy(tiny_edm))
    run = train_student(cfg, source, progress=False)
    card = read_card(run.path)
    grid = karras(8, 0.006, 80.0)
    assert card["method"] == "sfddm" and card["sampler"] == "euler_afs" and card["afs"] is False
    assert card["sigmas"]["2"] == pytest.approx(grid[[0, 4, 8]].tolist())
    assert card["schedule"]["teacher_steps"] == 8 and card["schedule"]["indices"] == [0, 4, 8]
    assert card["schedule"]["c"] == 4 and card["student"]["kind"] == "lora"
    student = load_student(run.path, tiny_edm, torch.tensor([10]))
    noise, cond = torch.randn(3, 1, 8, 8) * 80, torch.tensor([1, 2, 3])
    m = build_method(tiny_source(copy.deepcopy(tiny_edm)), cfg)
    m.student.lora.load_file_tensors(student.net.lora.file_tensors())
    previewed = m.preview(noise, cond)
    assert torch.allclose(sample(student, noise, cond), previewed, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(few_step(m.student, noise, grid[[0, 4, 8]], cond, afs=False), previewed)
    assert not any(fn for layer in source.denoiser.modules() for fn in layer._forward_pre_hooks.values())
    custom = build_method(source, cfg.replace(indices="0,1")).card()["schedule"]
    assert custom["indices"] == [0, 1, 8] and custom["c"] is None


@pytest.mark.parametrize("student", ["lora", "full"])
def test_sfddm_resumes_bit_exactly(tiny_edm, tmp_path, student):
    def trainer(out):
        m = sfddm(copy.deepcopy(tiny_edm), out=out, student=student, lora_rank=2)
        return Trainer(m, m.cfg)

    whole, again = whole_and_resumed(trainer, tmp_path)
    assert again.iteration == whole.iteration == 4
    assert same_saved_state(whole, again, "student")
    lines = [json.loads(x)["loss"] for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    split = [json.loads(x)["loss"] for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert lines == split and len(lines) == 4 and all(list(r) == ["0"] and r["0"] > 0 for r in lines)
    assert again.teacher_evaluations() == whole.teacher_evaluations() == 4 * 4 * 4 * 2


def test_a_one_step_student_goes_from_sigma_max_to_sigma_min(tiny_edm):
    m = sfddm(tiny_edm, steps=1, teacher_steps=6)
    assert m.indices == [0, 6] and m.sigmas.tolist() == pytest.approx([80.0, 0.006])
    assert one_loss(m, batch=4).item() > 0 and m.teacher_evaluations == 4 * 6 * 2
    calls = []
    m.student.register_forward_pre_hook(lambda mod, args: calls.append(float(torch.as_tensor(args[1]).flatten()[0])))
    noise = torch.randn(2, 1, 8, 8) * 80
    image = m.preview(noise, torch.tensor([3, 4]))
    with torch.no_grad():
        expected = noise + (0.006 - 80.0) * (noise - m.student(noise, 80.0, torch.tensor([3, 4]))) / 80.0
    assert calls[0] == pytest.approx(80.0) and torch.allclose(image, expected, atol=1e-4)


def test_the_benchmark_trains_the_folds_of_the_teachers_steps_beside_the_asked_ones():
    runs = SFDDM.bench_runs([1, 4], 200)
    assert [name for name, _ in runs] == ["sfddm-1", "sfddm-4", "sfddm-8", "sfddm-16"]
    assert [settings["steps"] for _, settings in runs] == [1, 4, 8, 16]
