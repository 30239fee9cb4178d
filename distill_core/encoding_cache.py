"""Encoded prompts and images kept beside a run (its ``cache/`` folder), so that a resumed run reads them back
instead of loading and running its pipeline's text encoders, image encoders and VAE again (minutes, for an encoder
of billions of parameters).

An entry is what one encoding step of a pipeline teacher computed (``text_source``: the prompt tables, the image
tables, or Qwen-Image-Edit's tables of (instruction, image) pairs), keyed by

    key = sha256(step, pipeline files, inputs)

the pipeline files being every file of its folder but its networks' (each file's path, size and modification
time: a changed or replaced encoder, tokenizer or VAE is another entry) and the inputs the run's prompts,
negative, sample shape, image files (each with its size and modification time) and pairing. Entries are
safetensors, written atomically; the folder only ever grows (delete it to free the space).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distill_core.safetensors_io import load, save_atomic
from distill_core.stages import announce
from distill_core.teacher_cache import flatten, unflatten

#: the folders of a pipeline that hold its networks, which no encoding step reads
NETWORK_FOLDERS = ("unet", "transformer", "transformer_2")


def file_stamp(path: Path) -> list:
    """What identifies a file's contents without reading them: its path, size and modification time; of a set of
    images (a folder, ``reference_images.image_sets``), its path and its images' stamps."""
    from distill_core.reference_images import images_of

    if path.is_dir():
        return [str(path), [file_stamp(image) for image in images_of(path)]]
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


def pipeline_stamp(root: Path) -> list:
    """``file_stamp`` of every file of the pipeline at ``root`` that an encoding step may read: all but its
    networks' (``NETWORK_FOLDERS``)."""
    return [file_stamp(path) for path in sorted(root.rglob("*"))
            if path.is_file() and path.relative_to(root).parts[0] not in NETWORK_FOLDERS]


def kept(folder: Path | None, step: str, key: dict, compute: Callable[[], Any]) -> Any:
    """``compute()`` (tensors in any nest of dicts, tuples and lists) of the encoding step named ``step``, whose
    inputs ``key`` names (JSON): read from ``folder`` where an earlier run put it there, else computed and written
    there; computed alone without a folder."""
    if folder is None:
        return compute()
    digest = hashlib.sha256(json.dumps([step, key], sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(folder) / f"encoded_{step}_{digest}.safetensors"
    if path.is_file():
        announce(f"reading the encoded {step} from {path}, where an earlier start of this run wrote them")
        tensors, card = load(path)
        return unflatten(tensors, card["layout"])
    value = compute()
    tensors, layout = flatten(value)
    save_atomic(tensors, path, {"layout": layout, "step": step})
    return value
