"""Training-free solvers on the built-in teacher: quality against network evaluations.

    python bench/solvers.py [--quick] [--out FILE.json]

For every solver and NFE in 2, 3, 4, 5, 6, 8, 16 it samples the same noise and classes at the
teacher's default guidance, and reports PSNR against the reference solve (Heun, 128 steps), the
Frechet distance in the metric classifier's features, class accuracy and images per second. The
teacher's own 64-step Heun solve is the quality ceiling that distillation aims at.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill_core.builtin import DEFAULT_GUIDANCE, load_builtin_teacher  # noqa: E402
from distill_core.config import EDM_SIGMA_MIN  # noqa: E402
from distill_core.eval.benchmark import TABLE_KEYS, eval_set, report_rows, solver_row  # noqa: E402
from distill_core.options import positive  # noqa: E402
from distill_core.solvers import SOLVERS, spends_exactly  # noqa: E402
from distill_core.teacher import CFGTeacher  # noqa: E402

NFES = (2, 3, 4, 5, 6, 8, 16)
CACHE = Path(__file__).resolve().parent / "results" / "cache"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer samples (about 3 minutes on 2 CPU cores)")
    p.add_argument("--n", type=positive, help="number of samples (default 1000, quick 100)")
    p.add_argument("--nfe", type=positive, nargs="+", default=list(NFES))
    p.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=list(SOLVERS))
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="CFG scale w of the teacher")
    p.add_argument("--out", help="write the rows as JSON to this file")
    args = p.parse_args(argv)
    n = args.n or (100 if args.quick else 1000)

    start = time.time()
    teacher = CFGTeacher(load_builtin_teacher(), w=args.guidance, uncond=torch.tensor([10]))
    ev = eval_set(teacher, n, cache_dir=CACHE)
    rows = [solver_row("heun", 128, teacher, ev) | {"method": "teacher-heun-64"}]
    for name in args.solvers:
        for nfe in args.nfe:
            if not spends_exactly(name, nfe):
                continue  # Heun spends two evaluations per step: odd budgets are not reachable
            rows.append(solver_row(name, nfe, teacher, ev))
            print(f"  {name} nfe {nfe}: psnr {rows[-1]['psnr_db']:.2f} dB", file=sys.stderr, flush=True)
    report_rows(rows, TABLE_KEYS, f"built-in teacher, guidance w = {args.guidance:g}, {n} samples; Karras grids 80 -> "
                f"{EDM_SIGMA_MIN}; reference: Heun, 128 steps to 0", start, args.out)
    return rows


if __name__ == "__main__":
    main()
