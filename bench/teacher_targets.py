"""How accurate SFD's teacher targets are: the teacher's states at the student's points, per solver and K.

    python bench/teacher_targets.py [--quick] [--teacher builtin|builtin-flow] [--steps 4]
                                    [--solvers dpmpp_3m unipc dpmpp_2m] [--K 1 2 3 4] [--n 100] [--out FILE.json]

``--K 1,1,3,3,3`` gives each student interval its own K (the main job's default: one step on the two
intervals above sigma 20, ``methods.sfd.teacher_steps``).

SFD trains the student's step i to land on the teacher's state y_i at the student's point t_i, solved
from the same x_N with K steps of a multistep solver per student interval (``methods.sfd.teacher_states``
on the nested grid). A target is only useful while it is much closer to the true ODE solution than the
student gets (about 31 dB per step at the main job's budget, ``docs/sfd_recipes.md``). For every solver
and K this prints the PSNR of y_i against the same solve with ``--fine`` steps per interval
(DPM-Solver++(3M), K = 16) at each student point, the final state's PSNR against the evaluation set's
128-step Heun reference, and the teacher's network evaluations per trajectory (a CFG call is two). The
student schedule is the main job's SFD grid for the teacher (``methods.sfd.student_grid``: Karras's rho = 7
grid for the EDM teacher, the flow time grid for the flow one) of ``--steps`` NFE with the analytic first
step, sigma 80 -> 0.006; the evaluation set is the main job's (seed 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill_core.config import DistillConfig  # noqa: E402
from distill_core.eval.benchmark import eval_set, format_table, write_rows  # noqa: E402
from distill_core.eval.fidelity import psnr  # noqa: E402
from distill_core.methods.sfd import auto_grid, student_grid, teacher_states  # noqa: E402
from distill_core.options import positive  # noqa: E402
from distill_core.sampling import intervals_for  # noqa: E402
from distill_core.schedules import substeps_per_interval  # noqa: E402
from distill_core.solvers import SOLVERS  # noqa: E402
from distill_core.sources import teacher_source  # noqa: E402
from distill_core.teacher import CFGTeacher  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_substeps(text: str) -> int | tuple[int, ...]:
    """``"4"`` -> 4 (every interval); ``"2,2,4,3,2"`` -> one K per student interval."""
    ks = tuple(int(k) for k in text.split(","))
    return ks[0] if len(ks) == 1 else ks


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="20 samples, K 2 and 4 (well under a minute)")
    p.add_argument("--teacher", default="builtin", choices=("builtin", "builtin-flow"),
                   help="the built-in EDM teacher or its rectified-flow twin")
    p.add_argument("--steps", type=positive, default=4, help="the student's NFE")
    p.add_argument("--solvers", nargs="+", default=["dpmpp_3m", "unipc", "dpmpp_2m"], choices=list(SOLVERS))
    p.add_argument(
        "--K", type=parse_substeps, nargs="+",
        help="teacher steps per student interval (default 1 2 3 4); 2,2,4,3,2 gives each interval its own",
    )
    p.add_argument("--fine", type=positive, default=16, help="steps per interval of the comparison solve")
    p.add_argument("--n", type=positive, help="evaluation samples (default 100, quick 20)")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    n = args.n or (20 if args.quick else 100)
    ks = args.K or ([2, 4] if args.quick else [1, 2, 3, 4])

    cfg = DistillConfig(steps=args.steps)
    source = teacher_source(args.teacher)
    teacher = CFGTeacher(source.denoiser, source.guidance, source.uncond)
    ev = eval_set(teacher, n, seed=cfg.seed + 1, cache_dir=RESULTS / "cache")
    sigmas = student_grid(auto_grid(source.denoiser), intervals_for(cfg.steps, cfg.afs), cfg.sigma_min,
                          teacher.sigma_max, cfg.rho, getattr(source.denoiser, "shift", 1.0))
    with torch.no_grad():
        fine = teacher_states(teacher, ev.noise, sigmas, ev.labels, args.fine, "dpmpp_3m")
        rows = []
        for solver in args.solvers:
            for k in ks:
                states = teacher_states(teacher, ev.noise, sigmas, ev.labels, k, solver)
                rows.append({
                    "method": solver,
                    "nfe": cfg.steps,
                    "substeps": _label(k),
                    "teacher_network_evals": sum(substeps_per_interval(k, len(sigmas) - 1))
                    * teacher.evaluations(),
                    "psnr_db": round(psnr(states[-1], ev.reference), 2),
                    "worst_point_db": round(min(psnr(y, f) for y, f in zip(states, fine)), 2),
                    "psnr_at_points_db": [round(psnr(y, f), 1) for y, f in zip(states, fine)],
                })
    points = ", ".join(f"{float(s):.3g}" for s in sigmas[1:])
    print(f"student points (sigma): {points}; PSNR at each point against DPM-Solver++(3M) with K = {args.fine}")
    print(format_table(rows, ("method", "substeps", "teacher_network_evals", "psnr_db", "worst_point_db")))
    for r in rows:
        print(f"{r['method']:>9} K={r['substeps']}: " + "  ".join(f"{v:5.1f}" for v in r["psnr_at_points_db"]))
    if args.out:
        write_rows(rows, args.out)
    return rows


def _label(k: int | tuple[int, ...]) -> str | int:
    return k if isinstance(k, int) else ",".join(map(str, k))


if __name__ == "__main__":
    main()
