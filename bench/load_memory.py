"""Host memory to load a teacher from a diffusers directory: as loaded (float32), and for a bf16 run
(``--frozen-precision bf16``: 16-bit files loaded as they are, then cast); to train a LoRA student in a bf16 run
and a full student, and to sample each with ``python -m distill_core sample``; each in a fresh process.

    python bench/load_memory.py [--teacher DIR] [--quick] [--out FILE.json]

A network of P parameters stored in 16 bits takes 4 P bytes loaded as float32 and 2 P bytes loaded as stored;
the float32 load is then cast to bf16, so its peak holds the float32 copy. Each row is the peak resident memory
of one process (Linux's high-water mark, reset just before the load) while it loads the teacher as the main job
does and casts it as the run would, beside its resident memory before the load (the interpreter, torch and
diffusers). Without ``--teacher`` the bench writes an unconditional ``UNet2DModel`` with Stable Diffusion
1.5's block widths and two layers per block (672 M parameters; ``--quick``: a quarter of the widths, 42 M) with
random weights in bf16 into a temporary folder. A text-to-image pipeline loads its text encoders first (at their
stored precision, freed before the network loads) on the shipped prompt list. The LoRA student (rank 4, 2 steps,
batch 1) trains for one iteration and is saved; the sample command then loads its teacher as the run computed it
(bf16) and hooks the adapters into that network. Both rows should lie near the bf16 load's: the adapters and
the activations above it, not a second copy of the network. A full student (float32, as its run trains it)
trains and samples the same way: the sample command loads its weights into the float32 teacher it loaded,
straight from the memory-mapped file, so the peak holds the network and the file's pages, not a third copy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRECISIONS = ("as-loaded", "bf16")
KEYS = ("teacher", "stage", "parameters", "stored_dtype", "frozen_precision", "peak_mib", "before_mib", "seconds")
#: what each row measures, of a student of each kind
LOAD, TRAIN, SAMPLE = "load", "train a {} student", "sample a {} student"
#: the students' kinds and the frozen precision each one's run takes
STUDENTS = {"lora": "bf16", "full": "as-loaded"}
KIND_WORDS = {"lora": "LoRA", "full": "full"}
#: the UNet the bench writes: SD1.5's block widths and two layers per block, in pixel space at 32 x 32
WIDTHS = (320, 640, 1280, 1280)


def write_unet(folder: Path, quick: bool) -> Path:
    """A pipeline folder (unet/, scheduler/, model_index.json) with a random-weight ``UNet2DModel`` in bf16."""
    import diffusers
    import torch

    widths = tuple(w // 4 for w in WIDTHS) if quick else WIDTHS
    unet = diffusers.UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=widths,
                                 layers_per_block=2, norm_num_groups=min(32, widths[0] // 4))
    unet.to(torch.bfloat16).save_pretrained(folder / "unet", safe_serialization=True)
    diffusers.DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    return folder


def resident_kib(field: str) -> int:
    """This process's resident memory in KiB from ``/proc/self/status``: ``VmRSS`` now, ``VmHWM`` its peak."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def measure(teacher: str, precision: str) -> dict:
    """Load ``teacher`` in this process as a run with ``precision`` does, cast it as the run would, and return
    the peak resident memory before and after."""
    import diffusers  # noqa: F401 - imported before the measurement, which is of the load alone
    import torch

    from distill_core.builtin import cast_weights
    from distill_core.diffusers_source import diffusers_source, model_and_scheduler_dirs, read_json
    from distill_core.safetensors_io import stored_dtype

    root = Path(teacher)
    index = read_json(root / "model_index.json") if (root / "model_index.json").is_file() else {}
    stored = stored_dtype(model_and_scheduler_dirs(root, index)[0])
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from the current size
    before = resident_kib("VmRSS")
    start = time.time()
    source = diffusers_source(teacher, frozen_precision=precision)
    if precision == "bf16":
        cast_weights(source.denoiser, torch.bfloat16)
    peak = resident_kib("VmHWM")
    return {"teacher": teacher, "stage": LOAD, "parameters": sum(p.numel() for p in source.denoiser.parameters()),
            "stored_dtype": str(stored).removeprefix("torch."), "frozen_precision": precision,
            "peak_mib": round(peak / 1024, 1), "before_mib": round(before / 1024, 1),
            "seconds": round(time.time() - start, 2)}


def measure_stage(stage: str, teacher: str, student: str, kind: str) -> dict:
    """Train a student of ``kind`` (lora, full) of ``teacher`` into the file ``student`` (``TRAIN``: a run of one
    iteration at batch 1, 2 steps; a LoRA of rank 4 in a bf16 run), or run ``python -m distill_core sample`` on it
    (``SAMPLE``: one image), in this process; return its peak resident memory before and after (the modules it
    imports are imported before)."""
    import diffusers  # noqa: F401 - imported before the measurement, as above

    import distill_core.plot  # noqa: F401
    import distill_core.report  # noqa: F401
    import distill_core.sample_command  # noqa: F401
    import distill_core.sampling  # noqa: F401
    from distill_core import cli
    from distill_core.config import DistillConfig
    from distill_core.sources import teacher_source
    from distill_core.train.run import train_student, within_trained_range

    Path("/proc/self/clear_refs").write_text("5")
    before = resident_kib("VmRSS")
    start = time.time()
    precision = STUDENTS[kind]
    if stage == TRAIN:
        cfg = DistillConfig(steps=2, iters=1, batch=1, student=kind, lora_rank=4, frozen_precision=precision,
                            checkpoint_every=0, teacher=teacher, out=str(Path(student).parent))
        source = teacher_source(teacher, frozen_precision=precision)
        train_student(within_trained_range(cfg, source.denoiser), source, progress=False)
    else:
        with tempfile.TemporaryDirectory() as out:
            if cli.main(["sample", student, "--count", "1", "--out", out]):
                raise SystemExit(f"sampling {student} failed")
    peak = resident_kib("VmHWM")
    return {"stage": stage.format(KIND_WORDS[kind]), "frozen_precision": precision, "peak_mib": round(peak / 1024, 1),
            "before_mib": round(before / 1024, 1), "seconds": round(time.time() - start, 2)}


def child(*args: str) -> dict:
    """The row a fresh process of this bench prints for ``args``."""
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", help="a local diffusers model or pipeline directory (default: a written UNet)")
    p.add_argument("--quick", action="store_true", help="the written UNet at a quarter of the widths")
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument("--measure", nargs=2, metavar=("DIR", "PRECISION"), help=argparse.SUPPRESS)
    p.add_argument("--measure-stage", nargs=4, metavar=("STAGE", "DIR", "STUDENT", "KIND"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure or args.measure_stage:  # the child process: one measurement, its row on stdout
        print(json.dumps(measure(*args.measure) if args.measure else measure_stage(*args.measure_stage)))
        return []
    from distill_core.train.run import STUDENT_FILE

    with tempfile.TemporaryDirectory() as tmp:
        teacher = args.teacher or str(write_unet(Path(tmp) / "unet_teacher", args.quick))
        rows = [child("--measure", teacher, precision) for precision in PRECISIONS]
        loads = {row["frozen_precision"]: row for row in rows}
        for kind, precision in STUDENTS.items():
            student = str(Path(tmp) / f"{kind}_student" / STUDENT_FILE)
            rows += [{**loads[precision], **child("--measure-stage", stage, teacher, student, kind)}
                     for stage in (TRAIN, SAMPLE)]
    if not args.teacher:
        for row in rows:
            row["teacher"] = f"UNet2DModel, SD1.5 widths{' / 4' if args.quick else ''}"
    print("  ".join(f"{k:>16}" for k in KEYS[1:]))
    for row in rows:
        print("  ".join(f"{row[k]!s:>16}" for k in KEYS[1:]))
    if args.out:
        from distill_core.atomic import write_json

        write_json(args.out, rows)
    return rows


if __name__ == "__main__":
    main()
