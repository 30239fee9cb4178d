"""A run that starts from a student file (``init_from``): the trained network starts with the file's weights
(a full network, LoRA adapters, or experts), the method's other networks as the teacher, LCM's target network
where its student starts; a foreign or mismatched file is refused in one line, and a resumed run does not need
the file again."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_UNET, randomise

from distill_core.builtin import fingerprint
from distill_core.cli import main as cli_main
from distill_core.config import DistillConfig
from distill_core.denoisers.edm import EDMDenoiser
from distill_core.methods import build_method
from distill_core.methods.registry import methods
from distill_core.nets.unet import UNet
from distill_core.safetensors_io import load
from distill_core.student_files import load_student
from distill_core.train.callbacks import StopAt
from distill_core.train.run import train_student
from tests.test_distribution import tiny_source, with_data

NULL = torch.tensor([10])
#: inputs every comparison of networks uses
X, SIGMA, Y = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([0.5, 3.0, 40.0]), \
    torch.tensor([1, 4, 7])


def trained(tiny_edm, out: Path, data: bool = False, **kw) -> Path:
    """A student file of the tiny teacher after one large step (every trained weight moved off the teacher's)."""
    settings = {"steps": 2, "batch": 4, "iters": 1, "lr": 1e-2, "seed": 1, "out": str(out), "checkpoint_every": 0,
                **kw}
    source = tiny_source(copy.deepcopy(tiny_edm))
    return train_student(DistillConfig(**settings), with_data(source) if data else source, progress=False).path


def method(tiny_edm, **kw):
    return build_method(with_data(tiny_source(copy.deepcopy(tiny_edm))), DistillConfig(**{"seed": 2, **kw}))


@torch.no_grad()
def out(net) -> torch.Tensor:
    return net(X, SIGMA, Y)


def test_a_full_student_starts_the_generator_and_the_fake_score_stays_the_teacher(tiny_edm, tmp_path):
    path = trained(tiny_edm, tmp_path / "sfd")
    student = load_student(path, tiny_edm, NULL)
    m = method(tiny_edm, method="dmd2", steps=1)
    assert not torch.allclose(out(m.generator), out(student.net), atol=1e-4)
    m.start_from(str(path))
    assert torch.equal(out(m.generator), out(student.net))
    assert torch.equal(out(m.nets["fake_score"]), out(tiny_edm)) and torch.equal(out(m.teacher.denoiser), out(tiny_edm))


def test_a_lora_student_starts_the_generators_adapters_on_the_shared_base(tiny_edm, tmp_path):
    path = trained(tiny_edm, tmp_path / "sfd", student="lora", lora_rank=2)
    student = load_student(path, tiny_edm, NULL)
    m = method(tiny_edm, method="dmd2", steps=1, student="lora", lora_rank=2)
    m.start_from(str(path))
    assert torch.allclose(out(m.generator), out(student.net), atol=1e-6)
    assert not torch.allclose(out(m.generator), out(tiny_edm), atol=1e-4)
    assert torch.equal(out(m.nets["fake_score"]), out(tiny_edm)) and torch.equal(out(m.teacher.denoiser), out(tiny_edm))


def test_one_network_starts_every_expert_and_experts_start_one_by_one(tiny_edm, tmp_path):
    single = load_student(trained(tiny_edm, tmp_path / "sfd"), tiny_edm, NULL)
    m = method(tiny_edm, method="phased-dmd", steps=2)
    m.start_from(str(tmp_path / "sfd" / "student.safetensors"))
    assert all(torch.equal(out(expert), out(single.net)) for expert in m.generator.experts)

    path = trained(tiny_edm, tmp_path / "phased", method="phased-dmd", iters=4)
    experts = load_student(path, tiny_edm, NULL).net.experts
    assert not torch.allclose(out(experts[0]), out(experts[1]), atol=1e-4)
    m = method(tiny_edm, method="phased-dmd", steps=2)
    m.start_from(str(path))
    assert all(torch.equal(out(a), out(b)) for a, b in zip(m.generator.experts, experts, strict=True))
    with pytest.raises(ValueError, match="holds 2 experts and this run trains 3 network"):
        method(tiny_edm, method="phased-dmd", steps=3).start_from(str(path))


def test_lcm_target_network_starts_where_its_student_does(tiny_edm, tmp_path):
    path = trained(tiny_edm, tmp_path / "lcm", data=True, method="lcm", steps=3, skeleton=10)
    m = method(tiny_edm, method="lcm", steps=3, skeleton=10)
    m.start_from(str(path))
    started = {k: p for k, p in m.module().named_parameters() if p.requires_grad}
    assert m.target_params.keys() == started.keys()
    assert all(torch.equal(m.target_params[k], p) for k, p in started.items())
    teacher = {f"denoiser.{k}": v for k, v in tiny_edm.state_dict().items()}
    assert not all(torch.equal(m.target_params[k], teacher[k]) for k in started if k in teacher)


def test_a_mismatched_file_is_refused_with_what_would_fit(tiny_edm, tmp_path):
    full = trained(tiny_edm, tmp_path / "full")
    lora = trained(tiny_edm, tmp_path / "lora", student="lora", lora_rank=2)
    lcm = trained(tiny_edm, tmp_path / "lcm", data=True, method="lcm", steps=3, skeleton=10)
    with pytest.raises(ValueError, match=r"holds a LoRA of rank 2 and alpha 2 and this run trains a full-weight "
                                         r"network: train the kind the file holds \(student: lora, lora_rank: 2, "
                                         r"lora_alpha: 2\)"):
        method(tiny_edm, method="dmd2", steps=1).start_from(str(lora))
    with pytest.raises(ValueError, match=r"LoRA of rank 4 and alpha 4: train the kind the file holds \(student: "
                                         r"full\)"):
        method(tiny_edm, method="dmd2", steps=1, student="lora", lora_rank=4).start_from(str(full))
    with pytest.raises(ValueError, match="its network takes the guidance scale as an input and this run's does not"):
        method(tiny_edm, method="dmd2", steps=1).start_from(str(lcm))
    other = EDMDenoiser(randomise(UNet(TINY_UNET), seed=9)).eval().requires_grad_(False)
    with pytest.raises(ValueError, match="is a student of another teacher"):
        method(other, method="dmd2", steps=1).start_from(str(full))


def test_the_run_starts_from_the_file_names_it_and_resumes_without_it(tiny_edm, tmp_path):
    """At a learning rate too small to move a weight, the trained generator is the file's network."""
    start = trained(tiny_edm, tmp_path / "sfd")
    moved = tmp_path / "start.safetensors"
    start.rename(moved)
    started = load(moved)[0]
    cfg = DistillConfig(method="dmd2", steps=1, batch=4, iters=3, critic_updates=1, lr=1e-9, seed=1,
                        init_from=str(moved), out=str(tmp_path / "dmd2"), checkpoint_every=1)
    assert train_student(cfg, tiny_source(copy.deepcopy(tiny_edm)), progress=False, callbacks=[StopAt(1)]) is None
    moved.unlink()  # a resumed run's weights are its checkpoint's
    run = train_student(cfg, tiny_source(copy.deepcopy(tiny_edm)), resume=True, progress=False)
    tensors, card = load(run.path)
    assert card["training"]["init_from"] == "start.safetensors"
    assert tensors.keys() == started.keys() - {"afs.class_means"}  # the SFD file's first step: not a weight
    assert all(torch.allclose(v, started[k], atol=1e-6) for k, v in tensors.items())
    teacher = tiny_edm.state_dict()
    assert not all(torch.allclose(tensors[k], teacher[k], atol=1e-6) for k in teacher)


def test_over_a_bf16_frozen_teacher_the_run_starts_from_the_files_float32_weights(tiny_edm, tmp_path):
    """The trained copy of a bf16 teacher is made float32 before the file is read: its weights are the file's,
    not their bf16 rounding (at a learning rate too small to move a weight)."""
    start = load(trained(tiny_edm, tmp_path / "sfd"))[0]
    weights = {k: v for k, v in start.items() if k in tiny_edm.state_dict()}
    assert any(not torch.allclose(v.bfloat16().float(), v, atol=1e-6) for v in weights.values())
    cfg = DistillConfig(steps=2, batch=4, iters=1, lr=1e-9, seed=1, frozen_precision="bf16", checkpoint_every=0,
                        init_from=str(tmp_path / "sfd" / "student.safetensors"), out=str(tmp_path / "bf16"))
    source = tiny_source(copy.deepcopy(tiny_edm))
    tensors = load(train_student(cfg, source, progress=False).path)[0]
    assert {p.dtype for p in source.denoiser.parameters()} == {torch.bfloat16}
    assert all(tensors[k].dtype == torch.float32 and torch.allclose(tensors[k], v, atol=1e-6)
               for k, v in weights.items())


def test_the_command_line_refuses_a_missing_file_in_one_line(tmp_path, capsys):
    gone = tmp_path / "gone.safetensors"
    assert cli_main(["distill", "--init-from", str(gone), "--iters", "1", "--batch", "4", "--no-progress",
                     "--out", str(tmp_path / "run")]) != 0
    said = capsys.readouterr()
    lines = [line for line in (said.out + said.err).splitlines() if str(gone) in line]
    assert len(lines) == 1 and "Traceback" not in said.err


@pytest.mark.parametrize("name", sorted(methods()))
def test_every_method_names_the_teacher_as_loaded_with_a_lora_on_it(tiny_edm, name):
    """The fingerprint is the teacher's own, taken once when the method is built (``Method.__init__``), whatever
    the method then hooks onto the shared network, and every method's card (``Method.student_card``) carries it
    beside the schedule's noise range and the run's settings, as JSON."""
    steps = 1 if name == "kd" else 2
    m = method(tiny_edm, method=name, steps=steps, student="lora", lora_rank=2)
    assert m.teacher_fingerprint == fingerprint(tiny_edm)
    assert (m.sigma_min, m.sigma_max) == (DistillConfig.sigma_min, tiny_edm.sigma_max)
    card = json.loads(json.dumps(m.card()))  # what the file's JSON header holds
    assert (card["teacher_fingerprint"], card["method"], card["teacher"]) == (m.teacher_fingerprint, name,
                                                                            m.source.name)
    assert card["schedule"]["sigma_max"] == tiny_edm.sigma_max and card["schedule"]["name"]
    assert {k: card["training"][k] for k in ("lr", "iters", "student")} == {"lr": DistillConfig.lr, "iters":
                                                                           DistillConfig.iters, "student": "lora"}
    assert str(steps) in card["sigmas"]
