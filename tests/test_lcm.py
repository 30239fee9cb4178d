"""LCM and LCM-LoRA: the boundary scalings on the skeleton, the sampling points, the teacher's one guided step
and the loss it feeds, the EMA target, the w embedding and the student file that keeps it, LCM-LoRA's shared
base without EMA, the refusals, data-free inputs, bit-exact resumes and a falling loss."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from distill_core.config import DistillConfig
from distill_core.methods.base import MicroBatch, TeacherSource
from distill_core.methods.lcm import LCM, LCMLoRA, boundary_scalings, karras_position, sampling_sigmas
from distill_core.methods.sfd import distance
from distill_core.methods.teacher_pairs import training_images
from distill_core.safetensors_io import load
from distill_core.sampling import sample
from distill_core.schedules import karras
from distill_core.student_files import load_student
from distill_core.students import AdaptersOff
from distill_core.teacher import CFGTeacher
from distill_core.train.run import train_student
from distill_core.train.trainer import Trainer
from tests.test_distribution import same_saved_state, storage, tiny_source, whole_and_resumed, with_data

CPU = torch.device("cpu")


def lcm(tiny_edm, out=None, data: bool = True, method: str = "lcm", **kw):
    settings = {"method": method, "steps": 4, "batch": 4, "iters": 4, "seed": 1, "skeleton": 10, "pairs": 8,
                "pair_steps": 2, "out": str(out or "unused"), "checkpoint_every": 2,
                **({"student": "lora", "lora_rank": 2} if method == "lcm-lora" else {}), **kw}
    source = tiny_source(tiny_edm)
    return (LCM if method == "lcm" else LCMLoRA)(with_data(source) if data else source, DistillConfig(**settings))


def skeleton(n: int = 50) -> torch.Tensor:
    return karras(n, 0.006, 80.0).flip(0)


def test_boundary_scalings_are_one_and_zero_at_the_ends_and_tiny_on_the_skeleton():
    s = skeleton()
    assert torch.allclose(karras_position(s, 0.006, 80.0, 7.0), torch.arange(51, dtype=torch.float64) / 50)
    c_skip, c_out = boundary_scalings(s, float(s[0]), float(s[-1]), 7.0)
    assert c_skip[0] == 1 and c_out[0] == 0  # f(x, sigma_min) = x
    assert float(c_skip[1:].max()) < 1e-5 and float(c_skip[1]) == pytest.approx(0.25 / (200**2 + 0.25))
    assert float(c_skip[-1]) < 1e-8 and float(c_out[-1]) == pytest.approx(1.0)
    assert torch.allclose(c_skip + c_out**2, torch.ones(51))  # c_out = sqrt(1 - c_skip): f = D up to c_skip


def test_sampling_points_are_lcms_timesteps_on_the_skeleton():
    s = skeleton()
    four = sampling_sigmas(s, 4)
    assert torch.equal(four, torch.cat([s[[50, 38, 25, 13]], torch.zeros(1)]))  # tau 1000, 760, 500, 260
    assert sampling_sigmas(s, 1).tolist() == [80.0, 0.0]
    with pytest.raises(ValueError, match="1 to 50 steps"):
        sampling_sigmas(s, 51)


def test_the_loss_is_the_consistency_distance_after_one_guided_teacher_step(tiny_edm):
    m = lcm(copy.deepcopy(tiny_edm), batch=6)
    (step,) = list(m.losses({}, MicroBatch(0, 1, 6), torch.Generator().manual_seed(3)))
    gen = torch.Generator().manual_seed(3)  # the same draws, in the method's order
    x0, y = m.source.draw_data(6, gen)
    n = torch.randint(10, (6,), generator=gen)
    w = 1.0 + 3.0 * torch.rand(6, generator=gen)
    x = x0 + m.skeleton[n + 1].view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen)
    rows = []
    with torch.no_grad():
        for i in range(6):  # the guided teacher at each image's own w, then its Euler (DDIM) step
            s, t = m.skeleton[n[i]], m.skeleton[n[i] + 1]
            d = CFGTeacher(tiny_edm, float(w[i]), torch.tensor([10]))(x[i:i + 1], t, y[i:i + 1])
            x_hat = x[i:i + 1] + (s - t) * (x[i:i + 1] - d) / t
            # the fresh student and its target are the teacher's network (the w embedding starts at zero)
            c_skip, c_out = boundary_scalings(torch.stack([s, t]), 0.006, 80.0, 7.0)
            target = c_skip[0] * x_hat + c_out[0] * tiny_edm(x_hat, s, y[i:i + 1])
            out = c_skip[1] * x[i:i + 1] + c_out[1] * tiny_edm(x[i:i + 1], t, y[i:i + 1])
            rows.append((out, target))
    expected = distance(torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]), "huber", 1e-3)
    assert step.group == "student" and step.loss.requires_grad
    assert step.loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert m.teacher_evaluations == 6 * 2  # one CFG pair per image


def test_the_target_is_an_ema_of_the_student_updated_after_each_step(tiny_edm):
    m = lcm(copy.deepcopy(tiny_edm), target_ema=0.9)
    params = dict(m.student.named_parameters())
    assert set(m.target_params) == set(params) and all(torch.equal(m.target_params[k], params[k])
                                                       for k in params)
    before = {k: v.clone() for k, v in m.target_params.items()}
    stream = m.losses({}, MicroBatch(0, 1, 4), torch.Generator().manual_seed(0))
    next(stream)
    assert all(torch.equal(m.target_params[k], before[k]) for k in before)  # no update before the step
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)  # the optimizer's step
    assert next(stream, None) is None
    assert all(torch.allclose(m.target_params[k], 0.9 * before[k] + 0.1 * params[k]) for k in before)
    x, s, y, w = torch.randn(2, 1, 8, 8), torch.tensor([2.0, 5.0]), torch.tensor([1, 2]), torch.tensor([1.5, 3.0])
    ema = copy.deepcopy(m.student)
    ema.load_state_dict(m.target_params, strict=False)
    with torch.no_grad():
        assert torch.allclose(m.target(w)(x, s, y), ema(x, s, y, w=w), atol=1e-6)
        assert not torch.allclose(m.target(w)(x, s, y), m.student(x, s, y, w=w), atol=1e-3)


def test_w_is_an_input_of_the_student_and_its_file_keeps_it(tiny_edm, tmp_path):
    m = lcm(copy.deepcopy(tiny_edm))
    x, s, y = torch.randn(2, 1, 8, 8), torch.tensor([2.0, 5.0]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(m.student(x, s, y, w=1.0), m.student(x, s, y, w=4.0))  # starts as the teacher
        torch.nn.init.normal_(m.student.w_embed.mlp[-1].weight)
        assert not torch.allclose(m.student(x, s, y, w=1.0), m.student(x, s, y, w=4.0), atol=1e-4)
    with pytest.raises(ValueError, match="needs the guidance scale w"):
        m.student(x, s, y)

    cfg = DistillConfig(method="lcm", steps=3, batch=4, iters=2, lr=5e-3, skeleton=10, seed=1, out=str(tmp_path),
                        checkpoint_every=0)
    run = train_student(cfg, with_data(tiny_source(copy.deepcopy(tiny_edm))), progress=False)
    tensors, card = load(run.path)
    assert card["sampler"] == "renoise" and card["comfyui_sampler"] == "lcm" and card["nfe_range"] == [1, 3]
    assert card["guidance"] == {"mode": "distilled", "w": 2.0, "w_range": [1.0, 4.0]}
    assert card["w_embedding"] == {"injection": "extra_emb", "dim": 64} and card["step_embedding"] is None
    assert any(k.startswith("w_embed.") for k in tensors) and card["sigmas"]["1"] == [80.0, 0.0]
    student = load_student(run.path, tiny_edm, torch.tensor([10]))
    m = lcm(copy.deepcopy(tiny_edm), steps=3)
    m.student.load_state_dict(student.net.state_dict())
    noise, cond = torch.randn(3, 1, 8, 8) * 80, torch.tensor([1, 2, 3])
    for steps in (1, 3):
        assert torch.allclose(sample(student, noise, cond, steps=steps), m.preview(noise, cond, steps), atol=1e-5)
    at_three = sample(student, noise, cond, w=3.0)
    assert (at_three - sample(student, noise, cond)).abs().max() > 1e-6
    with pytest.raises(ValueError, match=r"trained for guidance w in \[1, 4\]"):
        sample(student, noise, cond, w=5.0)


def test_lcm_lora_distils_the_base_with_adapters_off_without_ema(tiny_edm):
    m = lcm(copy.deepcopy(tiny_edm), method="lcm-lora")
    assert isinstance(m.teacher.denoiser, AdaptersOff) and m.teacher.w == 2.0
    assert m.student.w_embed is None and m.target_params is None and m.state_dict() == {}
    base = sum(p.numel() * p.element_size() for p in tiny_edm.parameters())
    adapters = sum(p.numel() * p.element_size() for p in m.student.lora.parameters())
    assert storage(m) <= base + adapters + 1024  # one copy of the base weights
    x, s, y = torch.randn(2, 1, 8, 8), torch.tensor([2.0, 5.0]), torch.tensor([1, 2])
    with torch.no_grad():
        for p in m.student.lora.parameters():
            p.add_(0.1)
        assert torch.equal(m.teacher.denoiser(x, s, y), tiny_edm(x, s, y))  # the adapters are off
        assert not torch.allclose(m.student(x, s, y), tiny_edm(x, s, y), atol=1e-4)
        assert torch.equal(m.target(None)(x, s, y), m.student(x, s, y))  # the target: the student itself
    card = m.card()
    assert "w_range" not in card["guidance"] and card["comfyui_sampler"] == "lcm"
    cfg_mode = lcm(copy.deepcopy(tiny_edm), method="lcm-lora", guidance_mode="cfg")
    assert cfg_mode.teacher.w == 1.0 and cfg_mode.card()["guidance"] == {"mode": "cfg", "w": 2.0}
    with pytest.raises(ValueError, match="lcm-lora trains LoRA adapters"):
        lcm(tiny_edm, method="lcm-lora", student="full")


def test_lcm_refuses_stock_sampling_and_guidance_input_sources_naming_lcm_lora(tiny_edm):
    source = TeacherSource("comfy", tiny_edm, (1, 8, 8), lambda b, g: torch.randint(10, (b,), generator=g),
                           torch.tensor([10]), 2.0, stock_sampling=True)
    with pytest.raises(ValueError, match="stock samplers cannot feed; choose method lcm-lora"):
        LCM(source, DistillConfig(method="lcm"))
    assert LCMLoRA(source, DistillConfig(method="lcm-lora", student="lora", lora_rank=2)).teacher.w == 2.0
    with pytest.raises(ValueError, match="guidance_mode 'distilled'"):
        lcm(tiny_edm, guidance_mode="cfg")
    with pytest.raises(ValueError, match="outside w_range"):
        lcm(tiny_edm, guidance=5.0)
    embedded = dataclasses.replace(source, stock_sampling=False, guidance=1.0, card={"embedded_guidance": 3.5})
    with pytest.raises(ValueError, match="takes its guidance as an input .* choose method lcm-lora"):
        LCM(embedded, DistillConfig(method="lcm"))
    fixed = LCMLoRA(embedded, DistillConfig(method="lcm-lora", student="lora", lora_rank=2, guidance=3.5))
    assert fixed.teacher.w == 1.0  # the run's guidance went to the teacher's input


def test_without_a_data_set_x0_are_the_teachers_own_images(tiny_edm):
    m = lcm(copy.deepcopy(tiny_edm), data=False, iters=3, batch=2, pairs=100)
    assert m.pairs is not None and m.pairs.size == 3 * 2  # never more pairs than the run draws
    x0, cond, spent = training_images(m.source, m.pairs, 4, torch.Generator().manual_seed(0), CPU)
    pool_x0 = m.pairs.pool(CPU)[2]
    assert all(any(torch.equal(row, p) for p in pool_x0) for row in x0)
    assert spent == m.pairs.evaluations > 0  # the pool, solved on the first draw
    list(m.losses({}, MicroBatch(0, 1, 2), torch.Generator().manual_seed(1)))
    assert m.teacher_evaluations == 2 * 2  # one guided step per image: the pool was paid for above
    fresh = lcm(copy.deepcopy(tiny_edm), data=False, iters=3, batch=2, pairs=100)
    list(fresh.losses({}, MicroBatch(0, 1, 2), torch.Generator().manual_seed(1)))
    assert fresh.teacher_evaluations == fresh.pairs.evaluations + 2 * 2  # the run counts the pool it solved
    with_images = lcm(copy.deepcopy(tiny_edm))
    x0, _, spent = training_images(with_images.source, with_images.pairs, 4, torch.Generator().manual_seed(0), CPU)
    assert spent == 0
    assert with_images.pairs is None and torch.equal(x0[:, :, 3, 3], torch.ones(4, 1))  # the data's squares


@pytest.mark.parametrize(("method", "student"), [("lcm", "full"), ("lcm", "lora"), ("lcm-lora", "lora")])
def test_lcm_resumes_bit_exactly(tiny_edm, tmp_path, method, student):
    def trainer(out):
        m = lcm(copy.deepcopy(tiny_edm), out=out, method=method, student=student)
        return Trainer(m, m.cfg)

    whole, again = whole_and_resumed(trainer, tmp_path)
    assert again.iteration == whole.iteration == 4 and same_saved_state(whole, again, "student")
    if method == "lcm":
        a, b = whole.method.target_params, again.method.target_params
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(x)["loss"] for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    split = [json.loads(x)["loss"] for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert lines == split and len(lines) == 4


def test_training_lowers_the_consistency_loss(tiny_edm, tmp_path):
    m = lcm(copy.deepcopy(tiny_edm), iters=40, batch=16, lr=1e-2, out=tmp_path, checkpoint_every=0)

    def loss() -> float:  # on fixed draws, the target left as it is
        state = copy.deepcopy(m.state_dict())
        (step,) = list(m.losses({}, MicroBatch(0, 1, 64), torch.Generator().manual_seed(7)))
        m.load_state_dict(state)
        return step.loss.item()

    before = loss()
    Trainer(m, m.cfg).fit()
    after = loss()
    assert after < 0.7 * before, (before, after)


def test_one_student_serves_every_step_count_up_to_its_own():
    assert LCM.bench_runs([1, 2, 4], 200) == [("lcm", {"steps": 4})]
    assert LCMLoRA.bench_runs([4], 200)[0][1]["student"] == "lora"
    assert LCM.steps_label({"steps": 4}) == "1-4"
