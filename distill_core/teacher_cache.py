"""Teacher targets kept on disk and shared between runs (``teacher_cache``: a folder).

A method's teacher solve that does not depend on the student (SFD's trajectories, the noise-to-image pairs of
knowledge distillation, rectified flow and data-free consistency training) is a function of the teacher, the
solve's settings and the random draws it starts from. A draw is identified by its generator's state before
the solve, so an entry is keyed by

    key = sha256(signature, generator state before the solve)

where the signature names the teacher (``source_fingerprint``: weights, parametrisation and condition
distribution) and every setting of the solve. An entry holds the solve's tensors, the generator's state after
it (set on a hit, so every later draw of the run is what it would have been) and the teacher evaluations it
cost (counted on a hit too: a student's card says what its targets cost, wherever they were solved). A run
with a warm cache therefore trains bit for bit the student it would have trained without one.

Runs that share a seed share their draws: a learning curve (the same run at three budgets) solves the
longest run's targets once, and ``python -m distill_core precompute`` solves a run's targets ahead without
training. Entries are written atomically; the folder only ever grows (delete it to free the space).

A small solve that every run repeats (SFD's class means) is also kept in memory when a run has no folder:
the process's later runs on the same teacher, settings and draws read it there (the last ``MEMORY_ENTRIES``).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from distill_core.builtin import solve_fingerprint
from distill_core.safetensors_io import load, save_atomic

#: conditions drawn to fingerprint a teacher source's condition distribution
COND_PROBE = 8
#: solves kept in memory for the process (``in_memory`` caches without a folder), the least recently used dropped
MEMORY_ENTRIES = 4
_memory: OrderedDict[str, tuple[dict[str, torch.Tensor], dict]] = OrderedDict()


def source_fingerprint(source) -> str:
    """A short hash of a ``TeacherSource`` as a teacher of targets: its denoiser (``solve_fingerprint``), the sample
    shape, the unconditional condition and a probe of its condition draws (so another prompt list or text
    encoder is another teacher)."""
    h = hashlib.sha256(solve_fingerprint(source.denoiser).encode())
    h.update(json.dumps(list(source.shape)).encode())
    tensors, layout = flatten((source.draw_cond(COND_PROBE, torch.Generator().manual_seed(0)), source.uncond))
    h.update(json.dumps(layout, sort_keys=True).encode())
    for name in sorted(tensors):
        h.update(tensors[name].float().numpy().tobytes())
    return h.hexdigest()[:16]


class TeacherCache:
    """The cache of one kind of solve in one run: ``folder`` (None: none on disk) and a function giving the
    signature (JSON-serialisable) of the solve's settings, called once, on the first lookup (a teacher's
    fingerprint reads all its weights); ``in_memory``: without a folder, keep the solve for the process's later
    runs (for small solves only); ``hits`` and ``solves`` count the lookups."""

    def __init__(self, folder: str | Path | None, signature: Callable[[], dict], in_memory: bool = False):
        self.folder = None if folder is None else Path(folder)
        if self.folder is not None:  # a folder that cannot be made fails the run now, not after its first solve
            self.folder.mkdir(parents=True, exist_ok=True)
        self.in_memory = in_memory
        self._signature, self.signature = signature, ""
        self.hits = self.solves = 0

    def solve(self, generator: torch.Generator, compute: Callable[[], tuple[Any, int]], device: torch.device,
              **detail) -> tuple[Any, int]:
        """``compute()`` -> (result, teacher evaluations), drawing from ``generator``; or, when the cache holds
        this solve (the same signature, ``detail`` and generator state), the stored result on ``device`` and
        its evaluations, with ``generator`` advanced past it."""
        if self.folder is None and not self.in_memory:
            return compute()
        self.signature = self.signature or json.dumps(self._signature(), sort_keys=True)
        key = self._key(generator, detail)
        stored = self._stored(key)
        if stored is not None:
            self.hits += 1
            tensors, card = stored
            generator.set_state(tensors.pop("generator_state"))
            return unflatten({k: v.to(device) for k, v in tensors.items()}, card["layout"]), card["evaluations"]
        result, evaluations = compute()
        self.solves += 1
        tensors, layout = flatten(result)
        tensors["generator_state"] = generator.get_state()
        card = {"layout": layout, "evaluations": evaluations, "signature": self.signature}
        if self.folder is None:
            _memory[key] = ({k: v.detach().cpu().clone() for k, v in tensors.items()}, card)
            while len(_memory) > MEMORY_ENTRIES:
                _memory.popitem(last=False)
        else:
            save_atomic(tensors, self.folder / f"{key}.safetensors", card)
        return result, evaluations

    def _stored(self, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The entry ``key`` (its tensors, the caller's to change, and its card), or None."""
        if self.folder is None:
            if key not in _memory:
                return None
            _memory.move_to_end(key)
            tensors, card = _memory[key]
            return {k: v.clone() for k, v in tensors.items()}, card
        path = self.folder / f"{key}.safetensors"
        return load(path) if path.is_file() else None

    def _key(self, generator: torch.Generator, detail: dict) -> str:
        h = hashlib.sha256(self.signature.encode())
        h.update(json.dumps(detail, sort_keys=True).encode())
        h.update(generator.get_state().numpy().tobytes())
        return h.hexdigest()[:32]


def flatten(obj: Any, name: str = "r") -> tuple[dict[str, torch.Tensor], Any]:
    """Tensors of a nest of tuples, lists, dicts, tensors and None, named by their path, and the nest's
    layout (JSON) that ``unflatten`` rebuilds it from."""
    if obj is None:
        return {}, None
    if isinstance(obj, torch.Tensor):
        return {name: obj}, name
    if isinstance(obj, dict):
        parts = {k: flatten(v, f"{name}.{k}") for k, v in obj.items()}
        return {k: t for tensors, _ in parts.values() for k, t in tensors.items()}, \
            {"dict": {k: layout for k, (_, layout) in parts.items()}}
    if isinstance(obj, tuple | list):
        parts = [flatten(v, f"{name}.{i}") for i, v in enumerate(obj)]
        return {k: t for tensors, _ in parts for k, t in tensors.items()}, \
            {type(obj).__name__: [layout for _, layout in parts]}
    raise TypeError(f"a teacher target holds tensors, not {type(obj).__name__}")


def unflatten(tensors: dict[str, torch.Tensor], layout: Any) -> Any:
    """The nest ``flatten`` described by ``layout``."""
    if layout is None:
        return None
    if isinstance(layout, str):
        return tensors[layout]
    (kind, inner), = layout.items()
    if kind == "dict":
        return {k: unflatten(tensors, v) for k, v in inner.items()}
    items = [unflatten(tensors, v) for v in inner]
    return tuple(items) if kind == "tuple" else items
