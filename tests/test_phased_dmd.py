"""Phased DMD: phase boundaries, score matching within a subinterval, experts trained one phase after
another, sampling that switches experts by sigma, the shared base, bit-exact resumes across a phase
boundary, and the student file of experts."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import hooks

from distill_core.config import DistillConfig
from distill_core.methods import build_method
from distill_core.methods.base import MicroBatch
from distill_core.methods.distribution import karras_at
from distill_core.methods.dmd2 import dmd_gradient
from distill_core.methods.phased_dmd import karras_position, phase_boundaries, phase_lengths, subinterval_mean
from distill_core.methods.phases import partition
from distill_core.safetensors_io import load, read_card
from distill_core.sampling import renoise, sample
from distill_core.student_files import check_fits, load_student, release_teacher
from distill_core.students import Experts, StudentNet
from distill_core.train.callbacks import StopAt
from distill_core.train.run import train_student
from distill_core.train.trainer import Trainer
from tests.test_distribution import storage, tiny_source


def phased_dmd(tiny_edm, out=None, **kw):
    settings = {"method": "phased-dmd", "steps": 2, "batch": 4, "iters": 4, "critic_updates": 2, "student": "lora",
                "lora_rank": 2, "seed": 1, "out": str(out or "unused"), "checkpoint_every": 2, **kw}
    return build_method(tiny_source(tiny_edm), DistillConfig(**settings))


def test_boundaries_are_the_partitions_ending_at_zero(tiny_edm):
    part = partition("uniform", 3, 0.006, 80.0)
    s = phase_boundaries("uniform", 3, 0.006, 80.0)
    assert s.tolist() == pytest.approx([*part.boundaries[:-1], 0.0]) and s[-1] == 0 and part.boundaries[-1] == 0.006
    assert phase_boundaries("uniform", 1, 0.006, 80.0).tolist() == [80.0, 0.0]
    assert phased_dmd(tiny_edm, steps=3).sigmas.tolist() == s.tolist()  # uniform by default
    m = phased_dmd(tiny_edm, steps=3, partition="adaptive", probe_batch=4, probe_steps=8)
    assert m.sigmas[0] == 80.0 and m.sigmas[-1] == 0 and bool((m.sigmas.diff() < 0).all())
    assert m.experts.boundaries == m.sigmas.tolist() and m.card()["sigmas"]["3"] == m.sigmas.tolist()
    assert m.teacher_evaluations == 4 * 9 * 2  # the probe: 4 trajectories of 8 steps (+1), guided
    assert phase_lengths(7, 3) == [3, 2, 2] and phase_lengths(4, 2) == [2, 2]
    u = torch.tensor([0.3], dtype=torch.float64)
    assert karras_position(float(karras_at(u, 0.006, 80.0, 7.0)), 0.006, 80.0, 7.0) == pytest.approx(0.3)


def test_matching_levels_lie_inside_each_phase(tiny_edm):
    m = phased_dmd(tiny_edm, steps=3)
    gen = torch.Generator().manual_seed(0)
    for k in range(3):
        t = m.phase_levels(512, k, gen)
        s_hi, s_lo = float(m.sigmas[k]), float(m.sigmas[k + 1])
        assert bool((t <= s_hi * (1 + 1e-9)).all() and (t > s_lo).all()), k
        assert float(t.max() - t.min()) > 0.5 * (min(s_hi, 72.0) - max(s_lo, 0.01))  # spread over the phase


def test_the_subinterval_mean_on_a_gaussian_is_exact():
    """x0 ~ N(mu, v): E[x0 | x_t] and E[x_s | x_t] are known; D = x_t + t^2 / (t^2 - s^2) (F - x_t) maps
    one to the other, and ``subinterval_mean`` inverts it."""
    mu, v, s = 0.7, 0.3, 0.9
    t = torch.tensor([1.0, 2.5, 10.0], dtype=torch.float64)
    x_t = torch.randn(3, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    tt = t.view(-1, 1, 1, 1)
    e_x0 = mu + v / (v + tt**2) * (x_t - mu)
    e_xs = mu + (v + s**2) / (v + tt**2) * (x_t - mu)
    assert torch.allclose(x_t + tt**2 / (tt**2 - s**2) * (e_xs - x_t), e_x0)
    assert torch.allclose(subinterval_mean(x_t, e_x0, t, s), e_xs)
    assert torch.allclose(subinterval_mean(x_t, e_x0, t, 0.0), e_x0, atol=1e-15)  # s = 0: F = D (DMD2)
    near = subinterval_mean(x_t, e_x0, torch.full((3,), s * (1 + 1e-9), dtype=torch.float64), s)
    assert torch.allclose(near, x_t, atol=1e-7)  # t -> s: nothing left to denoise


def test_the_fake_score_regresses_on_x_s_within_the_subinterval(tiny_edm):
    m = phased_dmd(tiny_edm)
    x0, cond = torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4])
    loss = m.critic_loss(x0, cond, 0, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    s = float(m.sigmas[1])
    t = m.phase_levels(4, 0, gen)
    x_s = x0 + s * torch.randn(x0.shape, generator=gen)
    x_t = x_s + (t**2 - s**2).sqrt().float().view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen)
    with torch.no_grad():
        d = m.nets["fake_score"](x_t, t.float(), cond)
    f = x_t + (1 - s**2 / t**2).float().view(-1, 1, 1, 1) * (d - x_t)
    weight = (1 / (t**2 - s**2) + 1 / (0.25 + s**2)).float().view(-1, 1, 1, 1)
    assert s > 0.1 and torch.allclose(loss, (weight * (f - x_s).square()).mean(), rtol=1e-5)


def test_the_generator_gradient_is_the_dmd_gradient_at_x_s(tiny_edm):
    m = phased_dmd(tiny_edm)
    with torch.no_grad():
        for p in m.nets["fake_score"].lora.parameters():
            p.add_(0.05)
    x0 = torch.randn(4, 1, 8, 8, requires_grad=True)
    cond = torch.tensor([1, 2, 3, 4])
    m.generator_loss(x0, cond, 0, torch.Generator().manual_seed(0)).backward()
    gen = torch.Generator().manual_seed(0)
    s = float(m.sigmas[1])
    t = m.phase_levels(4, 0, gen)
    x_s = x0.detach() + s * torch.randn(x0.shape, generator=gen)
    x_t = x_s + (t**2 - s**2).sqrt().float().view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen)
    with torch.no_grad():
        g = dmd_gradient(x_s, m.teacher(x_t, t.float(), cond), m.nets["fake_score"](x_t, t.float(), cond))
    assert g.abs().max() > 1e-3 and torch.allclose(x0.grad, g / x0.numel(), atol=1e-7)


def test_sampling_switches_experts_by_sigma(tiny_edm):
    experts = [StudentNet(copy.deepcopy(tiny_edm)) for _ in range(2)]
    with torch.no_grad():
        for p in experts[1].parameters():
            p.mul_(1.5)
    net = Experts(experts, [80.0, 1.0, 0.0]).eval()
    x, cond = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    with torch.no_grad():
        for sigma, k in ((80.0, 0), (1.5, 0), (1.0, 1), (0.3, 1), (200.0, 0)):
            s = torch.full((3,), sigma)
            assert torch.equal(net(x, s, cond), experts[k](x, s, cond)), sigma
        assert not torch.allclose(experts[0](x, 1.0, cond), experts[1](x, 1.0, cond))
        mixed = torch.tensor([5.0, 0.5, 2.0])
        rows = [experts[k](x[i:i + 1], mixed[i:i + 1], cond[i:i + 1]) for i, k in enumerate((0, 1, 0))]
        assert torch.allclose(net(x, mixed, cond), torch.cat(rows), atol=1e-6)
        seen = []
        for k, e in enumerate(experts):
            e.register_forward_pre_hook(lambda mod, args, k=k: seen.append((k, float(args[1]))))
        renoise(net, x * 80, torch.tensor([80.0, 1.0, 0.0]), cond)
    assert seen == [(0, 80.0), (1, 1.0)]


def test_phases_train_one_expert_after_another(tiny_edm, tmp_path):
    def trainer():
        m = phased_dmd(copy.deepcopy(tiny_edm), out=tmp_path, critic_updates=1, checkpoint_every=0)
        return Trainer(m, m.cfg)

    def state(expert) -> dict:
        return {k: v.clone() for k, v in expert.saved_state().items()}

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    first = trainer()
    m = first.method
    start = [state(e) for e in m.experts.experts]
    first.callbacks.append(StopAt(2))
    first.fit()
    after_phase_0 = state(m.experts.experts[0])
    assert m.state_dict() == {"phase": 0, "phase_iterations": 2}
    assert not same(start[0], after_phase_0) and same(start[1], state(m.experts.experts[1]))
    plan = m.plan(torch.Generator())  # phase 1 begins: expert 1 starts from expert 0
    assert plan == {"step": 1} and m.state_dict() == {"phase": 1, "phase_iterations": 1}
    assert same(after_phase_0, state(m.experts.experts[1]))
    m.generator.zero_grad(set_to_none=True)
    *_, step = m.losses(plan, MicroBatch(0, 1, 4), torch.Generator().manual_seed(0))
    step.loss.backward()
    grads = [[p.grad is not None and bool(p.grad.abs().sum() > 0) for p in e.lora.parameters()]
             for e in m.experts.experts]
    assert not any(grads[0]) and any(grads[1])  # only the current expert gets gradients
    again = trainer()  # phase 1's updates, from the checkpoint at the end of phase 0
    again.fit(resume=True)
    experts = again.method.experts.experts
    assert same(after_phase_0, state(experts[0])) and not same(after_phase_0, state(experts[1]))


@pytest.mark.parametrize("student,stop", [("lora", 2), ("lora", 3), ("full", 2), ("full", 3)])
def test_phased_dmd_resumes_bit_exactly_across_a_phase_boundary(tiny_edm, tmp_path, student, stop):
    def trainer(out):
        m = phased_dmd(copy.deepcopy(tiny_edm), out=out, student=student, critic_updates=1, batch=2,
                       checkpoint_every=1)
        return Trainer(m, m.cfg)

    whole = trainer(tmp_path / "whole")
    whole.fit()
    first = trainer(tmp_path / "split")
    first.callbacks.append(StopAt(stop))
    assert first.fit().status == "interrupted"
    again = trainer(tmp_path / "split")
    assert again.fit(resume=True).iteration == 4
    assert again.method.state_dict() == whole.method.state_dict() == {"phase": 1, "phase_iterations": 2}
    for name in ("generator", "fake_score"):
        a, b = whole.unwrapped(name).saved_state(), again.unwrapped(name).saved_state()
        assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    lines = [json.loads(x)["loss"] for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    split = [json.loads(x)["loss"] for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert lines == split and [list(r)[-1] for r in lines] == ["0", "0", "1", "1"]


def test_shared_base_holds_one_copy_of_the_weights(tiny_edm):
    base = sum(p.numel() * p.element_size() for p in tiny_edm.parameters())
    lora = phased_dmd(copy.deepcopy(tiny_edm), steps=3)
    full = phased_dmd(copy.deepcopy(tiny_edm), steps=3, student="full")
    adapters = sum(p.numel() * p.element_size() for net in lora.nets.values() for p in net.parameters()
                   if p.requires_grad)
    assert len(lora.experts.experts) == 3 and adapters < base
    assert storage(lora) <= base + adapters + 1024  # one base (+ the adapters' small buffers)
    assert storage(full) >= 5 * base  # teacher, three experts and the fake score
    assert [p for p in lora.source.denoiser.parameters() if p.requires_grad] == []


@pytest.mark.parametrize("student", ["lora", "full"])
def test_the_student_file_holds_every_expert_and_samples_as_the_previews_did(tiny_edm, tmp_path, student):
    cfg = DistillConfig(method="phased-dmd", steps=2, batch=2, iters=2, critic_updates=1, student=student,
                        lora_rank=2, seed=1, out=str(tmp_path), checkpoint_every=0)
    source = tiny_source(copy.deepcopy(tiny_edm))
    run = train_student(cfg, source, progress=False)
    assert hooks(source.denoiser) == 0  # every expert's adapters are released
    card, (tensors, _) = read_card(run.path), load(run.path)
    assert card["experts"] == {"count": 2, "boundaries": card["sigmas"]["2"]} and card["sigmas"]["2"][-1] == 0
    assert card["method"] == "phased-dmd" and card["student"]["kind"] == student
    prefixes = {k.split(".", 2)[1] for k in tensors}
    assert prefixes == {"0", "1"} and all(k.startswith("expert.") for k in tensors)
    if student == "lora":
        assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in tensors)
    check_fits(run.path, tiny_edm)
    loaded = load_student(run.path, tiny_edm, torch.tensor([10]))
    assert isinstance(loaded.net, Experts) and loaded.net.boundaries == card["sigmas"]["2"]
    m = build_method(tiny_source(copy.deepcopy(tiny_edm)), cfg)
    m.experts.load_saved_state(loaded.net.saved_state())
    noise, cond = torch.randn(3, 1, 8, 8) * 80, torch.tensor([1, 2, 3])
    images = sample(loaded, noise, cond)
    assert torch.allclose(images, m.preview(noise, cond), atol=1e-5)
    one = torch.full((3,), float(card["sigmas"]["2"][1]))
    with torch.no_grad():  # the two experts differ: the second phase trained its own
        assert not torch.allclose(loaded.net.experts[0](noise / 80, one, cond),
                                  loaded.net.experts[1](noise / 80, one, cond))
    shared = load_student(run.path, tiny_edm, torch.tensor([10]), share=True)
    assert torch.allclose(sample(shared, noise, cond), images, atol=1e-5)
    release_teacher(shared.net)
    assert hooks(tiny_edm) == 0


def test_ddp_is_told_that_an_update_trains_one_expert(tiny_edm, tmp_path):
    """Each update trains the phase's expert only: under several processes DDP must look for the unused
    weights (it refuses the next iteration otherwise), which the trainer's accelerator asks for."""
    method = phased_dmd(tiny_edm, tmp_path)
    assert method.partial_updates
    assert Trainer(method, method.cfg, tmp_path).acc.ddp_handler.find_unused_parameters
    sfd = build_method(tiny_source(tiny_edm), DistillConfig(teacher="tiny", steps=2, out=str(tmp_path / "sfd")))
    handler = Trainer(sfd, sfd.cfg, tmp_path / "sfd").acc.ddp_handler
    assert handler is None or not handler.find_unused_parameters
