"""Save / Load student nodes. LoRA students go to ``loras/`` (the stock LoraLoader applies them), full
students to ``diffusion_models/``; names are sanitised and confined to their folder, and Save never
replaces a file."""

from __future__ import annotations

import filecmp
import itertools
from pathlib import Path

from distill_core.atomic import copy_file
from distill_core.builtin import fingerprint
from distill_core.student_files import check_fits

from . import host
from .handles import StudentHandle, TeacherHandle
from .sampling import ReadsStudentFile, resolve_student_file, student_files
from .spec import In, Out, node
from .training import refuse_other_files, student_model, write_expert_loras


@node("DistillSaveStudent", "Save student", "files",
      "Saves a student under a new name: LoRAs in loras/, full students in diffusion_models/, with the sampling "
      "recipe (schedule, AFS, guidance) in the file's metadata. A file of that name holding something else is "
      "kept: the student goes to name_2 (name_3, ...), and the node shows where.",
      inputs=[In("student", "DISTILL_STUDENT", "the student to save"),
              In("save_name", "STRING", "file name (no folders; '.safetensors' is added)", "my_student")],
      outputs=[Out("STRING", "path", "where the file was written")],
      output_node=True)
class SaveStudent:
    def run(self, student: StudentHandle, save_name: str, unique_id=None):
        kind = student.card["student"]["kind"]
        target = free_path(host.confined(host.model_folder(host.FOLDERS[kind]), save_name, ".safetensors"),
                           student.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if student.card.get("comfy_experts"):  # its LoRA for each model goes beside it: nothing there is replaced
            refuse_other_files(target)
        if not target.exists():
            copy_file(student.path, target)
        experts = write_expert_loras(target)
        return {"ui": {"text": [str(target), *map(str, experts.values())]}, "result": (str(target),)}


def free_path(target: Path, source: Path) -> Path:
    """Where ``source`` is saved as ``target`` without replacing another file: ``target`` itself when it is
    free or already holds ``source``'s bytes, else the first of ``<name>_2``, ``<name>_3``, ... that is."""
    for n in itertools.count(1):
        path = target if n == 1 else target.with_name(f"{target.stem}_{n}{target.suffix}")
        if not path.exists() or path.resolve() == source.resolve() or filecmp.cmp(path, source, shallow=False):
            return path


@node("DistillLoadStudent", "Load student", "files",
      "Loads a student file for its teacher and checks that it belongs to it (weights fingerprint).",
      inputs=[In("teacher", "DISTILL_TEACHER", "the teacher the student was distilled from"),
              In("student_file", student_files, "the student's file (loras/ or diffusion_models/)",
                 options={"file_list": True})],
      outputs=[Out("MODEL", "model", "the student as a MODEL (ComfyUI teachers; None for the built-in teacher)"),
               Out("DISTILL_STUDENT", "student", "the student, for sampling and comparing")])
class LoadStudent(ReadsStudentFile):
    def run(self, teacher: TeacherHandle, student_file: str, unique_id=None):
        path, card = resolve_student_file(student_file)
        host.load_models(teacher.models)
        ours = fingerprint(teacher.source().denoiser)
        if card["teacher_fingerprint"] != ours:
            raise ValueError(f"{student_file} was distilled from another model (fingerprint "
                             f"{card['teacher_fingerprint']}, this teacher: {ours}); connect the teacher it came from")
        check_fits(path, teacher.source().denoiser)  # here, not later in another node
        handle = StudentHandle(path, teacher)
        handle.model = student_model(handle)
        return handle.model, handle
