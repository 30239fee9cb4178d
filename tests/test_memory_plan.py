"""The memory plan (its parts counted exactly, its activations probed and extrapolated, its peak against the
measured one), the refusal it gives, and the memory levers: gradient checkpointing with several adapter sets
on one base, float32 adapters over a half-precision base, a bf16 frozen teacher."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util

import pytest
import torch
from torch import nn

from distill_core.builtin import cast_weights, fingerprint, solve_fingerprint
from distill_core.config import DistillConfig
from distill_core.denoisers.diffusers import DiffusersDenoiser
from distill_core.eval.memory import MIB, with_tensor_peak
from distill_core.memory_plan import (
    DEFAULT_FACTORS,
    FACTORS,
    TRAINED_BYTES,
    DoesNotFit,
    MemoryPlan,
    activation_bytes,
    check_fits,
    family,
    sample_activation_bytes,
)
from distill_core.methods.base import TeacherSource
from distill_core.methods.registry import build_method
from distill_core.nets.surgery import enable_checkpointing
from distill_core.sources import builtin_source
from distill_core.student_files import load_student
from distill_core.students import make_networks
from distill_core.teacher_cache import source_fingerprint
from distill_core.train.run import train_student
from distill_core.train.trainer import Trainer


def tiny_unet(dtype: torch.dtype = torch.float32) -> DiffusersDenoiser:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
    )
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return DiffusersDenoiser.from_scheduler(unet.to(dtype).eval().requires_grad_(False), scheduler)


def text_source(denoiser, side: int = 64) -> TeacherSource:
    def draw(n, gen):
        return {"encoder_hidden_states": torch.randn((n, 8, 16), generator=gen)}

    return TeacherSource("tiny-sd", denoiser, (4, side, side), draw, draw(1, torch.Generator().manual_seed(9)), 1.0)


def run(tmp_path, **settings) -> Trainer:
    cfg = DistillConfig(**{"iters": 2, "batch": 16, "checkpoint_every": 0, "out": str(tmp_path / "run"),
                           **settings})
    return Trainer(build_method(builtin_source(), cfg), cfg)


@pytest.mark.parametrize("student", ["full", "lora"])
def test_the_plan_counts_weights_and_optimizer_state_once(tmp_path, student):
    trainer = run(tmp_path, student=student)
    plan = trainer.memory_plan
    teacher = trainer.method.source.denoiser
    teacher_bytes = sum(t.numel() * t.element_size() for t in (*teacher.parameters(), *teacher.buffers()))
    trainable = sum(p.numel() for ps in trainer.params.values() for p in ps)
    # float32 weight and gradient (8 bytes) and Adam's two float32 moments (8)
    assert plan.trained_params == trainable and plan.trained == trainable * 16 and TRAINED_BYTES == 8
    # a LoRA student's base is the teacher, counted once; the student adds only its own frozen buffers (a full
    # copy's, the adapters' alpha)
    shared = {t.untyped_storage().data_ptr() for t in (*teacher.parameters(), *teacher.buffers())}
    copies = [b for b in trainer.unwrapped().buffers() if b.untyped_storage().data_ptr() not in shared]
    assert plan.frozen == teacher_bytes + sum(b.numel() * b.element_size() for b in copies)
    assert plan.family == "builtin" and plan.micro_batch == 16


def test_the_activation_probe_extrapolates_from_a_half_and_a_quarter_side():
    # a 64 x 64 latent is probed at 32 and 16 and extrapolated linearly in the pixels; the direct count at
    # 64 x 64 is what it stands for (convolutions and fused attention grow linearly, text tokens are constant)
    source = text_source(tiny_unet())
    net = source.denoiser.requires_grad_(True)
    extrapolated = sample_activation_bytes(net, source, None)
    x = torch.randn(1, 4, 64, 64)
    direct = activation_bytes(net, x, 1.0, source.draw_cond(1, torch.Generator().manual_seed(0)), None)
    assert direct > 1e6
    assert abs(extrapolated - direct) / direct < 0.05, (extrapolated, direct)


def test_a_network_that_refuses_smaller_sizes_is_probed_at_its_own():
    """PixArt's position table fails at a latent side of 32 or less: the probes at a half and a quarter of the
    side give way to one at the sample's own size."""
    source = text_source(tiny_unet())
    net = source.denoiser.requires_grad_(True)

    class Picky(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, sigma, cond, **inputs):
            if x.shape[-1] < 64:
                raise ZeroDivisionError("division by zero")
            return self.net(x, sigma, cond, **inputs)

    direct = activation_bytes(net, torch.randn(1, 4, 64, 64), 1.0, source.draw_cond(1, torch.Generator()), None)
    assert sample_activation_bytes(Picky(), source, None) == direct


#: runs the CPU factors were not measured on (``FACTORS``: full students, batch 32, and batch 64 checkpointed)
CPU_RUNS = [dict(student="full", batch=64), dict(student="lora", batch=64),
            dict(student="lora", batch=32, grad_checkpointing=True)]


def measured_peak(tmp_path, settings: dict) -> tuple[MemoryPlan, float]:
    """The plan of a run, and the tensor memory its first two iterations allocate above the weights (Adam's
    state and gradients appear in the first, the activations in each), in MiB."""
    trainer = run(tmp_path, **settings)
    _, peak = with_tensor_peak(lambda: [trainer.step() for _ in range(2)], torch.device("cpu"))
    return trainer.memory_plan, peak


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's factors: the trainer would run on CUDA here "
                    "(bench/gpu_scale.py checks the plan on CUDA)")
@pytest.mark.parametrize("settings", CPU_RUNS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_the_plan_is_within_15_percent_of_the_measured_peak_on_the_cpu(tmp_path, settings):
    plan, peak = measured_peak(tmp_path, settings)
    predicted = (plan.peak - plan.resident) / MIB  # the weights were allocated before the measurement
    assert plan.factor == FACTORS[("builtin", False, plan_checkpointing(settings))]
    assert abs(predicted - peak) / peak < 0.15, (predicted, peak)


def plan_checkpointing(settings: dict) -> bool:
    return bool(settings.get("grad_checkpointing", False))


def test_a_plan_that_does_not_fit_is_refused_with_changes_that_would():
    plan = MemoryPlan(frozen=4 * 2**30, trained_params=2**26, ema_params=0, activations_per_sample=2**30,
                      micro_batch=8, factor=1.0, family="sd")
    check_fits(plan, plan.peak, 8, 1, False, True)  # exactly enough: no refusal
    with pytest.raises(DoesNotFit) as refused:
        check_fits(plan, 8 * 2**30, batch=8, grad_accum=1, checkpointing=False, lora=False)
    message = str(refused.value)
    # 8 GiB - 4 GiB frozen - 1 GiB trained leaves room for 3 samples: micro-batches of 2 or a batch of 3
    assert "13.0 GiB" in message and "8.0 GiB free" in message
    assert "grad_accum 4 (micro-batches of 2)" in message and "batch 3" in message
    assert "grad_checkpointing on" in message and "student lora" in message
    heavy = dataclasses.replace(plan, frozen=12 * 2**30)  # frozen weights past the room: lower their precision
    for host, fix in ((False, "frozen_precision bf16, or frozen_precision fp8"),
                      (True, "the loader's weight_dtype fp8_e4m3fn")):
        with pytest.raises(DoesNotFit, match=fix):  # a ComfyUI model's precision is its loader's choice
            check_fits(heavy, 8 * 2**30, batch=8, grad_accum=1, checkpointing=True, lora=True, host=host)
    with pytest.raises(DoesNotFit) as refused:  # fp8 frozen weights are a LoRA student's base only
        check_fits(heavy, 8 * 2**30, batch=8, grad_accum=1, checkpointing=True, lora=False)
    assert "frozen_precision bf16" in str(refused.value) and "fp8" not in str(refused.value)
    bf16 = dataclasses.replace(heavy, frozen_values=heavy.frozen // 2)  # two bytes a value: only fp8 narrows them
    with pytest.raises(DoesNotFit) as refused:
        check_fits(bf16, 8 * 2**30, batch=8, grad_accum=1, checkpointing=True, lora=True)
    assert "frozen_precision fp8" in str(refused.value) and "frozen_precision bf16" not in str(refused.value)
    assert "shorter length" not in message
    with pytest.raises(DoesNotFit, match=r"a lower resolution or a shorter length \(fewer frames per clip\)"):
        check_fits(plan, 8 * 2**30, batch=8, grad_accum=1, checkpointing=False, lora=False, clips=True)


def test_weights_past_the_device_leave_only_changes_to_the_weights_or_none():
    """Wan 2.2 14B's shape on a 24 GiB GPU: two models' frozen weights, 26 GiB in fp8 (a byte a value), and a
    LoRA. Fewer samples, checkpointing or a lower resolution shrink only the activations, so they are not
    offered; loaded in bf16 (two bytes a value) the loader's fp8 is; in fp8 nothing is left, and the refusal
    says the run needs more memory."""
    fp8 = MemoryPlan(frozen=26 * 2**30, trained_params=2**24, ema_params=0, activations_per_sample=2**30,
                     micro_batch=1, factor=0.6, family="WanModel", frozen_values=26 * 2**30)
    with pytest.raises(DoesNotFit) as refused:
        check_fits(fp8, 24 * 2**30, batch=1, grad_accum=1, checkpointing=False, lora=True, host=True, clips=True)
    message = str(refused.value)
    assert "24.0 GiB free: its weights alone take 26.2 GiB, and no setting of the run makes them smaller; it needs " \
           "a device with more memory" in message
    assert not any(fix in message for fix in ("try ", "batch 1", "grad_", "resolution", "fp8_e4m3fn"))
    bf16 = dataclasses.replace(fp8, frozen=52 * 2**30)
    with pytest.raises(DoesNotFit, match=r"GiB free; try the loader's weight_dtype fp8_e4m3fn$"):
        check_fits(bf16, 24 * 2**30, batch=1, grad_accum=1, checkpointing=False, lora=True, host=True, clips=True)


def test_unmeasured_families_get_the_default_factor():
    assert family(tiny_unet()) == "sd" and ("sd", False, False) not in FACTORS
    measured = {ck: [f for (_, _, c), f in FACTORS.items() if c == ck] for ck in (False, True)}
    assert all(DEFAULT_FACTORS[ck] >= max(fs) for ck, fs in measured.items())


def grads_of_two_adapter_sets(denoiser, checkpointing: bool) -> list[torch.Tensor]:
    nets, _ = make_networks(denoiser, ("generator", "critic"), "lora", rank=4)
    for net in nets.values():  # the up-projections start at zero; make every adapter act
        for p in net.lora.parameters():
            torch.nn.init.normal_(p, std=0.1)
    if checkpointing:
        enable_checkpointing(nets["generator"])
    x = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(1))
    cond = {"encoder_hidden_states": torch.randn((2, 8, 16), generator=torch.Generator().manual_seed(2))}
    nets["generator"].train()
    loss = nets["generator"](x, 2.0, cond).square().mean()  # the critic's adapters are off in this forward
    loss.backward()  # ... and back on when the backward pass recomputes the checkpointed blocks
    grads = [p.grad.clone() for p in nets["generator"].lora.parameters()]
    for net in nets.values():
        net.lora.detach()
    return grads


def test_checkpointing_recomputes_with_the_adapters_switched_as_in_the_forward_pass():
    plain = grads_of_two_adapter_sets(tiny_unet(), checkpointing=False)
    checkpointed = grads_of_two_adapter_sets(tiny_unet(), checkpointing=True)
    assert len(plain) == len(checkpointed) > 0
    for a, b in zip(plain, checkpointed):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a - b).abs().max()


class HostBlock(torch.nn.Module):
    """A block of a host's network, called with a keyword as ComfyUI's DiT blocks are."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x, *, scale):
        return torch.tanh(self.linear(x)) * scale


class HostNet(torch.nn.Module):
    """A host's model as ComfyUI holds one: ``diffusion_model`` with a block list and a sequential block that it
    runs layer by layer (a ComfyUI UNet's input, middle and output blocks)."""

    def __init__(self):
        super().__init__()
        self.diffusion_model = torch.nn.Module()
        self.diffusion_model.blocks = torch.nn.ModuleList([HostBlock() for _ in range(3)])
        self.diffusion_model.middle = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.SiLU())

    def forward(self, x):
        for block in self.diffusion_model.blocks:
            x = block(x, scale=1.5)
        for layer in self.diffusion_model.middle:
            x = layer(x)
        return x


def test_a_hosts_network_checkpoints_its_blocks_while_training_and_gets_them_back(monkeypatch):
    """A ComfyUI model has no checkpointing switch: its blocks (and the weighted layers of the blocks it runs
    layer by layer) recompute in the backward pass, with the gradients of a plain backward; without gradients
    (the host's own sampling) they run plainly, and ``disable_checkpointing`` gives them their classes back."""
    from distill_core.nets.surgery import Checkpointed, disable_checkpointing

    torch.manual_seed(0)
    net, x = HostNet(), torch.randn(4, 8)
    net(x).square().sum().backward()
    plain = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    calls, checkpoint = [], torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    enable_checkpointing(net)
    assert [isinstance(m, Checkpointed) for m in net.diffusion_model.modules()].count(True) == 4  # not the SiLU
    with torch.no_grad():
        net(x)
    assert calls == []
    net(x).square().sum().backward()
    assert len(calls) == 4
    for a, b in zip(plain, [p.grad for p in net.parameters()]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    disable_checkpointing(net)
    assert type(net.diffusion_model.blocks[0]) is HostBlock and type(net.diffusion_model.middle[0]) is torch.nn.Linear


def test_lora_adapters_train_in_float32_over_a_half_precision_base(tmp_path):
    denoiser = tiny_unet(torch.float16)
    before = {k: v.clone() for k, v in denoiser.state_dict().items()}
    cfg = DistillConfig(iters=2, batch=2, steps=2, student="lora", lora_rank=4, checkpoint_every=0, guidance=1.0,
                        sigma_min=0.1, teacher_substeps=1, out=str(tmp_path / "run"))
    source = text_source(denoiser, side=16)
    trainer = Trainer(build_method(source, cfg), cfg)
    adapters = list(trainer.params["student"])
    assert adapters and all(p.dtype == torch.float32 for p in adapters)
    start = [p.detach().clone() for p in adapters]
    trainer.step()
    trainer.step()
    assert all(p.dtype == torch.float32 for p in adapters)
    assert any(not torch.equal(a, b) for a, b in zip(start, adapters))  # they learned
    after = denoiser.state_dict()
    assert all(after[k].dtype == torch.float16 and torch.equal(after[k].cpu(), v) for k, v in before.items())


def test_a_bf16_frozen_teacher_trains_a_float32_student(tmp_path):
    source = builtin_source()
    cfg = DistillConfig(iters=1, batch=4, steps=2, frozen_precision="bf16", checkpoint_every=0, afs_center="zero",
                        out=str(tmp_path / "run"))  # zero: no class means to solve (bf16 is slow on a CPU)
    run_ = train_student(cfg, source, progress=False)
    assert {p.dtype for p in source.denoiser.parameters()} == {torch.bfloat16}
    from safetensors import safe_open

    with safe_open(str(run_.path), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert torch.float32 in dtypes and torch.bfloat16 not in dtypes
    # the student belongs to the teacher as the user has it, in float32
    teacher = builtin_source()
    assert load_student(run_.path, teacher.denoiser, teacher.uncond).card["teacher_fingerprint"] == fingerprint(
        teacher.denoiser)
    # the cast teacher cannot serve a run in the precision it was loaded in
    with pytest.raises(ValueError, match="cast to bf16 by an earlier run in this process .* load the teacher again"):
        train_student(cfg.replace(frozen_precision="as-loaded"), source, progress=False)


def test_a_teacher_cast_after_loading_keeps_its_fingerprint_and_keys_its_solves_apart():
    source = builtin_source()
    loaded, targets = fingerprint(source.denoiser), source_fingerprint(source)
    assert solve_fingerprint(source.denoiser) == loaded
    cast_weights(source.denoiser, torch.bfloat16)
    assert {p.dtype for p in source.denoiser.parameters()} == {torch.bfloat16}
    assert fingerprint(source.denoiser) == loaded  # its students name the teacher as loaded
    assert solve_fingerprint(source.denoiser) == f"{loaded}-bfloat16"  # what it computes is another solve
    assert source_fingerprint(source) != targets  # a bf16 run never reads a float32 run's cached targets
    assert fingerprint(copy.deepcopy(source.denoiser)) != loaded  # a copy (a full student) is its own weights


def test_8bit_adam_is_planned_at_a_quarter_of_the_state_and_refused_without_cuda(tmp_path):
    full = run(tmp_path / "adam", student="full").memory_plan
    cfg = DistillConfig(iters=2, batch=16, optimizer="adam8bit", checkpoint_every=0, out=str(tmp_path / "run"))
    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None:
        plan = Trainer(build_method(builtin_source(), cfg), cfg).memory_plan
        assert plan.trained == full.trained_params * (8 + 2)
        return
    with pytest.raises(ValueError, match=r"optimizer adam8bit keeps Adam's states in 8 bits with bitsandbytes on "
                       r"CUDA: install it \(pip install bitsandbytes\) on a CUDA machine, or choose adam"):
        Trainer(build_method(builtin_source(), cfg), cfg)
    assert full.state_bytes == 8
