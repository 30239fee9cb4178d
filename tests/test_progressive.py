"""Progressive distillation: the two-step target, the nested grids, the rounds and their teachers, the
truncated-SNR loss, data-free inputs, a bit-exact resume across a round boundary, and the student file."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from conftest import hooks

from distill_core.config import DistillConfig
from distill_core.methods import build_method
from distill_core.methods.base import MicroBatch
from distill_core.methods.progressive import (
    ddim,
    round_of,
    start_steps,
    truncated_snr_loss,
    two_step_target,
)
from distill_core.methods.teacher_pairs import training_images
from distill_core.safetensors_io import read_card
from distill_core.sampling import few_step, sample
from distill_core.schedules import karras
from distill_core.student_files import load_student
from distill_core.teacher import CFGTeacher
from distill_core.train.run import train_student
from distill_core.train.trainer import Trainer
from tests.test_distribution import same_saved_state, tiny_source, whole_and_resumed, with_data


def progressive(tiny_edm, out=None, data=True, **kw):
    settings = {"method": "progressive", "steps": 1, "start_steps": 4, "batch": 4, "iters": 6, "student": "lora",
                "lora_rank": 2, "seed": 1, "out": str(out or "unused"), "checkpoint_every": 2, "pairs": 8,
                "pair_steps": 2, **kw}
    source = tiny_source(tiny_edm)
    return build_method(with_data(source) if data else source, DistillConfig(**settings))


def test_the_target_makes_one_student_step_land_on_the_teachers_two_steps(tiny_edm):
    teacher = CFGTeacher(tiny_edm, 2.0, torch.tensor([10]))
    gen = torch.Generator().manual_seed(0)
    x0, cond = torch.randn(3, 1, 8, 8, generator=gen), torch.tensor([1, 4, 7])
    s, s_mid = torch.tensor([80.0, 2.5, 0.02]), torch.tensor([40.0, 1.0, 0.011])
    s_next = torch.tensor([9.0, 0.3, 0.006])
    x_t = x0 + s.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen)
    with torch.no_grad():
        x_next = ddim(teacher, ddim(teacher, x_t, s, s_mid, cond), s_mid, s_next, cond)
        for k in range(3):  # per-sample DDIM is the engine's Euler on each sample's own grid
            grid = torch.stack([s[k], s_mid[k], s_next[k]])
            assert torch.allclose(x_next[k:k + 1], few_step(teacher, x_t[k:k + 1], grid, cond[k:k + 1], afs=False),
                                  rtol=1e-5, atol=1e-5)
    target = two_step_target(x_t, s, s_next, x_next)
    landed = ddim(lambda x, sigma, c: target, x_t, s, s_next, cond)
    assert torch.allclose(landed, x_next, rtol=1e-5, atol=1e-4)
    assert (landed - x_next).abs().max() < 1e-4
    # on the last interval (s'' = sigma_min) the target is close to the teacher's image x'' itself
    assert (target[2] - x_next[2]).abs().max() < 0.6 * (x_t[2] - x_next[2]).abs().max()


def test_the_loss_weights_the_squared_error_by_the_truncated_snr():
    d, target = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    target[1] *= 2
    s = torch.tensor([0.5, 3.0])
    # max(1 / 0.25, 1) = 4 on an error of 1; max(1 / 9, 1) = 1 on an error of 4: the mean over 8 elements
    assert truncated_snr_loss(d, target, s).item() == pytest.approx((4 * 1 * 4 + 1 * 4 * 4) / 8)


def test_the_grids_nest_round_after_round(tiny_edm):
    m = progressive(tiny_edm, steps=2, start_steps=16, iters=8)
    assert m.rounds == 4 and m.card()["rounds"] == [16, 8, 4, 2]
    assert torch.equal(m.finest, karras(32, 0.006, 80.0))
    for r in range(m.rounds):
        teacher, student = m.teacher_grid(r), m.student_grid(r)
        assert len(teacher) == 32 // 2**r + 1 and len(student) == 16 // 2**r + 1
        assert torch.equal(teacher[::2], student) and teacher[0] == 80.0 and student[-1] == teacher[-1]
        if r + 1 < m.rounds:
            assert torch.equal(m.teacher_grid(r + 1), student)  # round r's student is round r + 1's teacher
    assert torch.equal(m.sigmas, m.student_grid(3))
    assert torch.allclose(m.sigmas, karras(2, 0.006, 80.0)) and m.sigmas[-1] == pytest.approx(0.006)


def test_start_steps_are_steps_times_a_power_of_two(tiny_edm):
    assert [start_steps(s, None) for s in (1, 3, 4, 5, 16, 64)] == [32, 24, 32, 20, 32, 64]
    assert start_steps(4, 64) == 64 and start_steps(4, 4) == 4
    for wrong in (12, 2, 40):
        with pytest.raises(ValueError, match=f"^start_steps {wrong} must be steps 4 times a power of two"):
            progressive(tiny_edm, steps=4, start_steps=wrong)
    with pytest.raises(ValueError, match="3 rounds .* need at least 3 iterations"):
        progressive(tiny_edm, iters=2)
    with pytest.raises(ValueError, match="guidance_mode 'distilled'"):
        progressive(tiny_edm, guidance_mode="cfg")


def test_iterations_split_evenly_over_the_rounds_and_each_round_freezes_its_teacher(tiny_edm):
    assert [round_of(k, 10, 4) for k in range(10)] == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    assert [round_of(k, 6, 3) for k in range(6)] == [0, 0, 1, 1, 2, 2]
    m = progressive(tiny_edm)
    gen = torch.Generator().manual_seed(0)
    x, sigma, cond = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 0.5]), torch.tensor([1, 2])
    rounds, frozen = [], []
    for _ in range(6):
        plan = m.plan(gen)
        rounds.append(plan["round"])
        (step,) = m.losses(plan, MicroBatch(0, 1, 4), gen)
        assert step.index == plan["round"] and step.loss.ndim == 0 and step.loss.requires_grad
        teacher, evaluations = m.round_teacher()
        with torch.no_grad():
            if plan["round"] == 0:  # the guided teacher at the run's w
                assert m.frozen is None and evaluations == 2 and teacher is m.teacher and teacher.w == 2.0
            else:  # the student as it was when the round began, at w = 1
                began = frozen[-1] is not m.frozen
                assert evaluations == 1 and torch.equal(teacher(x, sigma, cond), m.student(x, sigma, cond)) == began
        frozen.append(m.frozen)
        with torch.no_grad():  # the student moves on; the round's teacher stays as it was
            for p in m.student.lora.parameters():
                p.add_(0.01)
    assert rounds == [0, 0, 1, 1, 2, 2]
    assert frozen[0] is None and frozen[2] is frozen[3] is not frozen[4]
    assert all(torch.allclose(frozen[4][k], v + 0.02) for k, v in frozen[2].items())
    # round 0: two guided evaluations per sample (CFG: two passes); rounds 1, 2: two of the frozen student
    assert m.teacher_evaluations == 2 * 4 * (2 * 2 + 4 * 1)


def test_inputs_noise_the_data_set_or_the_teachers_own_images(tiny_edm):
    m = progressive(tiny_edm)
    assert m.inputs == "data" and m.pairs is None
    x0, _, _ = training_images(m.source, m.pairs, 3, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(x0, with_data(tiny_source(tiny_edm)).draw_data(3, torch.Generator())[0])  # the squares
    free = progressive(tiny_edm, data=False)
    assert free.inputs == "pairs" and free.source.draw_data is None
    x0, cond, spent = training_images(free.source, free.pairs, 3, torch.Generator().manual_seed(0),
                                      torch.device("cpu"))
    z, pool_cond, pool_x0 = free.pairs.pool(torch.device("cpu"))
    assert x0.shape == (3, 1, 8, 8) and any(torch.equal(x0[0], y) for y in pool_x0)
    assert spent == free.pairs.evaluations > 0  # the pool, solved on the first draw
    (step,) = free.losses(free.plan(torch.Generator()), MicroBatch(0, 1, 4), torch.Generator().manual_seed(1))
    assert torch.isfinite(step.loss)
    replaced = dataclasses.replace(tiny_source(tiny_edm), draw_data=None)
    cfg = DistillConfig(method="progressive", steps=1, start_steps=2, iters=2, batch=2, inputs="data")
    with pytest.raises(ValueError, match="inputs 'data' needs the teacher's data set.*set inputs to pairs"):
        build_method(replaced, cfg)
    assert build_method(with_data(tiny_source(tiny_edm)), cfg.replace(inputs="pairs")).pairs is not None


@pytest.mark.parametrize("student", ["lora", "full"])
def test_a_resume_across_a_round_boundary_is_bit_exact(tiny_edm, tmp_path, student):
    def trainer(out):
        m = progressive(copy.deepcopy(tiny_edm), out=out, student=student)
        return Trainer(m, m.cfg)

    whole, again = whole_and_resumed(trainer, tmp_path, stop=3)  # stopped in round 1, resumed into round 2
    assert again.iteration == whole.iteration == 6 and again.method.round == whole.method.round == 2
    assert same_saved_state(whole, again, "student")
    assert whole.method.frozen.keys() == again.method.frozen.keys()
    assert all(torch.equal(v, again.method.frozen[k]) for k, v in whole.method.frozen.items())
    lines = [json.loads(x)["loss"] for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    split = [json.loads(x)["loss"] for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert lines == split and [list(r) for r in lines] == [["0"], ["0"], ["1"], ["1"], ["2"], ["2"]]
    assert again.teacher_evaluations() == whole.teacher_evaluations() == 4 * 2 * (2 * 2 + 4 * 1)


def test_the_student_file_samples_as_the_previews_did(tiny_edm, tmp_path):
    cfg = DistillConfig(method="progressive", steps=2, start_steps=4, batch=4, iters=2, student="lora", lora_rank=2,
                        seed=1, out=str(tmp_path), checkpoint_every=0, eval_samples=4)
    source = with_data(tiny_source(copy.deepcopy(tiny_edm)))
    run = train_student(cfg, source, progress=False)
    card = read_card(run.path)
    assert card["sampler"] == "euler_afs" and card["afs"] is False and card["comfyui_sampler"] == "euler"
    assert card["start_steps"] == 4 and card["rounds"] == [4, 2] and card["training"]["inputs"] == "data"
    assert card["sigmas"]["2"] == pytest.approx(karras(2, 0.006, 80.0).tolist()) and card["nfe"] == 2
    student = load_student(run.path, tiny_edm, torch.tensor([10]))
    noise, cond = torch.randn(3, 1, 8, 8) * 80, torch.tensor([1, 2, 3])
    m = build_method(with_data(tiny_source(copy.deepcopy(tiny_edm))), cfg)
    m.student.lora.load_file_tensors(student.net.lora.file_tensors())
    assert any(p.abs().sum() > 0 for n, p in m.student.lora.named_parameters() if "lora_up" in n)  # it trained
    assert torch.allclose(sample(student, noise, cond), m.preview(noise, cond), atol=1e-5)
    assert hooks(source.denoiser) == 0
