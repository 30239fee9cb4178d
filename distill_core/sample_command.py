"""Images from a student file, on the command line:

    python -m distill_core sample STUDENT.safetensors [--prompt TEXT ... | --label K ...] [--count 4]
                                  [--steps N] [--guidance W] [--seed 0] [--teacher NAME|DIR] [--out DIR]

The student samples beside its teacher (the one its file names, or ``--teacher`` as distill takes it) exactly
as the report and the Load student node sample it: x_N = sigma_max z on its stored schedule, ``steps``
network evaluations (default: its most), its own sampler. Each condition gets one row of ``count`` images,
and column j of every row starts from the same noise z_j (drawn from ``seed``), so rows differ by their
condition alone. Conditions: a text-to-image student's ``--prompt`` texts (or the lines of ``--prompts
FILE``; default: the first ten of the shipped list), a class-conditional one's ``--label`` values (default:
its first ten classes), an unconditional one's single row. Writes ``samples.png`` (a row per condition, labelled), one
PNG per image (``row_column.png``; a video student's: a strip of its clip's frames, and the whole clip as an
animated WEBP, ``row_column.webp``) and ``samples.json`` (what drew each file).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from distill_core.denoisers.base import Cond, index_cond
from distill_core.methods.base import TeacherSource
from distill_core.text_pipeline import prompt_condition

#: rows drawn without --prompt or --label: a teacher's first classes, or the first prompts of its list
DEFAULT_ROWS = 10
#: characters of a prompt shown as its row's label in the grid
LABEL_CHARS = 40


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("student", metavar="STUDENT", help="a student file that distill wrote")
    p.add_argument("--prompt", action="append", help="a prompt for a text-to-image student (repeat for more "
                   "rows); default: the prompts of --prompts")
    p.add_argument("--prompts", help="a text-to-image student's prompt file, one prompt per line (default: the "
                   f"first {DEFAULT_ROWS} of the shipped list)")
    p.add_argument("--images", help="an editing or image-to-video student's images (Flux Kontext, "
                   "Qwen-Image-Edit, Flux.2, Wan and LTX-Video I2V): one file for every prompt, or a folder "
                   "with one image per prompt in file-name order, or a folder of folders, each a set of images one "
                   "prompt's edit reads together (Flux.2, Qwen-Image-Edit Plus)")
    p.add_argument("--label", type=int, action="append", help="a class label for a class-conditional student "
                   f"(repeat for more rows); default: its first {DEFAULT_ROWS} classes")
    p.add_argument("--count", type=int, default=4, help="images per condition, from as many noise draws")
    p.add_argument("--steps", type=int, help="network evaluations (default: the student's most)")
    p.add_argument("--guidance", type=float, help="the guidance scale, for students that take one when they "
                   "sample (guidance mode cfg, LCM's guidance input); default: the file's")
    p.add_argument("--seed", type=int, default=0, help="the noise seed")
    p.add_argument("--teacher", help="the student's teacher: a built-in name or a local diffusers directory, as "
                   "distill takes it (default: the one its file names)")
    p.add_argument("--classes", type=int, default=0, help="a diffusers teacher's classes, as given to distill")
    p.add_argument("--null-class", type=int, help="a diffusers teacher's unconditional class, as given to distill")
    p.add_argument("--out", default="samples", help="where samples.png, the images and samples.json go")


def conditions(source: TeacherSource, prompts: list[str], labels: list[int] | None, given: bool
               ) -> list[tuple[str, Cond]]:
    """The rows to draw: each a label for the grid and the condition of a single image (``None``: the teacher's
    own draw, for a teacher without classes or prompts). ``prompts``: those a text-to-image source was built on,
    whose condition k is prompt k (with image k, where the teacher reads one beside each prompt); ``given``:
    whether the user named them (else the first ``DEFAULT_ROWS``)."""
    if source.prompt_table:
        if labels:
            raise ValueError(f"--label is for class-conditional teachers; {source.name} takes prompts (--prompt)")
        return [(_short(prompt), prompt_condition(source.denoiser, torch.tensor([k])))
                for k, prompt in enumerate(prompts)][: None if given else DEFAULT_ROWS]
    if source.classes == 0:
        if labels:
            raise ValueError(f"--label is for class-conditional teachers; {source.name} has no classes")
        return [("unconditional", None)]
    labels = list(range(min(source.classes, DEFAULT_ROWS))) if not labels else labels
    wrong = [k for k in labels if not 0 <= k < source.classes]
    if wrong:
        raise ValueError(f"--label {wrong[0]} is not a class of {source.name}: give labels from 0 to "
                         f"{source.classes - 1}")
    return [(f"class {k}", torch.tensor([k])) for k in labels]


def _short(prompt: str) -> str:
    return prompt if len(prompt) <= LABEL_CHARS else prompt[: LABEL_CHARS - 3] + "..."


def run(args: argparse.Namespace) -> int:
    from distill_core.atomic import write_json
    from distill_core.compare import named_teacher, pixels
    from distill_core.plot import labelled_grid
    from distill_core.prompts import read_prompts
    from distill_core.report import as_images, write_clip, write_png
    from distill_core.sampling import sample
    from distill_core.sources import trained_teacher
    from distill_core.student_files import load_student, read_student_card

    if not Path(args.student).is_file():
        raise FileNotFoundError(f"no student file {args.student}: give the .safetensors file that distill writes")
    if args.count < 1:
        raise ValueError(f"--count {args.count}: give 1 or more images per condition")
    if args.prompt and args.prompts:
        raise ValueError("give prompts with --prompt or with --prompts FILE, not both")
    card = read_student_card(args.student)
    prompts = args.prompt or args.prompts
    source = trained_teacher(args.teacher or named_teacher([args.student]), [card], args.classes, args.null_class,
                             prompts, args.images)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    source.denoiser.to(device)
    # no copy of the teacher, which nothing samples here: a LoRA's adapters hook into it, a full student loads into it
    student = load_student(args.student, source.denoiser, source.uncond, consume=True)
    sigmas = student.sigmas(args.steps)  # refuses a step count the student was not trained for
    steps = args.steps or student.nfe_choices[-1]
    student.denoiser(steps, args.guidance)  # refuses a guidance scale it cannot sample at
    drawn = conditions(source, read_prompts(prompts), args.label, bool(prompts))
    z = torch.randn((args.count, *source.shape), generator=torch.Generator().manual_seed(args.seed))
    decode = source.decode or (lambda images: images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, files = [], []
    for r, (label, one) in enumerate(drawn):
        cond = source.draw_cond(args.count, torch.Generator().manual_seed(args.seed)) if one is None else \
            index_cond(one, torch.zeros(args.count, dtype=torch.long))
        drawn_samples = decode(sample(student, sigmas[0] * z, cond, steps, args.guidance).cpu())
        images = pixels(as_images(drawn_samples))
        rows.append((label, images))
        for j, image in enumerate(images):
            path = out / f"{r:02d}_{j:02d}.png"
            write_png(image, path)
            clip = {}
            if drawn_samples.ndim == 5:  # a clip: its strip of frames, and every frame in an animation
                frames = pixels(drawn_samples[j].transpose(0, 1))
                clip = {"clip": write_clip(frames, path.with_suffix(".webp")).name}
            files.append({"file": path.name, **clip, "condition": label, "noise": j})
    write_png(labelled_grid(rows), out / "samples.png")
    write_json(out / "samples.json", {"student": str(Path(args.student)), "teacher": source.name, "steps": steps,
                                      "guidance": student.guidance_w(args.guidance), "seed": args.seed,
                                      "images": files})
    clips = len(source.shape) == 4
    print(f"{student.card['method']} student, {steps} step{'s' if steps != 1 else ''}: {len(files)} "
          f"{'clips' if clips else 'images'} of {len(rows)} condition{'s' if len(rows) != 1 else ''} in {out} "
          f"(samples.png, {'a .webp animation of each clip, ' if clips else ''}samples.json)")
    return 0
