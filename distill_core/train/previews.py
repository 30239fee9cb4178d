"""The fixed rows of the sample grids written during training (``sample_every``).

Every grid ``samples/iter_NNNNNN.png`` has three rows over the same noise and conditions: the
teacher's reference solve, a training-free solver at the student's step count (both computed once
per run), and the student at that iteration. Reading down a column shows how far the student is
from the teacher and how far ahead of the solver it has got.
"""

from __future__ import annotations

import torch

from distill_core.config import DistillConfig
from distill_core.denoisers.base import Cond
from distill_core.methods.base import Method

#: Heun steps of the preview's reference solve (63 evaluations; the report's reference uses 128).
REFERENCE_STEPS = 32
#: The training-free solver shown next to the student (among the best at 2-8 evaluations, docs/results.md).
SOLVER = "dpmpp_2m"
ROW_LABELS = (
    f"teacher reference solve (Heun, {REFERENCE_STEPS} steps)",
    f"{SOLVER} at the student's NFE (training-free)",
    "student",
)


@torch.no_grad()
def fixed_rows(method: Method, cfg: DistillConfig, noise: torch.Tensor, cond: Cond) -> list[torch.Tensor]:
    """The teacher's reference solve and the training-free solver from ``noise`` (x at sigma_max)
    under ``cond``, at the run's guidance scale; on the CPU."""
    from distill_core.eval.fidelity import reference_solve
    from distill_core.solvers import SOLVERS, solver_sigmas
    from distill_core.teacher import CFGTeacher

    source = method.source
    # a LoRA student shares the source's network: the method's teacher is its adapters-off view
    denoiser = method.teacher.denoiser
    w = source.scale(cfg.guidance)
    teacher = CFGTeacher(denoiser, w, source.uncond)
    sigmas = solver_sigmas(SOLVER, method.preview_steps(), cfg.sigma_min, method.sigma_max).to(noise.device)
    reference = reference_solve(teacher, noise, cond, steps=REFERENCE_STEPS)
    solver = SOLVERS[SOLVER](teacher, noise, sigmas, cond)
    return [reference.cpu(), solver.cpu()]
