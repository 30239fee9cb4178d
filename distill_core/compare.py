"""Students of any methods and step counts side by side with their teacher, from the same noise and conditions.

    python -m distill_core compare STUDENT.safetensors ... [--teacher NAME|DIR] [--count 8] [--seed 0] [--out DIR]

Rows, top to bottom: the teacher's reference solve (Heun on the Karras grid, as in
``eval.fidelity.reference_solve``); then for each step count N that a student is sampled at (ascending), the
best training-free solver at N evaluations (by PSNR against the reference) and every student at N. Each row
has its PSNR against the reference: it judges trajectory students (SFD, progressive, reflow, ...); a
consistency or distribution student draws a different good image from the same noise, so its PSNR is low by
construction (judge those by their images, or by ``bench/methods.py``'s ``fd_teacher``). What the Compare
node shows, and the CLI writes as ``compare.png``, ``compare_table.png`` and ``compare.json``.

Everything is sampled on the teacher's device (the CLI puts it on CUDA where there is one). The CLI's teacher
is the one the student files name; ``--teacher`` gives it as distill takes it (a built-in name, or a local
diffusers directory with its ``--classes`` / ``--null-class``, or ``--prompts`` / ``--prompt``). A latent
teacher's rows are decoded by its pipeline's VAE.
"""

from __future__ import annotations

import argparse
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from distill_core.atomic import write_json
from distill_core.config import EDM_SIGMA_MIN
from distill_core.denoisers.base import move_cond
from distill_core.eval.fidelity import psnr, reference_solve
from distill_core.methods.base import TeacherSource
from distill_core.sampling import sample
from distill_core.solvers import SOLVERS, parse_solver_label, solver_labels, solver_sigmas
from distill_core.student_files import borrowing, check_teacher, read_student_card
from distill_core.students import Student
from distill_core.teacher import CFGTeacher

#: the columns of a comparison's table
COLUMNS = ("row", "kind", "NFE", "PSNR dB")


@dataclass
class Row:
    """One row of images: who drew them, at how many network evaluations, and their PSNR against the
    reference (``None`` for the reference itself)."""

    label: str
    kind: str  # "teacher", "solver" or "student"
    nfe: int
    images: torch.Tensor
    psnr_db: float | None = None

    def record(self) -> dict:
        """The row without its images, for JSON."""
        return {"label": self.label, "kind": self.kind, "nfe": self.nfe, "psnr_db": self.psnr_db}

    def cells(self) -> list[str]:
        return [self.label, self.kind, str(self.nfe), "-" if self.psnr_db is None else f"{self.psnr_db:.2f}"]


@dataclass
class Comparison:
    rows: list[Row]

    def table(self) -> list[list[str]]:
        """The header and one line of cells per row."""
        return [list(COLUMNS), *(row.cells() for row in self.rows)]

    def summary(self) -> str:
        """The table as text, and for each student its PSNR against the teacher's reference solve beside the
        best solver's at its step count."""
        cells = self.table()
        widths = [max(len(line[k]) for line in cells) for k in range(len(COLUMNS))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
        solver = {}
        for row in self.rows:
            if row.kind == "solver":
                solver[row.nfe] = row
            elif row.kind == "student":
                best = solver[row.nfe]
                lines.append(f"{row.label}: {row.psnr_db:.2f} dB against the teacher's reference solve; best "
                             f"training-free solver ({best.label}): {best.psnr_db:.2f} dB "
                             f"({row.psnr_db - best.psnr_db:+.2f} dB)")
        return "\n".join(lines)


def student_label(name: str, steps: int) -> str:
    """"sfd, 4 steps": the student's name (by default its method) and the step count it is sampled at."""
    return f"{name}, {steps} step{'s' if steps != 1 else ''}"


class StudentFile(Protocol):
    """A student to compare: its card, and a context in which it is loaded (a LoRA student of a shared
    network is loaded only while it samples, so several never stack their adapters)."""

    card: dict

    def loaded(self) -> AbstractContextManager[Student]: ...


@dataclass
class OnTeacher:
    """A student file of ``source``'s teacher (refused at once if it belongs to another), loaded only while it
    samples (``borrowing``): LoRA students sample one after another on the teacher's one network."""

    path: Path
    source: TeacherSource
    card: dict = field(init=False)

    def __post_init__(self):
        self.card = read_student_card(self.path)
        check_teacher(self.path, self.card, self.source.denoiser)

    def loaded(self) -> AbstractContextManager[Student]:
        # its teacher was checked when the handle was made (a hash of every one of the teacher's weights)
        return borrowing(self.path, self.source.denoiser, self.source.uncond, any_teacher=True)


def one_teacher(students: list[StudentFile]) -> float:
    """The guidance scale w every student was distilled at; refuses students of different teachers or w."""
    if not students:
        raise ValueError("compare needs at least one student")
    prints = {s.card["teacher_fingerprint"] for s in students}
    if len(prints) > 1:
        raise ValueError("these students were distilled from different teachers (fingerprints "
                         f"{sorted(prints)}): compare students of one teacher")
    ws = {float(s.card["guidance"]["w"]) for s in students}
    if len(ws) > 1:
        raise ValueError(f"these students were distilled at different guidance scales {sorted(ws)}: their "
                         "teacher references differ; compare students of one guidance scale")
    return ws.pop()


def best_solver(teacher: CFGTeacher, noise: torch.Tensor, cond, reference: torch.Tensor, nfe: int,
                sigma_min: float) -> Row:
    """The training-free solver with the highest PSNR against ``reference`` among the report's at ``nfe``
    evaluations (``solvers.solver_labels``: on every grid of the teacher; a flow teacher's solvers do best on its
    time grid)."""
    best = None
    for label in solver_labels(teacher.denoiser, nfe):
        solver = SOLVERS[parse_solver_label(label)[0]]
        images = solver(teacher, noise, solver_sigmas(label, nfe, sigma_min, teacher.sigma_max), cond)
        row = Row(f"{label}, {nfe} NFE", "solver", nfe, images, psnr(images, reference))
        if best is None or row.psnr_db > best.psnr_db:
            best = row
    return best


@torch.no_grad()
def compare(source: TeacherSource, students: list[StudentFile], steps: list[int | None] | None = None,
            count: int = 8, seed: int = 0, reference_steps: int = 64, names: list[str] | None = None
            ) -> Comparison:
    """Sample ``count`` images from one noise draw by the teacher, the best solvers and ``students`` (each at
    its ``steps`` entry, ``None``: its most steps; named by ``names``, by default their methods), on the
    teacher's device (see the module docstring)."""
    w = one_teacher(students)
    names = [s.card["method"] for s in students] if names is None else names
    steps = [None] * len(students) if steps is None else steps
    steps = [max(int(k) for k in s.card["sigmas"]) if n is None else n for s, n in zip(students, steps)]
    gen = torch.Generator().manual_seed(seed)
    device = next(source.denoiser.parameters()).device
    noise = (torch.randn((count, *source.shape), generator=gen) * source.denoiser.sigma_max).to(device)
    cond = move_cond(source.draw_cond(count, gen), device)
    teacher = CFGTeacher(source.denoiser, w, source.uncond)
    reference = reference_solve(teacher, noise, cond, steps=reference_steps)
    rows = [Row(f"teacher, Heun {reference_steps} steps", "teacher", 2 * reference_steps - 1, reference)]
    for nfe in sorted(set(steps)):
        sigma_min = min(s.card["schedule"].get("sigma_min", EDM_SIGMA_MIN) for s, n in zip(students, steps)
                        if n == nfe)
        rows.append(best_solver(teacher, noise, cond, reference, nfe, sigma_min))
        for student, name, n in zip(students, names, steps):
            if n == nfe:
                mode_w = None if student.card["guidance"]["mode"] == "distilled" else w
                with student.loaded() as loaded:
                    images = sample(loaded, noise, cond, steps=n, w=mode_w)
                rows.append(Row(student_label(name, n), "student", n, images, psnr(images, reference)))
    return Comparison(rows)


def pixels(images: torch.Tensor) -> torch.Tensor:
    """Model-space images ``[N, C, H, W]`` in [-1, 1] as uint8 ``[N, H, W, 3]``."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    return x.expand(-1, -1, -1, 3).contiguous() if x.shape[-1] == 1 else x[..., :3].contiguous()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("students", nargs="+", metavar="STUDENT", help="student files of one teacher")
    p.add_argument("--teacher", help="the students' teacher: a built-in name or a local diffusers directory, as "
                   "distill takes it (default: the one their files name)")
    p.add_argument("--classes", type=int, default=0, help="a diffusers teacher's classes, as given to distill")
    p.add_argument("--null-class", type=int, help="a diffusers teacher's unconditional class, as given to distill")
    p.add_argument("--prompts", help="a text-to-image teacher's prompt file, as given to distill")
    p.add_argument("--prompt", action="append", help="a prompt to draw the rows' images from, instead of a file "
                   "(repeat for more)")
    p.add_argument("--images", help="an editing or image-to-video teacher's images (Flux Kontext, "
                   "Qwen-Image-Edit, Flux.2, Wan and LTX-Video I2V), as given to distill")
    p.add_argument("--steps", type=int, nargs="+", help="the step count of each student (default: its most)")
    p.add_argument("--count", type=int, default=8, help="images per row")
    p.add_argument("--seed", type=int, default=0, help="noise and class seed")
    p.add_argument("--reference-steps", type=int, default=32, help="Heun steps of the teacher's reference solve")
    p.add_argument("--out", default="compare", help="where compare.png, compare_table.png and compare.json go")


def named_teacher(paths: list[str]) -> str:
    """The teacher the student files name (``teacher`` in their cards); refuses files that name several or none,
    and a file or folder that is not there from the working directory (a card keeps the path distill was
    given, which a relative path reads from the folder it ran in)."""
    from distill_core.sources import TEACHERS, names_a_path

    names = {read_student_card(path).get("teacher") for path in paths}
    if None in names or len(names) > 1:
        raise ValueError(f"the student files name {'different teachers' if len(names) > 1 else 'no teacher'} "
                         f"({', '.join(sorted(str(n) for n in names))}): give it with --teacher")
    name = names.pop()
    if name not in TEACHERS and names_a_path(name) and not Path(name).exists():
        raise FileNotFoundError(f"the student's teacher {name} (as its card names it) is not there from {Path.cwd()}: "
                                "run from the folder distill ran in, or give the teacher with --teacher")
    return name


def run(args: argparse.Namespace) -> int:
    from distill_core.plot import labelled_grid, table_image
    from distill_core.report import as_images, write_png
    from distill_core.sources import trained_teacher

    if args.count < 1:
        raise ValueError(f"--count {args.count}: give 1 or more images per row")
    if args.reference_steps < 2:
        raise ValueError(f"--reference-steps {args.reference_steps}: the reference solve takes 2 or more Heun steps")
    if args.steps is not None and len(args.steps) != len(args.students):
        raise ValueError(f"--steps takes one step count per student ({len(args.students)}), got {args.steps}")
    for path in args.students:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no student file {path}: give the .safetensors files that distill writes")
    if args.prompt and args.prompts:
        raise ValueError("give prompts with --prompt or with --prompts FILE, not both")
    cards = [read_student_card(p) for p in args.students]
    source = trained_teacher(args.teacher or named_teacher(args.students), cards, args.classes, args.null_class,
                             args.prompt or args.prompts, args.images)
    source.denoiser.to("cuda" if torch.cuda.is_available() else "cpu")
    students = [OnTeacher(Path(path), source) for path in args.students]
    stems = [Path(p).stem for p in args.students]
    names = [f"{stem} ({s.card['method']})" for stem, s in zip(stems, students)]
    result = compare(source, students, args.steps, args.count, args.seed, args.reference_steps, names)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    decode = source.decode or (lambda images: images)
    write_png(labelled_grid([(r.label, pixels(as_images(decode(r.images.cpu())))) for r in result.rows]),
              out / "compare.png")
    write_png(table_image(result.table()), out / "compare_table.png")
    write_json(out / "compare.json", {"rows": [row.record() for row in result.rows],
                                     "students": [str(Path(p)) for p in args.students], "seed": args.seed})
    print(result.summary())
    print(f"wrote {out / 'compare.png'}, {out / 'compare_table.png'} and {out / 'compare.json'}")
    return 0
