"""Training checkpoints as safetensors, never pickles: every tensor of the training state (student,
optimizer, EMA, RNG states) is stored under a flat key, and the nested structure around them
(dicts with integer keys, tuples, numbers) is JSON in the file's card. A human-readable JSON
sidecar says which iteration the checkpoint holds. Both are written atomically (temporary file,
then rename), the safetensors file first, so an interrupted save leaves the previous checkpoint whole.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from distill_core import safetensors_io
from distill_core.atomic import write_json

CHECKPOINT = "checkpoint.safetensors"
SIDECAR = "checkpoint.json"


def flatten(obj, tensors: dict[str, torch.Tensor], prefix: str = "t"):
    """A JSON-able description of ``obj`` with each tensor moved into ``tensors`` under a fresh key."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}.{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: flatten(v, tensors, prefix) for k, v in obj.items()}}
        return {"__items__": [[k, flatten(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {
            "__tuple__" if isinstance(obj, tuple) else "__list__": [flatten(v, tensors, prefix) for v in obj]
        }
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def unflatten(desc, tensors: dict[str, torch.Tensor]):
    """The inverse of ``flatten``."""
    if not isinstance(desc, dict):
        return desc
    if "__tensor__" in desc:
        return tensors[desc["__tensor__"]]
    if "__dict__" in desc:
        return {k: unflatten(v, tensors) for k, v in desc["__dict__"].items()}
    if "__items__" in desc:
        return {k: unflatten(v, tensors) for k, v in desc["__items__"]}
    if "__tuple__" in desc:
        return tuple(unflatten(v, tensors) for v in desc["__tuple__"])
    return [unflatten(v, tensors) for v in desc["__list__"]]


def save_checkpoint(directory: str | Path, state: dict, info: dict) -> Path:
    """Write ``state`` (nested dicts / lists of tensors and plain values) and the sidecar ``info``."""
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    structure = flatten(state, tensors)
    card = {"kind": "checkpoint", "structure": structure, **info}
    path = safetensors_io.save_atomic(tensors, directory / CHECKPOINT, card)
    write_json(
        directory / SIDECAR, {**info, "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"), "file": CHECKPOINT}
    )
    return path


def load_checkpoint(directory: str | Path) -> tuple[dict, dict]:
    """The state and info of the checkpoint in ``directory``."""
    tensors, card = safetensors_io.load(Path(directory) / CHECKPOINT)
    if card.get("kind") != "checkpoint":
        raise ValueError(f"{directory}/{CHECKPOINT} is not a training checkpoint")
    info = {k: v for k, v in card.items() if k not in ("kind", "structure")}
    return unflatten(card["structure"], tensors), info


def has_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / CHECKPOINT).is_file()
