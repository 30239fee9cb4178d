"""The training nodes, one per node layout that a registered method declares (``Method.node``): its widgets
come from the method's settings (help, default, range), followed by the run inputs every training node
shares. Training runs inside the node run under ``torch.inference_mode(False)`` (ComfyUI runs nodes in
inference mode) with the teacher's weights made trainable-safe; a LoRA student trains adapters hooked
into the teacher's own network (one copy of the weights; the shared MODEL is never changed), a full
student trains a copy. Progress shows on the node with previews; Cancel saves a checkpoint first, and
queueing the node again with ``resume`` on continues from it.
"""

from __future__ import annotations

import copy
import filecmp
import os
from pathlib import Path

import torch

from distill_core import safetensors_io
from distill_core.atomic import copy_file
from distill_core.config import DistillConfig
from distill_core.denoisers.comfy import EXPERTS, expert_loras
from distill_core.methods import auto
from distill_core.methods.base import NodeLayout, Widget
from distill_core.methods.registry import methods
from distill_core.options import Setting, settings
from distill_core.report import loss_curve, preview_pixels
from distill_core.train.metrics import METRICS, read_metrics
from distill_core.train.run import refuse_replacing, train_student

from . import host
from .handles import StudentHandle, TeacherHandle
from .spec import NODE_CLASS_MAPPINGS, In, Out, node, seed

STUDENT = Out("DISTILL_STUDENT", "student", "the trained student and its run (for sampling, saving, comparing)")
MODEL = Out("MODEL", "model", "the student as a MODEL for KSampler / SamplerCustom (ComfyUI teachers; None for the "
            "built-in teacher, for a student of experts, which Few-step sample samples, and for a student of two "
            "models, whose MODELs Student sigmas for two models gives)")
CURVE = Out("IMAGE", "loss_curve", "the training loss against iteration on a log axis, one line per student "
            "step or trained network, with a legend")
SOCKETS = {int: "INT", float: "FLOAT", bool: "BOOLEAN", str: "STRING"}


def run_inputs(layout: NodeLayout) -> list[In]:
    """The inputs every training node ends with: where the run goes, resume, previews, checkpoints."""
    return [
        In("save_name", "STRING", "file name of the student (no folders); also the run folder's name. A new run "
           "under a name that holds another run's student is refused: continue it with resume, or name a new one",
           layout.save_name),
        In("resume", "BOOLEAN", "continue the run saved under save_name: after Cancel or a crash, or for more "
           "iterations", False),
        In("preview_every", "INT", "show a preview of the student on the node every this many iterations "
           "(0: none)", layout.preview_every, options={"min": 0, "max": 10000}),
        In("checkpoint_every", "INT", "write a resumable checkpoint every this many iterations",
           layout.checkpoint_every, options={"min": 1, "max": 10000}),
        In("grad_checkpointing", "BOOLEAN", "recompute the activations in the backward pass: a fraction of their "
           "memory for about a third more time per iteration; turn it on when a run is refused for memory (the "
           "node checks the memory plan against the GPU's free memory before training)", False, optional=True),
        In("start_from", "DISTILL_STUDENT", "a student of this teacher to start from instead of the teacher (Load "
           "student, or another training node's student): a 1-step kd student refined by distribution matching, "
           "a 4-step LoRA trained further; it must be of this run's kind (LoRA of the same rank, or full)",
           optional=True),
    ]


def widget_input(widget: Widget, setting: Setting | None, method_names: list[str]) -> In:
    """A node input for a widget, its help, default and range from the config field behind it."""
    if widget.name == "method":
        return In("method", tuple(method_names), widget.help or "the distillation method", method_names[0])
    if widget.name == "seed":
        return seed(widget.help or setting.help)
    help_text = widget.help or setting.help
    default = setting.default if widget.default is None else widget.default
    choices = widget.choices or setting.choices
    if choices is not None:
        default = str(default) if all(isinstance(c, str) for c in choices) else default
        return In(widget.name, tuple(choices), help_text, default)
    options = {k: v for k, v in (("min", widget.min if widget.min is not None else setting.min),
                                 ("max", widget.max if widget.max is not None else setting.max),
                                 ("step", widget.step)) if v is not None}
    options = {k: setting.kind(v) if k in ("min", "max") else v for k, v in options.items()}
    if setting.kind is float:
        options["round"] = False
    return In(widget.name, SOCKETS[setting.kind], help_text, default, options=options)


def field_settings(method_cls) -> dict[str, Setting]:
    return {s.name: s for s in [*settings(DistillConfig), *settings(method_cls.Config)]}


def build_training_node(layout: NodeLayout, classes: list[type]) -> type:
    """The node class of ``layout`` for the methods ``classes`` that declare it."""
    names = [cls.name for cls in classes]
    known = field_settings(classes[0])
    bound = {w.name: (w.field or w.name) for w in layout.widgets if w.name not in ("method",)}
    teacher_help = ("the teacher: Built-in teacher (ComfyUI models keep their own architecture and are refused here)"
                    if layout.refuses_comfy_models else "the teacher (Built-in teacher, or Teacher from MODEL)")
    inputs = [In("teacher", "DISTILL_TEACHER", teacher_help)]
    menu = ["auto", *names] if layout.auto else names
    inputs += [widget_input(w, known.get(bound.get(w.name)), menu) for w in layout.widgets]
    inputs += run_inputs(layout)
    outputs = [MODEL, STUDENT, CURVE] if layout.model_output else [STUDENT, CURVE]

    class TrainingNode:
        def run(self, teacher: TeacherHandle, save_name: str, resume: bool, preview_every: int,
                checkpoint_every: int, unique_id=None, grad_checkpointing: bool = False,
                start_from: StudentHandle | None = None, **widgets):
            if teacher.model is not None and layout.refuses_comfy_models:
                raise ValueError(layout.refuses_comfy_models)
            method = widgets.pop("method", names[0])
            values = {bound[k]: _typed(known[bound[k]], v) for k, v in widgets.items()}
            method, derived, chose = auto.resolve(method, values.get("steps", DistillConfig.steps), teacher.name)
            values.update(derived)
            if values.get("guidance_mode") == "auto":
                values["guidance_mode"] = "distilled" if teacher.model is None else "cfg"
            values = {**values, **layout.fixed}
            cfg = DistillConfig(teacher=teacher.name, method=method, sigma_min=teacher.sigma_min,
                                guidance=teacher.guidance, checkpoint_every=checkpoint_every,
                                grad_checkpointing=grad_checkpointing,
                                init_from=None if start_from is None else str(start_from.path), **values)
            handle, curve = train_to_file(teacher, cfg, host.FOLDERS[cfg.student], save_name, resume, preview_every,
                                          unique_id)
            handle.model = student_model(handle)
            result = (handle.model, handle, curve) if layout.model_output else (handle, curve)
            saved = [handle.path, *(p for p in expert_paths(handle.path).values() if teacher.low_model is not None
                                    and p.is_file())]
            return {"ui": {"text": [*([chose] if chose else []), f"saved {', '.join(map(str, saved))}"]},
                    "result": result}

    TrainingNode.__name__ = TrainingNode.__qualname__ = layout.id
    return node(layout.id, layout.display, "train", layout.description, inputs, outputs)(TrainingNode)


def _typed(setting: Setting, value):
    """A widget's value as the config field's type (a combo of "4", "8", ... for an int field)."""
    return setting.kind(value) if setting.kind in (int, float) and isinstance(value, str) else value


def register_training_nodes() -> list[str]:
    """Declare one node per node layout among the registered methods (those not declared yet: a method
    registered later gets its node by calling this again); the ids of all of them (the web extension asks)."""
    layouts: dict[str, tuple[NodeLayout, list[type]]] = {}
    for cls in methods().values():
        if cls.node is not None:
            layouts.setdefault(cls.node.id, (cls.node, []))[1].append(cls)
    for node_id, (layout, classes) in layouts.items():
        if node_id not in NODE_CLASS_MAPPINGS:
            build_training_node(layout, classes)
    return list(layouts)


def train_to_file(teacher: TeacherHandle, cfg: DistillConfig, folder: str, save_name: str, resume: bool,
                  preview_every: int, unique_id=None) -> tuple[StudentHandle, torch.Tensor]:
    """What every training node does: train ``cfg`` on the teacher inside the node run (progress, previews
    and Cancel on the node), the run under ``<output>/distill_runs/<save_name>``, then copy the student to
    ``<folder>/<save_name>.safetensors``. Returns its handle and the loss curve as a ComfyUI IMAGE. Unless
    ``resume`` is on, a run folder that holds another run's student or checkpoints, or a file already at the
    student's path, is refused before anything is loaded: nothing is replaced."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError("training nodes train in ComfyUI's one process; for several GPUs use the command line: "
                           "accelerate launch --num_processes N -m distill_core distill ... (docs/memory.md)")
    if teacher.low_model is not None and cfg.student != "lora":
        raise ValueError("a teacher of two models (Wan 2.2 14B's high- and low-noise models) distils into a LoRA "
                         "student, one LoRA per model: set student to lora")
    target = host.confined(host.model_folder(folder), save_name, ".safetensors")
    run_dir = host.confined(host.runs_folder(), save_name)
    if not resume:  # a new run replaces nothing the user has
        student = f" and {target}" if target.exists() else ""
        refuse_replacing(run_dir, "turn resume on to go on with it (a finished run with the same iterations is "
                                  f"used as it is), give another save_name, or delete that folder{student} to start "
                                  "it again")
        taken = [p for p in (target, *(expert_paths(target) if teacher.low_model is not None else {}).values())
                 if p.exists()]
        if taken:
            raise ValueError(f"{taken[0]} exists already, which this run's student would replace: give another "
                             "save_name, or move that file away")
    cfg = cfg.replace(out=str(run_dir))
    with torch.inference_mode(False), torch.enable_grad():
        host.load_models(teacher.models)
        for model in teacher.models:
            host.trainable_weights(model.model)
        source = teacher.source()
        latent_format = getattr(getattr(teacher.model, "model", None), "latent_format", None)

        def preview(run):
            return host.to_pil(preview_pixels(run.preview(4), latent_format))

        progress = host.NodeProgress(unique_id, preview, preview_every)
        at_least = host.run_seconds_at_least(source, cfg.iters, cfg.batch, cfg.steps)
        if at_least > host.LONG_RUN_S:
            progress.warn_before(at_least, run_dir, cfg.iters)
        else:
            print(f"[comfyui-distill] {run_dir.name}: {host.run_time_notice(at_least)}")
        run = train_student(cfg, source, resume=resume, progress=False, callbacks=[progress])
    if run is None:
        raise RuntimeError(f"training stopped early; queue again with resume on to continue {run_dir}")
    target.parent.mkdir(parents=True, exist_ok=True)
    if not (target.exists() and filecmp.cmp(target, run.path, shallow=False)):  # a finished run's file stays as it is
        replacing = target.exists()
        copy_file(run.path, target)
        write_expert_loras(target)
        if replacing:  # a run resumed with more iterations: loaders that read the old file must read it again
            host.forget_cached_outputs()
    metrics = read_metrics(run_dir / METRICS).records
    return StudentHandle(target, teacher, run_dir), loss_curve(metrics).float().div(255).unsqueeze(0)


def expert_paths(student: Path) -> dict[str, Path]:
    """Where the stock LoRA of each model of a two-model teacher's student goes: beside the student file, as
    ``<name>_high_noise.safetensors`` and ``<name>_low_noise.safetensors``."""
    return {name: student.with_name(f"{student.stem}_{name}_noise{student.suffix}") for name in EXPERTS}


def refuse_other_files(student: Path) -> None:
    """An error naming the first file at ``expert_paths(student)`` that is not one of this student's LoRAs, which
    writing them would replace."""
    for path in expert_paths(student).values():
        if path.exists() and not _lora_of(path, student):
            raise ValueError(f"{path} exists already, which this student's LoRA for that model would replace: give "
                             "another name, or move that file away")


def _lora_of(path: Path, student: Path) -> bool:
    """Whether the file at ``path`` is a LoRA that ``write_expert_loras`` wrote for ``student``."""
    try:
        return safetensors_io.read_card(path).get("student") == student.name
    except ValueError:  # a file without this engine's card
        return False


def write_expert_loras(student: Path) -> dict[str, Path]:
    """For a LoRA student of a two-model teacher (Wan 2.2 14B), one stock LoRA per model beside its file
    (``expert_paths``), each with that model's keys only, which LoraLoaderModelOnly applies to that model; none
    for other students. Their card names the student file and the model. A file there that is not one of them
    is refused, not replaced (``refuse_other_files``)."""
    tensors, card = safetensors_io.load(student, mapped=True)
    if not card.get("comfy_experts") or card["student"]["kind"] != "lora" or card.get("experts"):
        return {}
    refuse_other_files(student)
    paths = expert_paths(student)
    for name, part in expert_loras(tensors).items():
        safetensors_io.save_atomic(part, paths[name], {"kind": "expert_lora", "expert": f"{name}-noise model",
                                                       "student": student.name, **card["comfy_experts"]})
    return paths


def expert_models(handle: StudentHandle) -> dict:
    """A student of two models as ComfyUI MODELs: {"high": ..., "low": ...}, each teacher MODEL with its LoRA
    applied the stock way (``write_expert_loras`` writes the same LoRAs as files)."""
    tensors = safetensors_io.load(handle.path, mapped=True)[0]
    models = dict(zip(EXPERTS, (handle.teacher.model, handle.teacher.low_model)))
    return {name: host.with_lora(models[name], {k: v.clone() for k, v in part.items()})
            for name, part in expert_loras(tensors).items()}


def student_model(handle: StudentHandle):
    """The student as a ComfyUI MODEL: the teacher MODEL with the LoRA applied the stock way, or a new
    MODEL around a copy of its network with the full student's weights. None for the built-in teacher, for
    a student of experts (one network per phase, switched by sigma: no stock MODEL holds it; Few-step
    sample samples it), and for a student of two models (its two LoRAs go on them: ``write_expert_loras``)."""
    teacher = handle.teacher.model
    if teacher is None:
        return None
    tensors, card = safetensors_io.load(handle.path, mapped=True)  # a full student's are copied in below
    if card.get("experts") or card.get("comfy_experts"):
        return None
    if card["student"]["kind"] == "lora":  # ComfyUI keeps the adapters as patches: copies, not views of the file
        return host.with_lora(teacher, {k: v.clone() for k, v in tensors.items()})
    base = copy.deepcopy(teacher.model)
    base.diffusion_model.load_state_dict(tensors)
    return host.new_model(base, like=teacher)
