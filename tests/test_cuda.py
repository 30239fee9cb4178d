"""CUDA correctness: the built-in teacher computes on CUDA what it computes on the CPU, the attention
backend chosen for CUDA tensors computes softmax(q k^T / sqrt(d)) v, and SFD trains in bf16 on CUDA
through the real trainer into a student file that loads and samples on the CPU.

Gated on a CUDA device (``-m cuda`` selects them). Tolerances are set from float32 rounding, with TF32
switched off for the float32 comparisons (cuDNN allows TF32 convolutions by default, 10 mantissa bits):
a wrong layout, a missing scale or a stale device would miss them by orders of magnitude.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from distill_core import attention
from distill_core.builtin import NUM_CLASSES, SHAPE, load_builtin_teacher
from distill_core.config import DistillConfig
from distill_core.eval.fidelity import psnr
from distill_core.methods.sfd import teacher_states
from distill_core.sampling import few_step, sample
from distill_core.schedules import karras
from distill_core.solvers import SOLVERS
from distill_core.sources import builtin_source
from distill_core.student_files import load_student
from distill_core.teacher import CFGTeacher
from distill_core.train.run import train_student

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture
def fp32():
    """Full float32 on CUDA: no TF32 in cuDNN convolutions or cuBLAS matmuls, restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _teacher_inputs(n: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noisy inputs x = x0 + sigma n over the whole horizon (sigma 0.006 .. 80), every class and the null class."""
    gen = torch.Generator().manual_seed(0)
    sigma = torch.logspace(math.log10(0.006), math.log10(80.0), n)
    x0 = torch.rand((n, *SHAPE), generator=gen) * 2 - 1
    x = x0 + sigma.view(-1, 1, 1, 1) * torch.randn((n, *SHAPE), generator=gen)
    return x, sigma, torch.arange(n) % (NUM_CLASSES + 1)


def test_builtin_teacher_on_cuda_matches_the_cpu(fp32):
    x, sigma, labels = _teacher_inputs()
    cpu, gpu = load_builtin_teacher(), load_builtin_teacher(device="cuda")
    with torch.no_grad():
        exact = load_builtin_teacher().double()(x.double(), sigma.double(), labels)
        on_cpu = cpu(x, sigma, labels)
        on_gpu = gpu(x.cuda(), sigma.cuda(), labels.cuda()).cpu()
    assert on_gpu.dtype == torch.float32 and on_gpu.shape == x.shape
    # float32 rounding of either device against float64: of order 1e-6 for outputs of order 1
    cpu_err = (on_cpu.double() - exact).abs().max().item()
    gpu_err = (on_gpu.double() - exact).abs().max().item()
    assert cpu_err < 1e-4 and gpu_err < 1e-4, (cpu_err, gpu_err)


def test_guided_solve_on_cuda_matches_the_cpu(fp32):
    # 16 DPM-Solver++(2M) steps with CFG (w = 2): per-call differences must not grow along a trajectory
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn((40, *SHAPE), generator=gen) * 80.0
    labels = torch.arange(40) % NUM_CLASSES
    sigmas = karras(16, 0.006, 80.0)
    uncond = torch.tensor([NUM_CLASSES])
    with torch.no_grad():
        on_cpu = SOLVERS["dpmpp_2m"](CFGTeacher(load_builtin_teacher(), 2.0, uncond), noise, sigmas, labels)
        on_gpu = SOLVERS["dpmpp_2m"](
            CFGTeacher(load_builtin_teacher(device="cuda"), 2.0, uncond.cuda()), noise.cuda(), sigmas.cuda(),
            labels.cuda(),
        ).cpu()
    assert psnr(on_gpu.clamp(-1, 1), on_cpu.clamp(-1, 1)) > 80.0


def _attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v in float64 on the CPU, from the inputs as given (already rounded)."""
    q, k, v = (t.double().cpu() for t in (q, k, v))
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


@pytest.mark.parametrize(
    "dtype, tol",
    [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)],  # bf16: 8 mantissa bits in the output and the softmax
)
@pytest.mark.parametrize("shape", [(2, 1, 16, 64), (3, 4, 256, 32)])  # the teacher's block; a longer sequence
def test_attention_on_cuda_matches_the_softmax_formula(fp32, dtype, tol, shape):
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(shape, generator=gen).to("cuda", dtype) for _ in range(3))
    out = attention.attention(q, k, v)
    assert out.shape == shape and out.dtype == dtype and out.device.type == "cuda"
    err = (out.double().cpu() - _attention_math(q, k, v)).abs().max().item()
    assert err < tol, (attention.backend_for(q.device), err)


def test_attention_backend_on_cuda():
    backend = attention.backend_for(torch.device("cuda"))
    if importlib.util.find_spec("xformers") is None:
        assert backend == "sdpa"
    assert backend in ("xformers", "sdpa")
    assert attention.backend_for(torch.device("cpu")) == "sdpa"


def test_sfd_in_bf16_on_cuda_trains_a_student_that_samples_on_the_cpu(tmp_path):
    source = builtin_source()
    cfg = DistillConfig(steps=4, iters=30, batch=32, mixed_precision="bf16", checkpoint_every=10,
                        out=str(tmp_path / "run"))
    run = train_student(cfg, source, progress=False)
    assert next(source.denoiser.parameters()).device.type == "cpu"  # the teacher is back where it was

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 30 and sum(r["nonfinite_grads"] for r in records) == 0
    for r in records:  # four student steps per iteration (NFE 4, the first step analytic)
        assert set(r["loss"]) == {"1", "2", "3", "4"}
        assert all(math.isfinite(v) and v > 0 for v in (*r["loss"].values(), *r["grad_norm"].values()))
    last_step = [r["loss"]["4"] for r in records]
    assert sum(last_step[-5:]) / 5 < 0.8 * last_step[0], last_step

    # on the CPU, in float32: the student lands closer to the teacher's solution than the untrained
    # student does (the teacher itself taking the same 4 Euler steps)
    teacher = CFGTeacher(source.denoiser, source.guidance, source.uncond)
    student = load_student(run.path, teacher)
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn((64, *SHAPE), generator=gen) * 80.0
    labels = torch.arange(64) % NUM_CLASSES
    sigmas = student.sigmas()
    with torch.no_grad():
        target = teacher_states(teacher, noise, sigmas, labels, cfg.teacher_substeps)[-1].clamp(-1, 1)
        images = sample(student, noise, labels)
        untrained = few_step(teacher, noise, sigmas, labels, afs=True)
    assert images.shape == noise.shape and images.dtype == torch.float32 and torch.isfinite(images).all()
    before, after = psnr(untrained.clamp(-1, 1), target), psnr(images.clamp(-1, 1), target)
    assert after > before + 1.0, (before, after)


def test_builtin_teacher_under_bf16_autocast_stays_close_to_float32(fp32):
    # the parity of the precision the trainer uses on CUDA: a guided 16-step solve (DPM-Solver++(2M), w = 2)
    # under bf16 autocast against the same solve in float32; the PSNR is printed for the results page
    gen = torch.Generator().manual_seed(4)
    noise = torch.randn((40, *SHAPE), generator=gen).cuda() * 80.0
    labels = torch.arange(40).cuda() % NUM_CLASSES
    sigmas = karras(16, 0.006, 80.0).cuda()
    teacher = CFGTeacher(load_builtin_teacher(device="cuda"), 2.0, torch.tensor([NUM_CLASSES]).cuda())
    with torch.no_grad():
        exact = SOLVERS["dpmpp_2m"](teacher, noise, sigmas, labels).clamp(-1, 1)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = SOLVERS["dpmpp_2m"](teacher, noise, sigmas, labels).float().clamp(-1, 1)
        x, sigma, classes = _teacher_inputs()
        one_call = teacher.denoiser(x.cuda(), sigma.cuda(), classes.cuda())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            one_call_bf16 = teacher.denoiser(x.cuda(), sigma.cuda(), classes.cuda()).float()
    solve_psnr = psnr(bf16.cpu(), exact.cpu())
    call_err = (one_call_bf16 - one_call).abs().max().item()
    print(f"bf16 autocast vs float32: 16-step guided solve PSNR {solve_psnr:.2f} dB, one call max |diff| "
          f"{call_err:.4f}")
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 0.002 per operation): tens of dB, not the 80+ of
    # float32 against float32 above; a wrong cast (fp16 overflow, a lost scale) falls far below
    assert solve_psnr > 30.0 and call_err < 0.1, (solve_psnr, call_err)


def test_a_run_that_cannot_fit_the_gpu_is_refused_before_training_and_auto_micro_batches_fit(tmp_path):
    from distill_core.memory_plan import DoesNotFit
    from distill_core.methods.registry import build_method
    from distill_core.train.trainer import Trainer

    free = torch.cuda.mem_get_info()[0]
    batch = 2**int(math.log2(free / 2e6) + 3)  # about 2 MB of activations per sample: 8 x the free memory
    cfg = DistillConfig(iters=1, batch=batch, checkpoint_every=0, out=str(tmp_path / "big"))
    with pytest.raises(DoesNotFit, match=r"GiB free; try grad_accum \d+ \(micro-batches of \d+\)"):
        Trainer(build_method(builtin_source(), cfg), cfg)
    auto = cfg.replace(grad_accum=0)
    trainer = Trainer(build_method(builtin_source(), auto), auto)
    assert trainer.grad_accum >= 8 and trainer.memory_plan.peak <= free + trainer.memory_plan.resident


def test_the_main_job_evaluates_on_the_gpu_it_trained_on(tmp_path, monkeypatch, fp32):
    from distill_core import main_job
    from distill_core.eval import benchmark

    sampled_on = []
    real = benchmark.sample_in_batches

    def spy(fn, ev, batch=250):
        sampled_on.append(ev.device.type)
        images, seconds = real(fn, ev, batch)
        assert images.device.type == "cpu"  # the rows' metrics read CPU tensors
        return images, seconds

    monkeypatch.setattr(benchmark, "sample_in_batches", spy)
    cfg = DistillConfig(iters=2, batch=4, steps=2, eval_samples=10, checkpoint_every=0, out=str(tmp_path / "run"))
    report = main_job.distill(cfg, progress=False)
    assert sampled_on and set(sampled_on) == {"cuda"}, sampled_on
    assert report["device"].startswith("cuda")
    assert (tmp_path / "run" / "grid.png").is_file()

    # the same student evaluated on the CPU scores what the GPU evaluation reported
    source = builtin_source()
    teacher = CFGTeacher(source.denoiser, source.scale(cfg.guidance), source.uncond)
    ev = benchmark.eval_set(teacher, cfg.eval_samples, seed=cfg.seed + 1)
    with torch.no_grad():
        images = sample(load_student(tmp_path / "run" / "student.safetensors", teacher), ev.noise, ev.labels)
    cpu_psnr = psnr(images.clamp(-1, 1), ev.reference.clamp(-1, 1))
    assert abs(cpu_psnr - report["student_psnr_db"]) < 0.05, (cpu_psnr, report["student_psnr_db"])


def test_a_full_students_export_adds_no_gpu_memory(tmp_path):
    """The end of a full-weight run on the GPU: the student to save is copied to the CPU weight by weight, so the
    GPU's peak does not rise above what training held (a copy on the GPU first would add the network's size)."""
    from distill_core.methods import build_method
    from distill_core.train.trainer import Trainer

    source = builtin_source()
    cfg = DistillConfig(steps=2, iters=1, batch=4, student="full", checkpoint_every=0, out=str(tmp_path))
    trainer = Trainer(build_method(source, cfg), cfg)
    trainer.fit()
    net = trainer.unwrapped()
    assert next(net.parameters()).device.type == "cuda"
    size = sum(t.numel() * t.element_size() for t in (*net.parameters(), *net.buffers()))
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    student = trainer.export_student()
    assert all(t.device.type == "cpu" for t in student.parameters())
    assert torch.cuda.max_memory_allocated() - before < size / 10


def test_a_pipelines_encoders_run_on_the_gpu_and_give_the_cpus_tables(tmp_path, monkeypatch, fp32):
    """A pipeline's prompts (SD1.x's CLIP) and Qwen-Image-Edit's pairs (its Qwen2.5-VL reading each image, its VAE
    encoding them) are encoded on the GPU, each model there only while it runs, into CPU tables that hold what the
    CPU encodes."""
    from distill_core.text_pipeline import encode_prompts
    from distill_core.vision_prompts import vision_tables
    from tests.test_edit_pipelines import image_folder
    from tests.test_qwen_image_edit_pipelines import qwen_edit_pipeline_dir
    from tests.test_teacher_from_dir import text_pipeline_dir

    sd = text_pipeline_dir(tmp_path / "sd")
    edit = qwen_edit_pipeline_dir(tmp_path / "edit")
    files = sorted(image_folder(tmp_path, 40, 40).iterdir())
    prompts = ["make it snowy", "put an owl on it"]

    def tables() -> dict:
        index = json.loads((sd / "model_index.json").read_text())
        text, reference, _ = vision_tables(edit, "QwenImageEditPipeline", prompts, None, files, False)
        return {**encode_prompts(sd, index, prompts, (4, 8, 8)), **{f"edit_{k}": v for k, v in text.items()},
                **reference}

    torch.cuda.reset_peak_memory_stats()
    gpu = tables()
    assert torch.cuda.max_memory_allocated() > 0  # the encoders ran there
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = tables()
    assert gpu.keys() == cpu.keys()
    for key, table in gpu.items():
        assert table.device.type == "cpu", key
        torch.testing.assert_close(table, cpu[key], atol=1e-4, rtol=1e-4)


def test_an_fp8_layer_on_cuda_keeps_a_byte_per_weight_through_forward_and_backward():
    """A stack of 8-bit Linear layers under bf16 autocast on CUDA: its output within e4m3's rounding of the bf16
    stack's, and its peak memory through a forward and a backward pass for its input's gradient (a LoRA's path
    through its frozen base), weights included, below the bf16 stack's by more than an eighth of the bf16 weights:
    half of them saved, less the widened copy of about one layer at a time (a copy kept per layer would put it
    above the bf16 stack's)."""
    from torch import nn

    from distill_core.fp8 import store_linear_fp8

    def stack() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(*(nn.Linear(4096, 4096, bias=False) for _ in range(8))).cuda().requires_grad_(False)

    def peak(net: nn.Module) -> tuple[torch.Tensor, int]:
        x = torch.randn(16, 4096, device="cuda", generator=torch.Generator("cuda").manual_seed(1), requires_grad=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = net(x)
        y.float().square().sum().backward()
        torch.cuda.synchronize()
        return y.detach().float(), torch.cuda.max_memory_allocated()

    half = stack().to(torch.bfloat16)
    weights = sum(p.numel() * p.element_size() for p in half.parameters())
    expected, half_peak = peak(half)
    del half
    torch.cuda.empty_cache()
    eight = stack()
    store_linear_fp8(eight, set())
    ours, eight_peak = peak(eight)
    assert (ours - expected).norm() / expected.norm() < 0.12  # eight layers' rounding: 0.073 under CPU autocast
    assert half_peak - eight_peak > weights / 8, (half_peak, eight_peak, weights)
