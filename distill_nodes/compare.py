"""Compare node: students of any methods and step counts beside the teacher's reference and the best
training-free solver at each of their step counts, as one labelled grid and a metrics table."""

from __future__ import annotations

import torch

from distill_core.compare import compare
from distill_core.plot import labelled_grid, table_image

from . import host
from .handles import StudentHandle
from .sampling import to_images
from .spec import In, Out, node, seed

#: how many students one Compare node takes
MAX_STUDENTS = 6


@node("DistillCompare", "Compare students", "sample",
      "Same seed for every row: the teacher's accurate solve, then for each step count the best training-free "
      "solver and every student sampled at it (any methods), each row named, with PSNR against the teacher "
      "(meaningful for trajectory students; consistency and distribution students draw other good images).",
      inputs=[In("student", "DISTILL_STUDENT", "a student to judge"),
              seed("noise seed"),
              In("count", "INT", "images per row", 8, options={"min": 1, "max": 32}),
              In("steps", "INT", "the step count of every student (0: each its own)", 0,
                 options={"min": 0, "max": 64}),
              In("reference_steps", "INT", "Heun steps of the teacher's reference solve", 32,
                 options={"min": 4, "max": 256}),
              In("vae", "VAE", "decodes latents of ComfyUI models (else a quick preview)", optional=True),
              *(In(f"student_{k}", "DISTILL_STUDENT", "another student of the same teacher and guidance",
                   optional=True) for k in range(2, MAX_STUDENTS + 1))],
      outputs=[Out("IMAGE", "grid", "one named row each: teacher reference, then per step count the best solver "
                   "and the students"),
               Out("STRING", "metrics", "the table as text: NFE and PSNR against the teacher's reference, in dB"),
               Out("IMAGE", "table", "the metrics table as an image")],
      output_node=True)
class Compare:
    def run(self, student: StudentHandle, seed: int, count: int, steps: int, reference_steps: int, vae=None,
            unique_id=None, **more: StudentHandle):
        students = [student, *(more[f"student_{k}"] for k in range(2, MAX_STUDENTS + 1) if more.get(f"student_{k}"))]
        model = student.teacher.model
        host.load_models(student.teacher.models)
        names = [handle.card["method"] for handle in students]
        result = compare(student.teacher.source(), students, [steps or None] * len(students), count, seed,
                         reference_steps, names)
        rows = [(row.label, to_images(middle_frame(row.images), model, vae)[0]) for row in result.rows]
        grid = labelled_grid([(label, images.mul(255).round().clamp(0, 255).to(torch.uint8)) for label, images in rows])
        table = table_image(result.table())
        summary = result.summary()
        as_image = [x.float().div(255).unsqueeze(0) for x in (grid, table)]
        return {"ui": {"text": [summary], "images": host.preview_images(as_image[0])},
                "result": (as_image[0], summary, as_image[1])}


def middle_frame(images: torch.Tensor) -> torch.Tensor:
    """Images as they are; of clips ``[N, C, T, H, W]``, each clip's middle frame (one image per clip in the
    grid; PSNR is over whole clips)."""
    return images[:, :, images.shape[2] // 2] if images.ndim == 5 else images
