"""safetensors I/O with JSON metadata, atomic writes, and clear errors. Nothing else is ever loaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from distill_core.atomic import atomic_path

#: Metadata key under which the engine stores its JSON card in every file it writes.
CARD_KEY = "distill_core"
#: safetensors' names of the floating-point precisions a model's files may hold
STORED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def save_atomic(tensors: dict[str, torch.Tensor], path: str | Path, card: dict) -> Path:
    """Write ``tensors`` and ``card`` (JSON-serialisable) to ``path`` via a temporary file and rename,
    so an interrupted or failed write (full disk) never leaves a half-written file in its place."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={CARD_KEY: json.dumps(card)})
    return Path(path)


def read_card(path: str | Path) -> dict:
    """The engine's JSON card of a safetensors file; an error naming the file when it is not a readable
    safetensors file (truncated, another format) or has no card, or one that is not a JSON object."""
    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); was it cut short?") from None
    if CARD_KEY not in meta:
        raise ValueError(f"{path} has no comfyui-distill metadata: it was not written by this engine")
    try:
        card = json.loads(meta[CARD_KEY])
    except ValueError:
        raise ValueError(f"{path}: its comfyui-distill metadata is not JSON (the file was altered)") from None
    if not isinstance(card, dict):
        raise ValueError(f"{path}: its comfyui-distill metadata is not a JSON object (the file was altered)")
    return card


def load(path: str | Path, mapped: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and card of a file written by ``save_atomic``: each tensor a copy in memory, or with ``mapped`` a
    view of the memory-mapped file, read from disk only when touched (its shape costs nothing). ``mapped`` is
    for tensors that are copied into a network at once and then dropped: loading a network of P bytes then
    holds the network and the file's pages, which the system can take back, not a second P bytes of copies. A
    view kept longer keeps the file open (on Windows the file cannot be replaced meanwhile): keep copies."""
    path = _existing(path)
    card = read_card(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) if mapped else f.get_tensor(k).clone() for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is damaged: its tensors cannot be read ({e})") from None
    return tensors, card


def stored_dtype(folder: str | Path) -> torch.dtype:
    """The floating-point precision a diffusers model's files in ``folder`` hold (read from the first tensor of
    its first safetensors file; float32 where unknown)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return torch.float32
    with safe_open(str(files[0]), "pt") as f:
        first = next(iter(f.keys()), None)
        stored = f.get_slice(first).get_dtype() if first else "F32"
    return STORED_DTYPES.get(stored, torch.float32)


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (nothing is downloaded: check the path)")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors files are loaded (pickled checkpoints are refused)")
    return path
