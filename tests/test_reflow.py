"""Reflow and knowledge distillation on the teacher's pairs: the pool, the straight segments, the one-step
student, their files and their resumes."""

from __future__ import annotations

import copy

import pytest
import torch

from distill_core.config import DistillConfig
from distill_core.methods import build_method
from distill_core.methods.base import MicroBatch
from distill_core.methods.reflow import straightness
from distill_core.methods.teacher_pairs import PairsConfig, TeacherPairs
from distill_core.safetensors_io import read_card
from distill_core.sampling import few_step, sample
from distill_core.schedules import karras
from distill_core.solvers import SOLVERS
from distill_core.student_files import load_student
from distill_core.teacher import CFGTeacher
from distill_core.train.run import train_student
from distill_core.train.trainer import Trainer
from tests.test_distribution import same_saved_state, tiny_source, whole_and_resumed


def method(tiny_edm, name="reflow", out=None, **kw):
    settings = {"method": name, "steps": 4 if name == "reflow" else 1, "batch": 8, "iters": 4, "pairs": 24,
                "pair_steps": 3, "seed": 1, "out": str(out or "unused"), "checkpoint_every": 2, **kw}
    return build_method(tiny_source(tiny_edm), DistillConfig(**settings))


def pool(tiny_edm, seed: int) -> TeacherPairs:
    source = tiny_source(tiny_edm)
    teacher = CFGTeacher(tiny_edm, 2.0, source.uncond)
    return TeacherPairs(teacher, source, PairsConfig(pairs=70, pair_steps=3), 0.006, 80.0, seed)


def test_the_pool_holds_the_teachers_images_of_its_noise_and_is_a_function_of_the_seed(tiny_edm):
    pairs = pool(tiny_edm, seed=3)
    z, cond, x0 = pairs.pool(torch.device("cpu"))
    assert z.shape == x0.shape == (70, 1, 8, 8) and cond.shape == (70,)
    assert pairs.evaluations == 70 * 6 * 2  # Heun, 3 steps to sigma_min: 6 evaluations, CFG's two passes
    teacher = CFGTeacher(tiny_edm, 2.0, torch.tensor([10]))
    direct = SOLVERS["heun"](teacher, z[:5] * 80.0, karras(3, 0.006, 80.0), cond[:5])
    assert torch.allclose(x0[:5], direct, atol=1e-5)
    again = pool(tiny_edm, seed=3).pool(torch.device("cpu"))
    assert torch.equal(again[0], z) and torch.equal(again[2], x0)
    assert not torch.equal(pool(tiny_edm, seed=4).pool(torch.device("cpu"))[0], z)
    gen = torch.Generator().manual_seed(0)
    dz, dcond, dx0 = pairs.draw(9, gen, torch.device("cpu"))
    rows = [int((z == row).flatten(1).all(1).nonzero()) for row in dz]  # every draw is a pair of the pool
    assert torch.equal(dx0, x0[rows]) and torch.equal(dcond, cond[rows])


def test_on_a_straight_segment_euler_lands_on_the_pairs_image_at_any_step_count(tiny_edm):
    m = method(tiny_edm)
    z, x0 = torch.randn(3, 1, 8, 8), torch.rand(3, 1, 8, 8) * 2 - 1
    x, sigma = m.inputs(z, x0, torch.Generator().manual_seed(0))
    assert torch.allclose(x, (1 - sigma.view(-1, 1, 1, 1) / 80.0) * x0 + sigma.view(-1, 1, 1, 1) * z)

    def oracle(x, sigma, cond=None):  # the denoiser whose ODE is the straight segment: D = x0 everywhere
        return x0

    for steps in (1, 2, 4, 7):
        grid = torch.cat([karras(steps, 0.006, 80.0)[:-1], torch.zeros(1)])
        assert torch.allclose(few_step(oracle, z * 80.0, grid, afs=False), x0, atol=1e-4)
    assert straightness(oracle, z, None, 0.006, 80.0) < 1e-3  # the path ends at sigma_min, a hair from x0
    teacher = CFGTeacher(tiny_edm, 2.0, torch.tensor([10]))
    assert straightness(teacher, z, torch.tensor([1, 2, 3]), 0.006, 80.0) > 0.05  # a curved ODE


def test_reflow_weights_its_regression_by_the_edm_weight(tiny_edm):
    m = method(tiny_edm)
    x0, denoised = torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)
    sigma = torch.tensor([0.5, 2.0])
    expected = ((1 / 0.25 + 4) + (1 / 4 + 4)) / 2  # mean over samples of lambda(sigma) x 1
    assert m.loss(denoised, x0, sigma).item() == pytest.approx(expected)


def test_reflow_fits_the_regression_onto_the_pairs(tiny_edm, tmp_path):
    cfg = DistillConfig(method="reflow", steps=2, batch=16, iters=120, pairs=32, pair_steps=3, lr=3e-3, seed=0,
                        out=str(tmp_path), checkpoint_every=0, eval_samples=4)
    untrained = build_method(tiny_source(copy.deepcopy(tiny_edm)), cfg)
    trainer = Trainer(build_method(tiny_source(copy.deepcopy(tiny_edm)), cfg), cfg)
    trainer.fit()

    def loss(m) -> float:  # the same 64 draws from the pool for both
        (step,) = m.losses({}, MicroBatch(0, 1, 64), torch.Generator().manual_seed(7))
        return float(step.loss.detach())

    assert loss(trainer.method) < 0.6 * loss(untrained)


@pytest.mark.parametrize("name", ["reflow", "kd"])
def test_the_student_file_samples_as_the_previews_did(tiny_edm, tmp_path, name):
    steps = 3 if name == "reflow" else 1
    cfg = DistillConfig(method=name, steps=steps, batch=4, iters=2, pairs=100, pair_steps=2, student="lora",
                        lora_rank=2, seed=1, out=str(tmp_path), checkpoint_every=0, eval_samples=4)
    run = train_student(cfg, tiny_source(copy.deepcopy(tiny_edm)), progress=False)
    card = read_card(run.path)
    assert card["sampler"] == "euler_afs" and card["afs"] is False and card["comfyui_sampler"] == "euler"
    assert len(card["sigmas"][str(steps)]) == steps + 1 and card["sigmas"][str(steps)][-1] == 0
    assert card["sigmas"][str(steps)][0] == 80.0
    student = load_student(run.path, tiny_edm, torch.tensor([10]))
    noise, cond = torch.randn(3, 1, 8, 8) * 80, torch.tensor([1, 2, 3])
    m = build_method(tiny_source(copy.deepcopy(tiny_edm)), cfg)
    m.student.lora.load_file_tensors(student.net.lora.file_tensors())
    assert torch.allclose(sample(student, noise, cond), m.preview(noise, cond), atol=1e-5)
    # the pool: the 8 pairs the run draws (of 100 asked) x Heun's 4 evaluations x CFG's two
    assert run.teacher_evaluations == 8 * 4 * 2


def test_knowledge_distillation_regresses_the_image_from_the_start_of_the_segment(tiny_edm):
    m = method(tiny_edm, "kd")
    z, x0 = torch.randn(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
    x, sigma = m.inputs(z, x0, torch.Generator())
    assert torch.equal(x, z * 80.0) and sigma.tolist() == [80.0, 80.0]
    (loss,) = m.losses({}, MicroBatch(0, 1, 4), torch.Generator().manual_seed(0))
    assert loss.group == "student" and loss.loss.item() > 0
    # one Euler step from sigma_max to 0 is the network's image at sigma_max
    assert m.sigmas.tolist() == [80.0, 0.0]
    start, cond = torch.randn(2, 1, 8, 8) * 80.0, torch.tensor([3, 4])
    assert torch.allclose(m.preview(start, cond), m.student(start, torch.tensor(80.0), cond), atol=1e-4)


def test_knowledge_distillation_refuses_more_than_one_step(tiny_edm):
    with pytest.raises(ValueError, match="one-step student, not 4 steps: set steps 1"):
        method(tiny_edm, "kd", steps=4)
    with pytest.raises(ValueError, match="guidance_mode 'distilled'"):
        method(tiny_edm, "reflow", guidance_mode="cfg")


@pytest.mark.parametrize("name", ["reflow", "kd"])
def test_a_resumed_run_solves_the_same_pool_and_ends_bit_exactly(tiny_edm, tmp_path, name):
    def trainer(out):
        m = method(copy.deepcopy(tiny_edm), name, out=out)
        return Trainer(m, m.cfg)

    whole, again = whole_and_resumed(trainer, tmp_path)
    assert again.iteration == whole.iteration == 4
    assert torch.equal(whole.method.pairs.pool(torch.device("cpu"))[2], again.method.pairs.pool(torch.device("cpu"))[2])
    assert all(torch.equal(a, b) for a, b in zip(whole.unwrapped("student").state_dict().values(),
                                                 again.unwrapped("student").state_dict().values(), strict=True))
    assert not same_saved_state(whole, trainer(tmp_path / "fresh"), "student")  # training moved the weights


def test_reflow_then_sfd_trains_the_student_on_the_reflowed_copys_trajectories(tiny_edm, tmp_path):
    m = method(tiny_edm, sfd_fraction=0.5)  # 4 iterations: 2 of reflow, then 2 of SFD
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        m.plan(gen)
        assert [s.index for s in m.losses({}, MicroBatch(0, 1, 4), gen)] == [0] and m.reflowed is None
    before = m.teacher_evaluations
    m.plan(gen)
    steps = list(m.losses({}, MicroBatch(0, 1, 4), gen))
    assert [s.index for s in steps] == [0, 1, 2, 3]  # one loss per Euler step of the 4-step student
    assert all(not p.requires_grad for p in m.reflowed.parameters())
    assert m.teacher_evaluations > before  # the reflowed copy's solves are counted

    def trainer(out):
        fresh = method(copy.deepcopy(tiny_edm), out=out, sfd_fraction=0.5, checkpoint_every=3)
        return Trainer(fresh, fresh.cfg)

    whole, again = whole_and_resumed(trainer, tmp_path, stop=3)  # resumed after the switch
    kept, restored = whole.method.reflowed.saved_state(), again.method.reflowed.saved_state()
    assert kept.keys() == restored.keys() and all(torch.equal(kept[k], restored[k]) for k in kept)
    assert all(torch.equal(a, b) for a, b in zip(whole.unwrapped("student").state_dict().values(),
                                                 again.unwrapped("student").state_dict().values(), strict=True))
