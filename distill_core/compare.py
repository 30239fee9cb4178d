"""Teacher vs training-free solver vs student, from the same noise and conditions.

For a student at N evaluations: the teacher's reference solve (Heun on the Karras grid, as in
``eval.fidelity.reference_solve``), every training-free solver at N evaluations (the best by PSNR
against the reference is kept) and the student at N, with PSNR of each against the reference.
What the Compare node and the main job's grid show.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distill_core.config import EDM_SIGMA_MIN
from distill_core.denoisers.base import move_cond
from distill_core.eval.fidelity import psnr, reference_solve
from distill_core.methods.base import TeacherSource
from distill_core.sampling import sample
from distill_core.solvers import SOLVERS, nfe_of, solver_sigmas, steps_for_nfe
from distill_core.students import Student
from distill_core.teacher import CFGTeacher


@dataclass
class Comparison:
    reference: torch.Tensor
    solver: torch.Tensor
    student: torch.Tensor
    solver_name: str
    solver_psnr_db: float
    student_psnr_db: float
    nfe: int

    def summary(self) -> str:
        return (
            f"student at {self.nfe} NFE: {self.student_psnr_db:.2f} dB against the teacher's reference solve; "
            f"best training-free solver at {self.nfe} NFE ({self.solver_name}): {self.solver_psnr_db:.2f} dB "
            f"({self.student_psnr_db - self.solver_psnr_db:+.2f} dB)"
        )


@torch.no_grad()
def compare(source: TeacherSource, student: Student, steps: int | None = None, count: int = 8, seed: int = 0,
            reference_steps: int = 64, w: float | None = None) -> Comparison:
    """Sample ``count`` images three ways from one noise draw (see the module docstring), on the
    teacher's device."""
    steps = student.nfe_choices[-1] if steps is None else steps
    gen = torch.Generator().manual_seed(seed)
    device = next(source.denoiser.parameters()).device
    noise = (torch.randn((count, *source.shape), generator=gen) * source.denoiser.sigma_max).to(device)
    cond = move_cond(source.draw_cond(count, gen), device)
    w = student.card["guidance"]["w"] if w is None else w
    teacher = CFGTeacher(source.denoiser, w, source.uncond)
    reference = reference_solve(teacher, noise, cond, steps=reference_steps)
    sigma_min = student.card["schedule"].get("sigma_min", EDM_SIGMA_MIN)
    best = None
    for name in SOLVERS:
        if nfe_of(name, steps_for_nfe(name, steps, ends_at_zero=False), ends_at_zero=False) != steps:
            continue  # Heun cannot spend an odd budget exactly
        images = SOLVERS[name](teacher, noise, solver_sigmas(name, steps, sigma_min, teacher.sigma_max), cond)
        score = psnr(images, reference)
        if best is None or score > best[2]:
            best = (name, images, score)
    mode_w = None if student.card["guidance"]["mode"] == "distilled" else w
    ours = sample(student, noise, cond, steps=steps, w=mode_w)
    return Comparison(reference, best[1], ours, best[0], best[2], psnr(ours, reference), steps)
