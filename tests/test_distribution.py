"""Distribution matching (DMD2 and the loop it shares): the generator schedule and its renoise sampler,
backward simulation, the DMD gradient, the shared base (two LoRAs on one copy of the weights), the
student file, and bit-exact resumes."""

from __future__ import annotations

import copy
import json

import conftest
import pytest
import torch
from conftest import hooks

from distill_core.config import DistillConfig
from distill_core.methods import build_method
from distill_core.methods.base import MicroBatch, TeacherSource
from distill_core.methods.distribution import generator_schedule, karras_at
from distill_core.methods.dmd2 import DMD2Config, dmd_gradient
from distill_core.methods.moments import MomentsConfig
from distill_core.safetensors_io import read_card
from distill_core.sampling import renoise, sample
from distill_core.student_files import load_student
from distill_core.train.callbacks import StopAt
from distill_core.train.run import train_student
from distill_core.train.trainer import Trainer


def tiny_source(denoiser, w: float = 2.0) -> TeacherSource:
    return conftest.tiny_source(denoiser, classes=10, w=w)


def dmd2(tiny_edm, out=None, **kw):
    settings = {"method": "dmd2", "steps": 2, "batch": 4, "iters": 4, "critic_updates": 2, "student": "lora",
                "lora_rank": 2, "seed": 1, "out": str(out or "unused"), "checkpoint_every": 2, **kw}
    return build_method(tiny_source(tiny_edm), DistillConfig(**settings))


def storage(method) -> int:
    """Bytes of distinct parameter storage held by the method's networks and its teacher."""
    seen, total = set(), 0
    modules = [*method.nets.values(), method.source.denoiser]
    for p in (p for m in modules for p in m.parameters()):
        ptr = p.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += p.untyped_storage().nbytes()
    return total


def whole_and_resumed(make, tmp_path, stop: int = 2) -> tuple[Trainer, Trainer]:
    """A run trained in one go, and the same run stopped after ``stop`` iterations and resumed."""
    whole = make(tmp_path / "whole")
    whole.fit()
    first = make(tmp_path / "split")
    first.callbacks.append(StopAt(stop))
    assert first.fit().status == "interrupted"
    again = make(tmp_path / "split")
    again.fit(resume=True)
    return whole, again


def same_saved_state(a: Trainer, b: Trainer, name: str) -> bool:
    x, y = a.unwrapped(name).saved_state(), b.unwrapped(name).saved_state()
    return bool(x) and x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_generator_schedule_ends_at_zero_after_k_karras_points():
    assert generator_schedule(1, 0.006, 80.0, 7.0).tolist() == [80.0, 0.0]
    s = generator_schedule(4, 0.006, 80.0, 7.0)
    assert len(s) == 5 and s[0] == 80.0 and s[-1] == 0 and bool((s[:-1].diff() < 0).all())
    u = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert torch.allclose(karras_at(u, 0.006, 80.0, 7.0), torch.tensor([80.0, 0.006], dtype=torch.float64))


def test_renoise_denoises_then_noises_afresh_the_same_way_in_any_batch():
    seen = []

    def denoiser(x, sigma, cond=None):
        seen.append(float(sigma))
        return torch.full_like(x, 0.5)

    sigmas = torch.tensor([80.0, 2.0, 0.0])
    x = torch.randn(6, 1, 4, 4) * 80
    out = renoise(denoiser, x, sigmas)
    assert seen == [80.0, 2.0] and torch.equal(out, torch.full_like(x, 0.5))  # the last step's image

    def noisy(x, sigma, cond=None):
        return x / (1 + sigma)

    whole = renoise(noisy, x, sigmas)
    halves = torch.cat([renoise(noisy, x[:3], sigmas), renoise(noisy, x[3:], sigmas)])
    assert torch.equal(whole, halves)
    first = renoise(noisy, x, torch.tensor([80.0, 2.0, 0.5]))
    assert not torch.allclose(first, whole)


def test_dmd_gradient_points_from_the_fake_score_to_the_real_one():
    x0 = torch.randn(3, 1, 4, 4)
    real = torch.randn(3, 1, 4, 4)
    assert torch.equal(dmd_gradient(x0, real, real), torch.zeros_like(x0))
    g = dmd_gradient(x0, real, fake=x0)  # p_fake = 0: g = p_real / mean |p_real|
    assert torch.allclose(g.abs().flatten(1).mean(1), torch.ones(3))
    assert torch.allclose(g, (x0 - real) / (x0 - real).abs().flatten(1).mean(1).view(-1, 1, 1, 1))


def test_generator_loss_has_the_dmd_gradient(tiny_edm):
    m = dmd2(tiny_edm)
    x0 = torch.randn(4, 1, 8, 8, requires_grad=True)
    cond = torch.tensor([1, 2, 3, 4])
    gen = torch.Generator().manual_seed(0)
    m.generator_loss(x0, cond, 0, gen).backward()
    gen = torch.Generator().manual_seed(0)
    sigma = m.draw_noise_levels(4, gen, x0.device)
    x_t = x0.detach() + sigma.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen)
    with torch.no_grad():
        g = dmd_gradient(x0.detach(), m.teacher(x_t, sigma, cond), m.nets["fake_score"](x_t, sigma, cond))
    assert torch.allclose(x0.grad, g / x0.numel(), atol=1e-7)


def test_at_guidance_one_the_fresh_fake_score_is_the_real_score(tiny_edm):
    """Both start as the teacher: without guidance the score gap, hence the generator's gradient, is zero."""
    m = dmd2(tiny_edm, guidance=1.0)
    x0 = torch.randn(4, 1, 8, 8, requires_grad=True)
    m.generator_loss(x0, torch.arange(4), 0, torch.Generator().manual_seed(0)).backward()
    assert x0.grad.abs().max() < 1e-6
    m = dmd2(tiny_edm, guidance=3.0)
    x0 = torch.randn(4, 1, 8, 8, requires_grad=True)
    m.generator_loss(x0, torch.arange(4), 0, torch.Generator().manual_seed(0)).backward()
    assert x0.grad.abs().max() > 1e-4


def test_shared_base_holds_one_copy_of_the_weights(tiny_edm):
    base = sum(p.numel() * p.element_size() for p in tiny_edm.parameters())
    lora = dmd2(copy.deepcopy(tiny_edm))
    full = dmd2(copy.deepcopy(tiny_edm), student="full")
    adapters = sum(p.numel() * p.element_size() for net in lora.nets.values() for p in net.lora.parameters())
    assert storage(lora) <= base + adapters + 1024  # one base (+ the adapters' small buffers)
    assert storage(full) >= 3 * base  # teacher, generator and fake score
    assert [p for p in lora.source.denoiser.parameters() if p.requires_grad] == []


def test_each_network_of_the_shared_base_sees_only_its_own_adapters(tiny_edm):
    m = dmd2(copy.deepcopy(tiny_edm))
    x, sigma, cond = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 3.0]), torch.tensor([1, 2])
    with torch.no_grad():
        teacher, generator = tiny_edm(x, sigma, cond), m.generator(x, sigma, cond)
        for p in m.nets["fake_score"].lora.parameters():
            p.add_(0.5)
        assert torch.equal(m.generator(x, sigma, cond), generator)  # the fake score's adapters are off
        assert torch.equal(m.teacher.denoiser(x, sigma, cond), teacher)  # every adapter is off
        assert not torch.allclose(m.nets["fake_score"](x, sigma, cond), teacher)


def test_backward_simulation_feeds_each_step_the_generators_own_earlier_steps(tiny_edm):
    m = dmd2(tiny_edm, steps=3)
    gen = torch.Generator().manual_seed(5)
    x, sigma, cond = m.images(2, 2, gen, torch.device("cpu"))
    gen = torch.Generator().manual_seed(5)
    x0, cond0 = m.starts(2, gen, torch.device("cpu"))
    s = m.sigmas
    with torch.no_grad():
        for k in range(2):
            x0 = m.generator(x0, s[k], cond0) + s[k + 1] * torch.randn(x0.shape, generator=gen)
    assert torch.equal(x, x0) and torch.equal(cond, cond0) and float(sigma) == float(s[2])


def test_an_iteration_updates_the_critic_then_the_generator(tiny_edm, tmp_path):
    m = dmd2(tiny_edm, out=tmp_path, critic_updates=3)
    plan = m.plan(torch.Generator().manual_seed(0))
    groups = [(s.group, s.index) for s in m.losses(plan, MicroBatch(0, 1, 4), torch.Generator().manual_seed(0))]
    assert groups == [("fake_score", 0), ("fake_score", 1), ("fake_score", 2), ("generator", plan["step"])]
    assert m.teacher_evaluations == 4 * 2  # the guided teacher: one CFG evaluation per generator image


@pytest.mark.parametrize("student", ["lora", "full"])
def test_dmd2_resumes_bit_exactly(tiny_edm, tmp_path, student):
    def trainer(out):
        m = dmd2(copy.deepcopy(tiny_edm), out=out, student=student)
        return Trainer(m, m.cfg)

    whole, again = whole_and_resumed(trainer, tmp_path)
    assert again.iteration == whole.iteration == 4
    assert same_saved_state(whole, again, "generator") and same_saved_state(whole, again, "fake_score")
    lines = [json.loads(x)["loss"] for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    split = [json.loads(x)["loss"] for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert lines == split and [list(r)[:2] for r in lines] == [["fake_score:0", "fake_score:1"]] * 4
    assert all(len(r) == 3 for r in lines)


def test_the_student_file_samples_as_the_previews_did(tiny_edm, tmp_path):
    cfg = DistillConfig(method="dmd2", steps=2, batch=4, iters=2, critic_updates=1, student="lora", lora_rank=2,
                        seed=1, out=str(tmp_path), checkpoint_every=0, eval_samples=4)
    source = tiny_source(copy.deepcopy(tiny_edm))
    run = train_student(cfg, source, progress=False)
    card = read_card(run.path)
    assert card["sampler"] == "renoise" and card["comfyui_sampler"] == "lcm"
    assert card["sigmas"]["2"][-1] == 0 and card["student"]["kind"] == "lora"
    student = load_student(run.path, tiny_edm, torch.tensor([10]))
    noise, cond = torch.randn(3, 1, 8, 8) * 80, torch.tensor([1, 2, 3])
    m = build_method(tiny_source(copy.deepcopy(tiny_edm)), cfg)
    m.generator.lora.load_file_tensors(student.net.lora.file_tensors())
    assert torch.allclose(sample(student, noise, cond), m.preview(noise, cond), atol=1e-5)
    assert hooks(source.denoiser) == 0


# ---------------------------------------------------------------------------------------- moment matching
def moments(tiny_edm, out=None, **kw):
    return dmd2(tiny_edm, out, method="moments", **kw)


def test_moment_matching_levels_lie_within_the_trained_step(tiny_edm):
    m = moments(tiny_edm, steps=4, critic_updates=1)
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        s = m.step_levels(256, step, gen, torch.device("cpu")).double()
        hi = karras_at(torch.tensor(max(0.02, step / 4), dtype=torch.float64), m.sigma_min, m.sigma_max, 7.0)
        lo = karras_at(torch.tensor(min(0.98, (step + 1) / 4), dtype=torch.float64), m.sigma_min, m.sigma_max, 7.0)
        assert bool((s <= hi * (1 + 1e-5)).all() and (s >= lo * (1 - 1e-5)).all())


@pytest.mark.parametrize("weighting", ["edm", "normalised"])
def test_alternating_moment_matching_moves_images_from_the_auxiliary_to_the_teacher(tiny_edm, weighting):
    m = moments(tiny_edm, critic_updates=1, weighting=weighting)
    x0 = torch.randn(4, 1, 8, 8, requires_grad=True)
    cond = torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        for p in m.nets["auxiliary"].lora.parameters():
            p.add_(0.1)
    m.generator_loss(x0, cond, 1, torch.Generator().manual_seed(0)).backward()
    gen = torch.Generator().manual_seed(0)
    sigma = m.step_levels(4, 1, gen, x0.device)
    z = x0.detach() + sigma.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen)
    with torch.no_grad():
        teacher = m.teacher(z, sigma, cond)
        mismatch = m.nets["auxiliary"](z, sigma, cond) - teacher
    if weighting == "edm":  # lambda(s), sigma_data 0.5
        weight = (sigma.pow(-2) + 4).view(-1, 1, 1, 1)
    else:  # 1 / mean |x~ - x^_theta(z_s)| per sample
        weight = 1 / (x0.detach() - teacher).abs().mean((1, 2, 3), keepdim=True)
    assert mismatch.abs().max() > 1e-4
    assert torch.allclose(x0.grad, weight * mismatch / x0.numel(), rtol=1e-4, atol=1e-9)


def test_one_step_alternating_moment_matching_with_its_default_weighting_is_dmd2(tiny_edm):
    m, d = moments(tiny_edm, steps=1), dmd2(copy.deepcopy(tiny_edm), steps=1)
    defaults = MomentsConfig()
    assert (defaults.critic_updates, defaults.weighting) == (DMD2Config().critic_updates, "normalised")
    for critic in (m.nets["auxiliary"], d.nets["fake_score"]):
        with torch.no_grad():
            for p in critic.lora.parameters():
                p.add_(0.1)
    images = torch.randn(4, 1, 8, 8)
    cond = torch.tensor([1, 2, 3, 4])
    grads = []
    for method in (m, d):
        x0 = images.clone().requires_grad_(True)
        method.generator_loss(x0, cond, 0, torch.Generator().manual_seed(0)).backward()
        grads.append(x0.grad)
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-8)  # x0 - real - (x0 - fake): rounding only


def test_instant_moment_matching_trains_the_generator_alone_without_touching_the_teacher(tiny_edm, tmp_path):
    m = moments(tiny_edm, version="instant")
    assert list(m.nets) == ["generator"] and list(m.optim_groups()) == ["generator"]
    plan = m.plan(torch.Generator().manual_seed(0))
    (step,) = list(m.losses(plan, MicroBatch(0, 1, 4), torch.Generator().manual_seed(0)))
    step.loss.backward()
    assert step.group == "generator" and m.preconditioned == 1
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.generator.lora.parameters())
    assert all(p.grad is None for p in tiny_edm.parameters())
    with pytest.raises(ValueError, match="multiple of 2"):
        moments(tiny_edm, version="instant", batch=3)


@pytest.mark.parametrize("version", ["alternating", "instant"])
def test_moment_matching_resumes_bit_exactly(tiny_edm, tmp_path, version):
    def trainer(out):
        m = moments(copy.deepcopy(tiny_edm), out=out, version=version, critic_updates=1, iters=3)
        return Trainer(m, m.cfg)

    whole, again = whole_and_resumed(trainer, tmp_path)
    assert same_saved_state(whole, again, "generator")
    if version == "instant":
        assert again.method.preconditioned == whole.method.preconditioned == 3
        assert all(torch.equal(u, v) for u, v in zip(whole.method.second_moment, again.method.second_moment))


# ---------------------------------------------------------------------------------------- DMD2's GAN head
def with_data(source: TeacherSource) -> TeacherSource:
    """``source`` with real images: bright squares, labelled 0..9."""

    def draw_data(batch, generator):
        images = -torch.ones(batch, 1, 8, 8)
        images[:, :, 2:6, 2:6] = 1
        return images, torch.randint(10, (batch,), generator=generator)

    source.draw_data = draw_data
    return source


def gan_dmd2(tiny_edm, out=None, **kw):
    settings = {"method": "dmd2", "steps": 1, "batch": 4, "iters": 4, "critic_updates": 2, "student": "lora",
                "lora_rank": 2, "seed": 1, "out": str(out or "unused"), "checkpoint_every": 2, "gan_weight": 0.5,
                **kw}
    return build_method(with_data(tiny_source(tiny_edm)), DistillConfig(**settings))


def test_the_gan_head_needs_real_images(tiny_edm):
    with pytest.raises(ValueError, match="needs real images.*gan_weight 0"):
        dmd2(tiny_edm, gan_weight=0.01)


def test_the_gan_head_trains_with_the_fake_score_and_steers_the_generator(tiny_edm):
    from distill_core.nets.gan_head import ScoreWithHead

    m = gan_dmd2(copy.deepcopy(tiny_edm))
    fake = m.nets["fake_score"]
    assert isinstance(fake, ScoreWithHead) and m.optim_groups()["fake_score"]
    x0 = torch.randn(4, 1, 8, 8)
    m.critic_loss(x0, torch.arange(4), 0, torch.Generator().manual_seed(0)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fake.head.parameters())
    assert not any(fn for layer in m.source.denoiser.modules() for fn in layer._forward_hooks.values()
                   if getattr(fn, "__name__", "") == "catch")  # the feature hook lives for one pass only

    def generator_gradient(method):
        x = x0.clone().requires_grad_(True)
        method.generator_loss(x, torch.arange(4), 0, torch.Generator().manual_seed(0)).backward()
        return x.grad

    plain = generator_gradient(dmd2(copy.deepcopy(tiny_edm), steps=1))
    assert not torch.allclose(plain, generator_gradient(gan_dmd2(copy.deepcopy(tiny_edm))))  # the GAN term adds


def test_the_gan_head_keeps_one_copy_of_the_base_and_resumes_bit_exactly(tiny_edm, tmp_path):
    m = gan_dmd2(copy.deepcopy(tiny_edm))
    base = sum(p.numel() * p.element_size() for p in tiny_edm.parameters())
    trained = sum(p.numel() * p.element_size() for net in m.nets.values() for p in net.parameters()
                  if p.requires_grad)
    assert storage(m) <= base + trained + 1024

    def trainer(out):
        method = gan_dmd2(copy.deepcopy(tiny_edm), out=out)
        return Trainer(method, method.cfg)

    whole, again = whole_and_resumed(trainer, tmp_path)
    assert any(k.startswith("head.") for k in whole.unwrapped("fake_score").saved_state())
    assert same_saved_state(whole, again, "generator") and same_saved_state(whole, again, "fake_score")


def test_the_gan_head_refuses_a_network_without_a_bottleneck():
    from distill_core.nets.gan_head import bottleneck

    with pytest.raises(ValueError, match="bottleneck"):
        bottleneck(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_the_regression_term_pulls_the_one_step_image_to_the_teachers_and_resumes_bit_exactly(tiny_edm, tmp_path):
    """DMD's regression term: its gradient is the pseudo-Huber pull of G(sigma_max z) onto the teacher's image
    from z (a pool of pairs solved once and counted), only for one-step generators; resumes bit-exactly."""
    reg = {"steps": 1, "regression_weight": 0.25, "pairs": 8, "pair_steps": 3}
    with pytest.raises(ValueError, match="one-step generators.*regression_weight 0 for 2 steps"):
        dmd2(tiny_edm, **{**reg, "steps": 2})
    m = dmd2(copy.deepcopy(tiny_edm), **reg)
    assert m.teacher_evaluations == 0  # the pool is solved on first use
    loss = m.regression_loss(4, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert m.teacher_evaluations == 8 * 3 * 2 * 2  # 8 pairs x 3 Heun steps (to sigma_min: 2 each) x CFG's 2
    z, cond, target = m.pairs.draw(4, torch.Generator().manual_seed(0), torch.device("cpu"))
    image = m.generator(z * m.sigmas[0], m.sigmas[0].expand(4), cond)
    delta = (image - target).flatten(1)
    expected = ((delta.square() + 0.01 ** 2).sqrt() - 0.01).mean(1).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.generator.parameters())

    def trainer(out):
        method = dmd2(copy.deepcopy(tiny_edm), out=out, **reg)
        return Trainer(method, method.cfg)

    whole, again = whole_and_resumed(trainer, tmp_path)
    assert same_saved_state(whole, again, "generator") and same_saved_state(whole, again, "fake_score")
