"""How many Heun steps the report's reference solve needs on a teacher: each step count against a solve of
twice the largest.

    python bench/reference_steps.py [--teacher builtin|builtin-flow|DIR ...] [--steps 16 32 64 128]
                                    [--n 100] [--out FILE.json]

The main job measures its student by PSNR against the teacher's reference solve (``eval.fidelity.
reference_solve``: Heun on the Karras grid closed by sigma = 0, 2 steps - 1 evaluations; ``--reference-steps``,
128 by default). On a large teacher that solve is the report's largest cost. This bench solves the same
noise and conditions at each ``--steps`` and at twice the largest, and reports each one's PSNR against the
longest. A reference 20 dB closer to the converged solve than a student (the main job's students land near
30 dB on the built-in teachers) adds 1 % to the student's squared error, 0.04 dB, where the two errors are
independent. The teacher is any the main job takes, with its flags. ``--quick``: 20 samples.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill_core.denoisers.base import move_cond  # noqa: E402
from distill_core.eval.benchmark import report_rows  # noqa: E402
from distill_core.eval.fidelity import psnr, reference_solve  # noqa: E402
from distill_core.main_job import add_teacher_flags, teacher_from_flags  # noqa: E402
from distill_core.options import positive  # noqa: E402
from distill_core.teacher import CFGTeacher  # noqa: E402

STEPS = (16, 32, 64, 128)
KEYS = ("teacher", "steps", "network_evals", "psnr_db", "against_steps", "seconds")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="20 samples")
    p.add_argument("--steps", type=positive, nargs="+", default=list(STEPS), help="Heun step counts to measure")
    p.add_argument("--n", type=positive, help="samples (default 100, quick 20)")
    p.add_argument("--out", help="write the rows as JSON here")
    add_teacher_flags(p)
    args = p.parse_args(argv)
    if min(args.steps) < 2:
        raise SystemExit(f"a reference solve takes at least 2 Heun steps, got {min(args.steps)}")
    n = args.n or (20 if args.quick else 100)

    start = time.time()
    cfg, source = teacher_from_flags(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = CFGTeacher(source.denoiser.to(device), source.scale(cfg.guidance), source.uncond)
    generator = torch.Generator().manual_seed(1)
    noise = (torch.randn((n, *source.shape), generator=generator) * teacher.sigma_max).to(device)
    cond = move_cond(source.draw_cond(n, generator), device)
    longest = 2 * max(args.steps)
    truth = reference_solve(teacher, noise, cond, steps=longest).clamp(-1, 1)
    rows = []
    for steps in sorted(args.steps):
        began = time.time()
        images = reference_solve(teacher, noise, cond, steps=steps).clamp(-1, 1)
        rows.append({"teacher": source.name, "steps": steps, "network_evals": (2 * steps - 1) * teacher.evaluations(),
                     "psnr_db": round(psnr(images.cpu(), truth.cpu()), 2), "against_steps": longest,
                     "seconds": round(time.time() - began, 1)})
    report_rows(rows, KEYS, f"teacher {source.name}, w = {teacher.w:g}, {n} samples: Heun reference solves against "
                f"{longest} steps", start, args.out)
    return rows


if __name__ == "__main__":
    main()
