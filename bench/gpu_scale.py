"""Memory and speed of distillation at real model sizes: Stable Diffusion 1.5, SDXL and a Flux-dev-size
transformer, on one CUDA GPU.

    python bench/gpu_scale.py [--quick] [--tiny] [--models sd15 sdxl flux] [--iters 3] [--out FILE.json]

Each network is built from its published configuration with random weights (nothing is downloaded; the
numbers depend on the architecture, not the weights): SD 1.5's UNet (0.86 B parameters, 512 px, text
embeddings 77 x 768), SDXL's UNet (2.6 B, 1024 px, 77 x 2048 with the pooled embedding and size conditions)
and a Flux-dev transformer (11.9 B, 19 double and 38 single blocks of width 3072, 1024 px, 512 T5 tokens,
the guidance embedding). Frozen weights are bf16, trained weights float32, autocast bf16. For every
configuration (method, student, resolution, batch, gradient checkpointing) it trains ``--iters``
iterations after one untimed warm-up and writes a row:

* ``peak_memory_mb``: the CUDA allocator's peak over the timed iterations (weights included);
  ``plan_mb``: the memory plan's estimate made before training (``distill_core.memory_plan``) and
  ``plan_error``: (plan - peak) / peak; ``activation_mb_per_sample``, ``resident_mb``: the plan's parts, from
  which ``memory_plan.FACTORS`` is measured (``implied_factor``: the f that makes the plan exact);
* ``seconds_per_iter``; ``teacher_seconds_per_image``: the teacher's own sampling time per image at its usual
  step count (25 steps of CFG for SD 1.5, 30 for SDXL, 28 guidance-embedded steps for Flux) for comparison;
* ``projected_gpu_hours``: a run at SFD's published training length (200,000 trajectories, Zhou et al.
  2024) at this configuration's seconds per sample.

SFD rows use the paper's settings (DPM-Solver++(3M), four teacher steps per student step, fresh trajectories,
guidance 1 as SFD distils Stable Diffusion); DMD2 rows distil at CFG 4.5 (SD 1.5, SDXL; the Flux row uses the
embedded guidance) with ``critic_updates`` 5. ``--tiny`` builds the same families at toy widths on the CPU
(the test of this script); ``--quick`` runs one timed iteration. On an H200 the full set takes about 6 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill_core.atomic import write_json  # noqa: E402
from distill_core.config import SD_SIGMA_MIN, DistillConfig  # noqa: E402
from distill_core.denoisers.base import move_cond  # noqa: E402
from distill_core.denoisers.diffusers import DiffusersDenoiser  # noqa: E402
from distill_core.denoisers.flow import FLOW_SIGMA_MAX, FlowDenoiser  # noqa: E402
from distill_core.eval.memory import MIB, with_peak_memory  # noqa: E402
from distill_core.memory_plan import MemoryPlan  # noqa: E402
from distill_core.methods.base import TeacherSource  # noqa: E402
from distill_core.methods.registry import build_method  # noqa: E402
from distill_core.options import positive  # noqa: E402
from distill_core.student_files import release_teacher  # noqa: E402
from distill_core.teacher import CFGTeacher  # noqa: E402
from distill_core.train.run import frozen_precision  # noqa: E402
from distill_core.train.trainer import Trainer  # noqa: E402

#: SFD's training length in trajectories (the projection's budget)
SFD_TRAJECTORIES = 200_000

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
#: the same families at toy widths (``--tiny``)
TINY = {
    "sd15": dict(SD15_UNET, block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, norm_num_groups=8,
                 attention_head_dim=4, layers_per_block=1),
    "sdxl": dict(SDXL_UNET, block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 2),
                 attention_head_dim=(2, 4, 4), cross_attention_dim=32, norm_num_groups=8, layers_per_block=1,
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=112),
    "flux": dict(FLUX_DEV, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)),
}
#: text tokens and widths of the conditions: (tokens, width, pooled width)
TEXT = {"sd15": (77, 768, 0), "sdxl": (77, 2048, 1280), "flux": (512, 4096, 768)}
TINY_TEXT = {"sd15": (8, 32, 0), "sdxl": (8, 32, 64), "flux": (8, 32, 16)}
#: the teacher's own sampling: steps, CFG scale (1: none, Flux's guidance is embedded)
TEACHER_SAMPLING = {"sd15": (25, 7.5), "sdxl": (30, 7.0), "flux": (28, 1.0)}


@dataclass(frozen=True)
class Row:
    """One configuration to measure."""

    model: str
    method: str
    student: str
    resolution: int
    batch: int
    checkpointing: bool
    frozen: str = "as-loaded"  # the run's frozen_precision: the network is built in bf16, fp8 casts it further

    @property
    def name(self) -> str:
        ck = " +ckpt" if self.checkpointing else ""
        frozen = "" if self.frozen == "as-loaded" else f" {self.frozen}"
        return f"{self.model} {self.method}-{self.student} {self.resolution}px b{self.batch}{ck}{frozen}"


#: in order: the issue's targets first, then the rows that calibrate the plan and show the levers
ROWS = (
    Row("sd15", "sfd", "lora", 512, 4, False),
    Row("sdxl", "sfd", "lora", 1024, 1, True),
    Row("flux", "sfd", "lora", 1024, 1, True),
    Row("flux", "sfd", "lora", 1024, 1, True, "fp8"),
    Row("sd15", "dmd2", "lora", 512, 4, False),
    Row("sdxl", "dmd2", "lora", 1024, 1, True),
    Row("flux", "dmd2", "lora", 1024, 1, True),
    Row("sd15", "sfd", "full", 512, 4, False),
    Row("sd15", "sfd", "lora", 256, 2, False),
    Row("sdxl", "sfd", "lora", 512, 1, True),
    Row("flux", "sfd", "lora", 512, 1, True),
    Row("sdxl", "sfd", "lora", 1024, 1, False),
    Row("sd15", "sfd", "lora", 512, 4, True),
)
TINY_ROWS = (
    Row("sd15", "sfd", "lora", 64, 2, False),
    Row("sd15", "sfd", "full", 64, 2, True),
    Row("sdxl", "dmd2", "lora", 64, 1, True),
    Row("flux", "sfd", "lora", 64, 1, True),
    Row("flux", "sfd", "lora", 64, 1, True, "fp8"),
    Row("flux", "dmd2", "lora", 64, 1, False),
)


class FluxVelocity(nn.Module):
    """A diffusers ``FluxTransformer2DModel`` as a velocity network ``net(x_t, t, cond)`` on latents
    [B, C, H, W]: 2 x 2 patches packed into tokens with their (0, row, column) position ids; ``cond`` holds
    the text tokens, the pooled embedding and the embedded guidance scale."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(x.device, x.dtype)
        txt_ids = torch.zeros(cond["text"].shape[1], 3, device=x.device, dtype=x.dtype)
        out = self.transformer(hidden_states=tokens, timestep=t, guidance=cond["guidance"],
                               encoder_hidden_states=cond["text"], pooled_projections=cond["pooled"],
                               img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
        return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def build_network(model: str, tiny: bool, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The model's network with random weights, built on ``device`` in ``dtype``, frozen."""
    import diffusers

    config = TINY[model] if tiny else {"sd15": SD15_UNET, "sdxl": SDXL_UNET, "flux": FLUX_DEV}[model]
    cls = diffusers.FluxTransformer2DModel if model == "flux" else diffusers.UNet2DConditionModel
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialised in its final precision: no float32 copy of 12 B parameters
    try:
        with device:
            net = cls(**config)
    finally:
        torch.set_default_dtype(default)
    return net.eval().requires_grad_(False)


def sd_denoiser(network: nn.Module) -> DiffusersDenoiser:
    """A Stable Diffusion UNet on its training schedule (DDPM "scaled_linear", betas 0.00085 to 0.012, epsilon
    prediction), read from diffusers' own scheduler."""
    import diffusers

    scheduler = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return DiffusersDenoiser.from_scheduler(network, scheduler)


def teacher_source(model: str, network: nn.Module, resolution: int, tiny: bool, guidance: float) -> TeacherSource:
    """A text-conditioned teacher of random text embeddings (their values do not change memory or time)."""
    tokens, width, pooled = (TINY_TEXT if tiny else TEXT)[model]
    channels = 16 if model == "flux" else 4
    shape = (channels, resolution // 8, resolution // 8)

    def condition(n: int, gen: torch.Generator | None, scale: float = 1.0) -> dict:
        text = torch.randn((n, tokens, width), generator=gen) * scale
        if model == "flux":
            return {"text": text, "pooled": torch.randn((n, pooled), generator=gen) * scale,
                    "guidance": torch.full((n,), 3.5)}
        if model == "sdxl":
            size = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)
            return {"encoder_hidden_states": text, "added_cond_kwargs": {
                "text_embeds": torch.randn((n, pooled), generator=gen) * scale, "time_ids": size.expand(n, 6)}}
        return {"encoder_hidden_states": text}

    if model == "flux":
        denoiser = FlowDenoiser(FluxVelocity(network), sigma_min=0.002, sigma_max=FLOW_SIGMA_MAX)
    else:
        denoiser = sd_denoiser(network)
    return TeacherSource(name=model, denoiser=denoiser, shape=shape, draw_cond=condition,
                         uncond=None if model == "flux" else condition(1, None, 0.0), guidance=guidance)


def run_config(row: Row, tiny: bool, iters: int) -> DistillConfig:
    """The run's config: SFD at the paper's settings, DMD2 at its defaults with 5 critic updates."""
    cuda = torch.cuda.is_available()
    common = dict(method=row.method, steps=4, batch=row.batch, student=row.student, lora_rank=16 if tiny else 64,
                  iters=iters + 1, mixed_precision="bf16" if cuda else "no", grad_checkpointing=row.checkpointing,
                  checkpoint_every=0, sigma_min=SD_SIGMA_MIN, frozen_precision=row.frozen,
                  out=tempfile.mkdtemp(prefix="gpu_scale_"))
    if row.method == "sfd":
        return DistillConfig(**common, guidance=1.0, teacher_solver="dpmpp_3m", teacher_substeps=4,
                             teacher_reuse=1.0)
    return DistillConfig(**common, guidance=1.0 if row.model == "flux" else 4.5, critic_updates=5)


def teacher_seconds_per_image(source: TeacherSource, model: str) -> float:
    """The teacher's sampling time per image at its usual step count: one (CFG-batched) evaluation at batch 1,
    timed over 3 calls after a warm-up, times the steps."""
    steps, w = TEACHER_SAMPLING[model]
    device = next(source.denoiser.parameters()).device
    teacher = CFGTeacher(source.denoiser, w, None if w == 1 else source.uncond)
    x = torch.randn((1, *source.shape), device=device)
    cond = move_cond(source.draw_cond(1, torch.Generator().manual_seed(0)), device)
    autocast = torch.autocast(device.type, torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        teacher(x, 1.0, cond)
        _sync()
        start = time.perf_counter()
        for _ in range(3):
            teacher(x, 1.0, cond)
        _sync()
    return (time.perf_counter() - start) / 3 * steps


def measure(row: Row, network: nn.Module, tiny: bool, iters: int) -> dict:
    """Train ``row``'s configuration for a warm-up and ``iters`` timed iterations; its row."""
    cfg = run_config(row, tiny, iters)
    source = teacher_source(row.model, network, row.resolution, tiny, cfg.guidance)
    params = sum(p.numel() for p in network.parameters())
    frozen_precision(cfg, source)  # fp8: the Linear layers' weights in 8 bits
    if hasattr(network, "disable_gradient_checkpointing"):
        network.disable_gradient_checkpointing()  # a previous row's; the Trainer switches it on where asked
    method = build_method(source, cfg)
    trainer = Trainer(method, cfg)
    try:
        trainer.step()
        _sync()

        def timed() -> float:
            start = time.perf_counter()
            for _ in range(iters):
                trainer.step()
            _sync()
            return (time.perf_counter() - start) / iters

        seconds, peak = with_peak_memory(timed)
        teacher_s = teacher_seconds_per_image(source, row.model)
    finally:
        for name in method.nets:
            release_teacher(trainer.unwrapped(name))
    out = {
        "model": row.model, "method": row.method, "student": row.student, "resolution": row.resolution,
        "batch": row.batch, "grad_checkpointing": row.checkpointing, "name": row.name,
        "frozen_precision": row.frozen, "params": params,
        "trained_params": sum(p.numel() for ps in trainer.params.values() for p in ps),
        "peak_memory_mb": None if peak is None else round(peak, 1),
        "seconds_per_iter": round(seconds, 3),
        "teacher_seconds_per_image": round(teacher_s, 3),
        "projected_gpu_hours": round(seconds / row.batch * SFD_TRAJECTORIES / 3600, 1),
    }
    return {**out, **plan_fields(trainer.memory_plan, peak)}


def plan_fields(plan: MemoryPlan, peak_mb: float | None) -> dict:
    """The plan beside the measured peak, with the factor f that would have made it exact."""
    fields = {"plan_mb": round(plan.peak / MIB, 1), "resident_mb": round((plan.frozen + plan.trained) / MIB, 1),
              "activation_mb_per_sample": round(plan.activations_per_sample / MIB, 2), "plan_factor": plan.factor,
              "family": plan.family}
    if peak_mb:
        fields["plan_error"] = round((plan.peak / MIB - peak_mb) / peak_mb, 3)
        activations = peak_mb * MIB - plan.frozen - plan.trained
        fields["implied_factor"] = round(activations / (plan.micro_batch * plan.activations_per_sample), 3)
    return fields


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_in_process(row: Row, args: argparse.Namespace) -> dict:
    """``row`` measured in the running process: its network built, trained and released."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    network = build_network(row.model, args.tiny, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        return measure(row, network, args.tiny, 1 if args.quick else args.iters)
    except torch.OutOfMemoryError as e:
        return {"name": row.name, "model": row.model, "error": f"out of memory: {str(e)[:200]}"}


def measure_in_subprocess(row: Row, args: argparse.Namespace) -> dict:
    """``row`` measured by a fresh process of this script: every row starts from an empty GPU, so one row's
    peak never includes what another left behind. A row that fails with a CUDA error (reported by a later
    call than the kernel that failed) is run once more with ``CUDA_LAUNCH_BLOCKING=1``, so that its traceback
    points at the failing call."""
    command = [sys.executable, __file__, "--row", row.name, "--iters", str(args.iters),
               *(["--quick"] if args.quick else []), *(["--tiny"] if args.tiny else [])]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not done.returncode and lines:
        return json.loads(lines[-1])
    failed = {"name": row.name, "model": row.model, **failure(done.stderr)}
    if "CUDA error" in done.stderr and os.environ.get("CUDA_LAUNCH_BLOCKING") != "1":
        again = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "CUDA_LAUNCH_BLOCKING": "1"})
        failed["with_launch_blocking"] = failure(again.stderr)
    return failed


def failure(stderr: str) -> dict:
    """What a failed row's stderr says: the exception's own line (not CUDA's advice after it) and the
    traceback's last frames, innermost last."""
    lines = stderr.splitlines()
    errors = [line for line in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception)\b", line)]
    frames = [line.strip() for line in lines if line.lstrip().startswith('File "')]
    return {"error": (errors or lines or ["?"])[-1], "where": frames[-6:]}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one timed iteration per row")
    p.add_argument("--tiny", action="store_true", help="toy widths on the CPU (the test of this script)")
    p.add_argument("--models", nargs="+", default=list(TEACHER_SAMPLING), choices=list(TEACHER_SAMPLING))
    p.add_argument("--rows", nargs="+", help="only these rows, by name (default: every row of the models)")
    p.add_argument("--row", help=argparse.SUPPRESS)  # one row in this process (what each subprocess runs)
    p.add_argument("--iters", type=positive, default=3, help="timed iterations per row (after one warm-up)")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    if not (args.tiny or torch.cuda.is_available()):
        p.error("this benchmark measures a CUDA GPU: run it on one, or give --tiny for the toy-width check on CPU")
    table = TINY_ROWS if args.tiny else ROWS
    if args.row:
        row = next((r for r in table if r.name == args.row), None)
        if row is None:
            p.error(f"no row {args.row!r}")
        print(json.dumps(measure_in_process(row, args)), flush=True)
        return []
    chosen = [r for r in table if r.model in args.models and (not args.rows or r.name in args.rows)]
    rows, started = [], time.perf_counter()
    for row in chosen:
        rows.append(measure_in_subprocess(row, args))
        print(json.dumps(rows[-1]), flush=True)
        if args.out:
            write_json(args.out, rows)  # after every row: a stopped run keeps the rows it measured
    print(f"{len(rows)} rows in {time.perf_counter() - started:.0f} s")
    return rows


if __name__ == "__main__":
    main()
