"""LoRA students: hooked adapters equal a merged weight update, the teacher is the same network with
adapters off, training touches only the adapters, files use the stock loader's keys, resume is exact."""

from __future__ import annotations

import copy
import os
import signal

import pytest
import torch
from torch import nn

from distill_core.config import DistillConfig
from distill_core.lora import LoRAAdapters, merge, target_layers
from distill_core.methods import build_method
from distill_core.methods.base import TeacherSource
from distill_core.safetensors_io import load
from distill_core.sampling import few_step, sample
from distill_core.student_files import load_student, release_teacher, save_student
from distill_core.students import AdaptersOff, make_student
from distill_core.teacher import CFGTeacher
from distill_core.train.callbacks import Callback
from distill_core.train.checkpoint import load_checkpoint
from distill_core.train.trainer import Trainer


def _perturb(adapters: LoRAAdapters, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapters.adapters:
            a.lora_up.weight.copy_(torch.randn(a.lora_up.weight.shape, generator=gen) * 0.1)


def test_hooked_adapters_equal_the_merged_weights_and_detach_restores():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.SiLU(), nn.Conv2d(6, 4, 3, stride=2, padding=1),
                        nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    x = torch.randn(2, 3, 8, 8)
    before = net(x)
    adapters = LoRAAdapters(net, target_layers(net), rank=2, alpha=4.0)
    assert adapters.paths == ["0", "2", "4"]
    assert torch.equal(net(x), before)  # B = 0: the student starts as the teacher
    _perturb(adapters)
    hooked = net(x)
    assert (hooked - before).abs().max() > 1e-3
    with adapters.disabled():
        assert torch.equal(net(x), before)

    tensors = adapters.file_tensors()
    keys = ("lora_down.weight", "lora_up.weight", "alpha")
    assert set(tensors) == {f"{p}.{k}" for p in ("0", "2", "4") for k in keys}
    merged = copy.deepcopy(net)
    adapters.detach()
    assert torch.equal(net(x), before)
    assert merge(net, tensors) == 3
    assert torch.allclose(net(x), hooked, atol=1e-5)
    assert torch.allclose(merged(x), hooked, atol=1e-6)  # a deep copy keeps its own working adapters


def test_deep_copy_pairs_the_copied_adapters_with_the_copied_layers(tiny_edm):
    student, teacher = make_student(copy.deepcopy(tiny_edm), kind="lora", rank=2)
    _perturb(student.lora)
    x, s, y = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 5.0]), torch.tensor([1, 2])
    twin = copy.deepcopy(student)
    assert torch.allclose(twin(x, s, y), student(x, s, y))
    with student.lora.disabled():
        assert torch.equal(student(x, s, y), teacher(x, s, y))
        assert not torch.allclose(twin(x, s, y), teacher(x, s, y))  # the copy's adapters stay on
    student.lora.detach()
    assert torch.equal(student(x, s, y), tiny_edm(x, s, y))
    assert not torch.equal(twin(x, s, y), tiny_edm(x, s, y))


def _source(denoiser):
    return TeacherSource("tiny", denoiser, (1, 8, 8), lambda b, g: torch.randint(10, (b,), generator=g),
                         torch.tensor([10]), 2.0)


def _lora_sfd(tiny_edm, out, **kw):
    cfg = DistillConfig(**{"iters": 4, "batch": 4, "steps": 2, "teacher_substeps": 2, "lr": 1e-2,
                           "checkpoint_every": 2, "out": str(out), "student": "lora", "lora_rank": 2, **kw})
    return build_method(_source(copy.deepcopy(tiny_edm)), cfg)


def test_lora_training_changes_only_the_adapters_and_saves_the_stock_key_format(tiny_edm, tmp_path):
    m = _lora_sfd(tiny_edm, tmp_path)
    assert isinstance(m.teacher.denoiser, AdaptersOff)
    base = {k: v.clone() for k, v in m.source.denoiser.state_dict().items()}
    result = Trainer(m, m.cfg).fit()
    release_teacher(m.student)
    assert all(torch.equal(v.cpu(), base[k].cpu()) for k, v in m.source.denoiser.state_dict().items())
    ups = [a.lora_up.weight for a in result.student.lora.adapters]
    assert any(u.abs().max() > 0 for u in ups)  # the adapters learned something

    path = save_student(tmp_path / "s.safetensors", result.student, m.card())
    saved, card = load(path)
    assert card["student"] == {"kind": "lora", "rank": 2, "alpha": 2.0, "layers": len(result.student.lora.paths)}
    assert all(k.startswith("net.") and k.endswith((".lora_up.weight", ".lora_down.weight", ".alpha"))
               for k in saved)
    assert len(saved) == 3 * len(result.student.lora.paths)

    # the file merged into the teacher's weights samples like the student it came from
    teacher = CFGTeacher(tiny_edm, 2.0, torch.tensor([10]))
    student = load_student(path, teacher)
    x, y = torch.randn(3, 1, 8, 8) * 80, torch.tensor([0, 4, 9])
    merged = copy.deepcopy(tiny_edm)
    merge(merged, saved)
    expected = few_step(merged, x, student.sigmas(2), y, afs=True)
    assert torch.allclose(sample(student, x, y), expected, atol=1e-4)
    trained = few_step(lambda x, s, c: result.student(x, s, c), x, student.sigmas(2), y, afs=True)
    assert torch.allclose(sample(student, x, y), trained, atol=1e-5)


class _SigintAt(Callback):
    def __init__(self, at: int):
        self.at = at

    def on_iteration(self, trainer, record):
        if trainer.iteration == self.at:
            os.kill(os.getpid(), signal.SIGINT)


def test_lora_checkpoints_hold_only_adapters_and_resume_exactly(tiny_edm, tmp_path):
    m = _lora_sfd(tiny_edm, tmp_path / "a", iters=5)
    straight = Trainer(m, m.cfg).fit()
    m1 = _lora_sfd(tiny_edm, tmp_path / "b", iters=5)
    assert Trainer(m1, m1.cfg, callbacks=[_SigintAt(3)]).fit().status == "interrupted"
    state, meta = load_checkpoint(tmp_path / "b" / "checkpoints")
    assert meta["iteration"] == 3
    assert state["nets"]["student"] and all(k.startswith("lora.") for k in state["nets"]["student"])
    m2 = _lora_sfd(tiny_edm, tmp_path / "b", iters=5)
    resumed = Trainer(m2, m2.cfg).fit(resume=True)
    a, b = straight.student.lora.file_tensors(), resumed.student.lora.file_tensors()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_cancel_raised_by_a_callback_saves_a_checkpoint_first(tiny_edm, tmp_path):
    class Cancel(Callback):
        def on_iteration(self, trainer, record):
            if trainer.iteration == 3:
                raise KeyboardInterrupt("cancelled by the host")

    m = _lora_sfd(tiny_edm, tmp_path, iters=6, checkpoint_every=10)
    with pytest.raises(KeyboardInterrupt):
        Trainer(m, m.cfg, callbacks=[Cancel()]).fit()
    assert load_checkpoint(tmp_path / "checkpoints")[1]["iteration"] == 3
    release_teacher(m.student)
    m2 = _lora_sfd(tiny_edm, tmp_path, iters=6, checkpoint_every=10)
    assert Trainer(m2, m2.cfg).fit(resume=True).iteration == 6


def test_student_kind_is_checked():
    with pytest.raises(ValueError, match="student must be one of"):
        DistillConfig(student="qlora")


class _HalfPrecision(nn.Module):
    """A denoiser whose network computes in bf16 from float32 inputs (as a ComfyUI model casts for itself)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.sigma_min, self.sigma_max = inner, inner.sigma_min, inner.sigma_max

    def forward(self, x, sigma, cond=None):
        return self.inner(x.to(torch.bfloat16), torch.as_tensor(sigma).to(torch.bfloat16), cond).float()


def test_adapters_on_a_half_precision_base_train_in_float32_and_the_base_stays_in_eval_mode(tiny_edm, tmp_path):
    """The frozen base of a LoRA student is the teacher's own network: it keeps its precision (fp16 here, as a
    CUDA ComfyUI loads it) and its eval mode; the adapters, the only trained weights, are float32."""
    base = _HalfPrecision(copy.deepcopy(tiny_edm).to(torch.bfloat16))
    base.inner.net.dropout = nn.Dropout(0.5)  # a module whose train mode would change the teacher's outputs
    base.eval()
    cfg = DistillConfig(iters=2, batch=4, steps=2, teacher_substeps=2, student="lora", lora_rank=2,
                        checkpoint_every=0, out=str(tmp_path))
    m = build_method(_source(base), cfg)
    trainer = Trainer(m, cfg)
    assert m.student.training and not base.training and not base.inner.net.dropout.training
    trained = [p for p in m.student.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert all(p.dtype == torch.bfloat16 for p in base.parameters() if not p.requires_grad)
    assert all(p.dtype == torch.float32 for g in trainer.optimizers["student"].param_groups for p in g["params"])
    trainer.fit()
    assert not base.training and all(p.dtype == torch.float32 for p in trained)
    release_teacher(m.student)


def test_the_trainer_keeps_trainable_parameters_in_float32():
    from distill_core.train.optim import keep_trainables_float32

    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)).half()
    net[0].requires_grad_(False)
    keep_trainables_float32(net)
    assert net[0].weight.dtype == torch.float16 and net[1].weight.dtype == torch.float32
