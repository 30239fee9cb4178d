"""Compare node: teacher reference vs the best training-free solver at N vs the student at N."""

from __future__ import annotations

import torch

from distill_core.compare import compare

from . import host
from .handles import StudentHandle
from .sampling import to_images
from .spec import In, Out, node, seed


@node("DistillCompare", "Compare teacher / solver / student", "sample",
      "Same seed, three rows: the teacher's accurate solve, the best training-free solver at the student's step "
      "count, and the student; with PSNR of each against the teacher.",
      inputs=[In("student", "DISTILL_STUDENT", "the student to judge"),
              seed("noise seed"),
              In("count", "INT", "images per row", 8, options={"min": 1, "max": 32}),
              In("steps", "INT", "the student's step count (0: its own)", 0, options={"min": 0, "max": 64}),
              In("reference_steps", "INT", "Heun steps of the teacher's reference solve", 32,
                 options={"min": 4, "max": 256}),
              In("vae", "VAE", "decodes latents of ComfyUI models (else a quick preview)", optional=True)],
      outputs=[Out("IMAGE", "grid", "rows: teacher reference, best solver, student"),
               Out("STRING", "metrics", "PSNR against the teacher's reference, in dB")],
      output_node=True)
class Compare:
    def run(self, student: StudentHandle, seed: int, count: int, steps: int, reference_steps: int, vae=None,
            unique_id=None):
        model = student.teacher.model
        if model is not None:
            host.load_models([model])
        with student.loaded() as s:
            result = compare(student.teacher.source(), s, steps or None, count, seed, reference_steps)
        rows = [to_images(x, model, vae)[0] for x in (result.reference, result.solver, result.student)]
        grid = torch.cat([torch.cat(list(r), dim=1) for r in rows], dim=0).unsqueeze(0)
        return {"ui": {"text": [result.summary()], "images": host.preview_images(grid)},
                "result": (grid, result.summary())}
