"""The one module that talks to ComfyUI (folders, progress bar, interrupts, events, model loading,
samplers, LoRA patches). Every ComfyUI import is inside a function, so the pack imports and its
nodes run without ComfyUI (CI, the headless runner): folders then come from the environment
(``DISTILL_MODELS_DIR``, default ``./models``; ``DISTILL_OUTPUT_DIR``, default ``./output``;
``DISTILL_INPUT_DIR``, default ``./input``) and progress goes nowhere.
"""

from __future__ import annotations

import importlib.util
import os
import re
import time
from pathlib import Path

import torch

from distill_core.denoisers.base import move_cond
from distill_core.teacher import CFGTeacher
from distill_core.train.callbacks import Callback

#: where each kind of file goes (ComfyUI's folder names: stock loaders list these)
FOLDERS = {"lora": "loras", "full": "diffusion_models"}
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,127}$")


def in_comfyui() -> bool:
    return importlib.util.find_spec("folder_paths") is not None and importlib.util.find_spec("comfy") is not None


def model_folder(kind: str) -> Path:
    """Where ComfyUI keeps ``kind`` (e.g. "loras"): its first search folder of that name (ComfyUI lists
    legacy names first for some kinds, e.g. ``models/unet`` before ``models/diffusion_models``), else
    its first search folder; outside ComfyUI ``$DISTILL_MODELS_DIR/<kind>``."""
    if in_comfyui():
        import folder_paths

        folders = [Path(p) for p in folder_paths.get_folder_paths(kind)]
        return next((p for p in folders if p.name == kind), folders[0])
    return Path(os.environ.get("DISTILL_MODELS_DIR", "models")) / kind


def output_folder() -> Path:
    if in_comfyui():
        import folder_paths

        return Path(folder_paths.get_output_directory())
    return Path(os.environ.get("DISTILL_OUTPUT_DIR", "output"))


def input_folder() -> Path:
    """Where ComfyUI keeps the images Load Image lists (its ``input`` folder)."""
    if in_comfyui():
        import folder_paths

        return Path(folder_paths.get_input_directory())
    return Path(os.environ.get("DISTILL_INPUT_DIR", "input"))


def runs_folder() -> Path:
    """Where training runs (checkpoints, metrics, sample grids) live: ``<output>/distill_runs``."""
    return output_folder() / "distill_runs"


def confined(folder: Path, name: str, suffix: str = "") -> Path:
    """``folder / (name + suffix)``, refusing names that could leave the folder (``../x``, ``/etc``,
    separators) or that are empty or odd; the error says what is allowed."""
    name = name.strip()
    if suffix and name.endswith(suffix):
        name = name[: -len(suffix)]
    if not SAFE_NAME.match(name) or ".." in name:
        raise ValueError(
            f"name {name!r} is not allowed: use letters, digits, spaces, '_', '-' and '.', no path "
            f"separators and no '..' (files are written only inside {folder})"
        )
    path = (folder / f"{name}{suffix}").resolve()
    if not path.is_relative_to(folder.resolve()):
        raise ValueError(f"name {name!r} would leave {folder}")
    return path


def list_files(kind: str) -> list[str]:
    """The ``.safetensors`` files of a model folder kind, as ComfyUI lists them."""
    if in_comfyui():
        import folder_paths

        return [f for f in folder_paths.get_filename_list(kind) if f.endswith(".safetensors")]
    folder = model_folder(kind)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.safetensors")) if folder.is_dir() else []


def find_file(kind: str, name: str) -> Path:
    """The full path of a listed file (only names from the folder's own listing are accepted)."""
    if name not in list_files(kind):
        raise FileNotFoundError(f"{name!r} is not in the {kind} folder ({model_folder(kind)})")
    if in_comfyui():
        import folder_paths

        return Path(folder_paths.get_full_path(kind, name))
    return model_folder(kind) / name


def run_stock_node(node_id: str, **inputs) -> tuple:
    """The outputs of the stock node ``node_id``, as this ComfyUI registered it, on ``inputs``: what that node gives
    in a graph (a node of ComfyUI's V3 API through its ``execute``, a classic one through its ``FUNCTION``). A
    ComfyUI without it is told to update."""
    import nodes

    stock = nodes.NODE_CLASS_MAPPINGS.get(node_id)
    if stock is None:
        raise ValueError(f"this ComfyUI has no {node_id} node, which this needs: update ComfyUI")
    if hasattr(stock, "define_schema"):
        return tuple(stock.execute(**inputs).result)
    return tuple(getattr(stock(), stock.FUNCTION)(**inputs))


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed Cancel (nothing outside ComfyUI)."""
    if in_comfyui():
        import comfy.model_management

        comfy.model_management.throw_exception_if_processing_interrupted()


def prompt_server():
    """ComfyUI's running server (``PromptServer.instance``); None outside one."""
    if not in_comfyui():
        return None
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def send_event(event: str, data: dict) -> None:
    """A custom event to the browser tab that queued the running prompt (``web/distill.js`` listens), as
    ComfyUI sends its own progress; nothing outside a ComfyUI server."""
    server = prompt_server()
    if server is not None:
        server.send_sync(event, data, getattr(server, "client_id", None))


def forget_cached_outputs() -> None:
    """Have ComfyUI drop its cached node outputs and node objects when the running prompt ends, as its menu's
    "Free model and node cache" does, but keeping the loaded models: a stock loader that read a file this node
    has since replaced would otherwise hand on the old file's weights until one of its inputs changes (its
    outputs are cached by input, and *LoraLoader* keeps the last file it read by path). Nothing outside a
    ComfyUI server."""
    queue = getattr(prompt_server(), "prompt_queue", None)
    if queue is not None:
        queue.set_flag("unload_models", False)
        queue.set_flag("free_memory", True)


#: a run projected to need more than this many seconds gets a warning on the node, after WARN_AFTER iterations
LONG_RUN_S, WARN_AFTER = 3600, 2


def long_run_warning(seconds_per_iteration: float, remaining: int) -> str:
    """What the node says of a run that will take hours on this machine."""
    hours = seconds_per_iteration * remaining / 3600
    return (f"about {hours:.1f} h to go on this machine ({seconds_per_iteration:.1f} s per iteration, {remaining} "
            "iterations left): lower iterations or batch, or use a GPU; Cancel keeps a checkpoint to resume from")


def run_seconds_at_least(source, iterations: int, batch: int, steps: int) -> float:
    """A lower bound of a training run's time on this machine, before it starts: one timed teacher evaluation
    of a single sample (its guidance's evaluations included, after one warm-up call), times the passes each
    training sample needs at the least: the teacher once per student step, and a forward and a backward pass
    of the student (about three passes)."""
    device = next(source.denoiser.parameters(), torch.zeros(0)).device
    x = torch.randn((1, *source.shape), device=device) * source.denoiser.sigma_max
    cond = move_cond(source.draw_cond(1, torch.Generator().manual_seed(0)), device)
    teacher = CFGTeacher(source.denoiser, source.guidance, move_cond(source.uncond, device))
    seconds = []
    with torch.no_grad():
        for _ in range(2):
            start = time.perf_counter()
            teacher(x, source.denoiser.sigma_max, cond)
            if device.type == "cuda":  # kernels run asynchronously: wait for them before reading the clock
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - start)
    return iterations * batch * (steps + 3) * seconds[-1]


def run_time_notice(seconds: float) -> str:
    """What the node says of a run's time before it starts (``run_seconds_at_least``), with advice when it
    will take hours on this machine."""
    span = f"{seconds / 3600:.1f} h" if seconds > LONG_RUN_S else f"{max(seconds / 60, 0.1):.1f} min"
    text = f"at least {span} on this machine (timed from one teacher evaluation before the run)"
    if seconds > LONG_RUN_S:
        text += ": lower iterations or batch, or use a GPU; Cancel keeps a checkpoint to resume from"
    return text


class NodeProgress(Callback):
    """Progress of a training node: ComfyUI's progress bar with a preview image every ``preview_every``
    iterations (each update is also ComfyUI's interrupt check: Cancel raises, and the trainer saves a
    checkpoint before the exception leaves), and a ``distill.progress`` event with the loss for the
    web extension's sparkline and ETA, and the run's planned memory."""

    def __init__(self, node_id: str | None, preview: callable | None = None, preview_every: int = 0):
        self.node_id, self.preview, self.preview_every = node_id, preview, preview_every
        self.bar = None
        self.warning: str | None = None  # set once the run is seen to need more than LONG_RUN_S
        self.memory: str | None = None  # the memory plan's peak, from the run's start

    def poll(self) -> None:
        """Cancel is answered within one network evaluation (at 512 px an iteration takes minutes)."""
        check_interrupt()

    def warn(self, text: str, run_name: str) -> None:
        """Print a warning once; the progress events carry it to the node (the web extension draws it)."""
        self.warning = text
        print(f"[comfyui-distill] {run_name}: {text}")

    def warn_before(self, seconds: float, run_dir: Path, total: int) -> None:
        """Say before the run starts that it will take hours (``run_seconds_at_least``)."""
        self.warn(run_time_notice(seconds), run_dir.name)
        send_event("distill.progress", {"node": self.node_id, "iteration": 0, "total": total, "run": str(run_dir),
                                        "warning": self.warning})

    def on_start(self, run) -> None:
        self.start, self.first = time.perf_counter(), run.iteration
        self.memory = f"{run.memory_plan.peak / 2**30:.1f} GiB"
        print(f"[comfyui-distill] {Path(run.out).name}: memory plan {run.memory_plan.describe()}")
        if in_comfyui():
            import comfy.model_management
            import comfy.utils

            self.cancels = (comfy.model_management.InterruptProcessingException,)

            self.bar = comfy.utils.ProgressBar(run.total)
            self.bar.update_absolute(run.iteration, run.total)

    def on_iteration(self, run, record: dict) -> None:
        done, total = run.iteration, run.total
        rate = (time.perf_counter() - self.start) / max(done - self.first, 1)
        eta_s = rate * (total - done)
        losses = record.get("loss", {})
        if self.warning is None and done - self.first >= WARN_AFTER and eta_s > LONG_RUN_S:
            self.warn(long_run_warning(rate, total - done), Path(run.out).name)
        send_event("distill.progress", {
            "node": self.node_id, "iteration": done, "total": total,
            "loss": sum(losses.values()) / max(len(losses), 1), "eta_s": round(eta_s, 1),
            "run": str(run.out), "memory": self.memory, **({"warning": self.warning} if self.warning else {}),
        })
        image = None
        if self.preview is not None and self.preview_every and done % self.preview_every == 0:
            image = self.preview(run)
        if self.bar is not None:
            self.bar.update_absolute(done, total, None if image is None else ("JPEG", image, 512))
        check_interrupt()


def to_pil(pixels: torch.Tensor):
    """``[H, W, 3]`` uint8 as a PIL image (ComfyUI ships Pillow; previews exist only there)."""
    from PIL import Image

    return Image.fromarray(pixels.numpy())


def preview_images(images: torch.Tensor, prefix: str = "distill") -> list[dict]:
    """Save IMAGE ``[B, H, W, 3]`` in [0, 1] as PNGs in ComfyUI's temp folder, as PreviewImage does, and
    return the node UI's image entries; nothing outside ComfyUI (the headless runner writes its own)."""
    if not in_comfyui():
        return []
    import uuid

    import folder_paths

    folder = Path(folder_paths.get_temp_directory())
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for k, image in enumerate(images):
        name = f"{prefix}_{uuid.uuid4().hex[:12]}_{k:03d}.png"
        to_pil((image * 255).round().clamp(0, 255).byte().cpu()).save(folder / name)
        entries.append({"filename": name, "subfolder": "", "type": "temp"})
    return entries


def load_models(models: list) -> None:
    """Have ComfyUI load (and patch) these MODELs before their weights are used directly (nothing to
    do outside ComfyUI, where a model's weights are where they are; nothing for none, the built-in teacher's)."""
    if not models or not in_comfyui():
        return
    import comfy.model_management

    comfy.model_management.load_models_gpu(models)


def trainable_weights(module: torch.nn.Module) -> None:
    """Replace inference-mode tensors (ComfyUI loads weights under ``torch.inference_mode()``) by
    normal copies of the same values, so autograd can save them for backward (an inference tensor stays
    one whatever its ``.data``: the parameter and buffer objects are replaced). Values are unchanged, so
    the shared MODEL computes exactly as before. Call inside ``torch.inference_mode(False)``."""
    for owner in module.modules():
        for name, p in list(owner._parameters.items()):
            if p is not None and p.is_inference():
                owner._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=p.requires_grad)
        for name, b in list(owner._buffers.items()):
            if b is not None and b.is_inference():
                owner._buffers[name] = b.clone()


def with_lora(model, tensors: dict[str, torch.Tensor], strength: float = 1.0):
    """A clone of MODEL with a LoRA state dict applied the way the stock LoraLoader applies it."""
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, None, tensors, strength, 0)[0]


def new_model(base_model, like):
    """A MODEL (ModelPatcher) around a new BaseModel, on the devices of MODEL ``like``."""
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(
        base_model, load_device=like.load_device, offload_device=like.offload_device
    )


def ksampler(function, **options):
    """A SAMPLER for SamplerCustom / SamplerCustomAdvanced from a k-diffusion-style function."""
    import comfy.samplers

    return comfy.samplers.KSAMPLER(function, extra_options=options)
