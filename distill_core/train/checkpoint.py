"""Training checkpoints as safetensors, never pickles: every tensor of the training state (networks,
optimizers, EMA, RNG states) is stored under a flat key, and the nested structure around them
(dicts with integer keys, tuples, numbers) is JSON in the file's card. A human-readable JSON
sidecar says which iteration the checkpoint holds.

The last two checkpoints are kept: a new one is written to a temporary file, the current one becomes
``checkpoint.prev.safetensors``, and the new one takes its place (every step a rename), so a kill or a
full disk at any point leaves at least one whole checkpoint. ``load_checkpoint`` falls back to the
previous one, with a message that names the bad file, when the current one cannot be read; what it
returns is copied out of the file (nothing stays memory-mapped, so the files can be replaced).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from distill_core import safetensors_io
from distill_core.atomic import atomic_path, replace, write_json

#: the folder of a run's checkpoints, in its output folder
CHECKPOINTS = "checkpoints"
CHECKPOINT = "checkpoint.safetensors"
PREVIOUS = "checkpoint.prev.safetensors"
SIDECAR = "checkpoint.json"


class CheckpointError(ValueError):
    """No readable checkpoint in a run's folder; the message names the files and what is wrong."""


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
    """Write ``state`` (nested dicts / lists of tensors and plain values) and the sidecar ``info``; the
    checkpoint it replaces is kept as the previous one."""
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    structure = flatten(state, tensors)
    card = {"kind": "checkpoint", "structure": structure, **info}
    with atomic_path(directory / CHECKPOINT) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={safetensors_io.CARD_KEY: json.dumps(card)})
        if (directory / CHECKPOINT).is_file():
            replace(directory / CHECKPOINT, directory / PREVIOUS)
    write_json(
        directory / SIDECAR, {**info, "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"), "file": CHECKPOINT}
    )
    return directory / CHECKPOINT


def load_checkpoint(directory: str | Path, report=print) -> tuple[dict, dict]:
    """The state and info of the newest readable checkpoint in ``directory`` (the previous one, with a
    message through ``report``, when the current one is damaged)."""
    directory = Path(directory)
    problems = []
    for name in (CHECKPOINT, PREVIOUS):
        path = directory / name
        if not path.is_file():
            continue
        try:
            state, info = _read(path)
        except (ValueError, OSError, KeyError, TypeError) as e:
            problems.append(f"{path} is unreadable ({type(e).__name__}: {e})")
            continue
        if problems:
            report(f"{problems[0]}; resuming from the previous checkpoint {path} (iteration {info['iteration']})")
        return state, info
    if not problems:
        raise CheckpointError(f"no checkpoint in {directory}: there is nothing to resume (start the run without "
                              "resume)")
    raise CheckpointError("; ".join(problems) + ": no checkpoint to resume from (start the run again)")


def checkpoint_info(directory: str | Path) -> dict:
    """The info (iteration, config, ...) of the newest checkpoint whose card reads, without its tensors."""
    directory = Path(directory)
    for name in (CHECKPOINT, PREVIOUS):
        try:
            card = safetensors_io.read_card(directory / name)
        except (ValueError, OSError):
            continue
        if card.get("kind") == "checkpoint" and isinstance(card.get("config"), dict):
            return {k: v for k, v in card.items() if k not in ("kind", "structure")}
    raise CheckpointError(f"no readable checkpoint in {directory}: there is nothing to resume (start the run "
                          "without resume)")


def _read(path: Path) -> tuple[dict, dict]:
    card = safetensors_io.read_card(path)
    if not isinstance(card, dict) or card.get("kind") != "checkpoint":
        raise ValueError("not a training checkpoint")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    info = {k: v for k, v in card.items() if k not in ("kind", "structure")}
    if not isinstance(info.get("iteration"), int) or not isinstance(info.get("config"), dict):
        raise ValueError("its card lacks the iteration or the config")
    return unflatten(card["structure"], tensors), info


def has_checkpoint(directory: str | Path) -> bool:
    return any((Path(directory) / name).is_file() for name in (CHECKPOINT, PREVIOUS))
