"""The built-in reference teacher and metric classifier that ship with the engine (16x16 MNIST)."""

from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path

import torch
from torch import nn

from distill_core import safetensors_io
from distill_core.denoisers.edm import EDMDenoiser
from distill_core.denoisers.flow import FlowDenoiser
from distill_core.nets.unet import UNet, UNetConfig

ASSETS = Path(__file__).parent / "assets"
TEACHER_PATH = ASSETS / "teacher.safetensors"
#: the same network trained as a rectified flow on the same data (``--teacher builtin-flow``)
FLOW_TEACHER_PATH = ASSETS / "teacher_flow.safetensors"
CLASSIFIER_PATH = ASSETS / "classifier.safetensors"
#: Mean and covariance of the classifier's features over the MNIST test split (Frechet distance reference).
REFERENCE_STATS_PATH = ASSETS / "reference_stats.safetensors"

#: Teacher network configuration (about 1.2M parameters).
TEACHER_CONFIG = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(4,))
#: Guidance scale at which the built-in teacher is sampled and benchmarked by default.
DEFAULT_GUIDANCE = 2.0
SHAPE = (1, 16, 16)
NUM_CLASSES = 10


def build_denoiser(cfg: UNetConfig = TEACHER_CONFIG, preconditioning: str = "edm", **settings) -> nn.Module:
    """The built-in UNet inside its parametrisation: ``edm`` (sigma_data, sigma_min, sigma_max) or ``flow``
    (a rectified flow's velocity; sigma_min, sigma_max, time_scale)."""
    if preconditioning == "edm":
        return EDMDenoiser(UNet(cfg), **{"sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0, **settings})
    if preconditioning == "flow":
        return FlowDenoiser(UNet(cfg), **settings)
    raise ValueError(f"unknown preconditioning {preconditioning!r}: edm or flow")


def from_settings(cfg: UNetConfig, settings: dict) -> nn.Module:
    """``build_denoiser`` from a card's ``preconditioning`` entry and its settings (``settings()`` of a denoiser)."""
    settings = dict(settings)
    return build_denoiser(cfg, settings.pop("preconditioning", "edm"), **settings)


def load_builtin_teacher(path: str | Path = TEACHER_PATH, device: str | torch.device = "cpu") -> nn.Module:
    """A shipped teacher denoiser (weights frozen, eval mode): the EDM one, or the flow one at FLOW_TEACHER_PATH."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall the package, or train it with "
                                "python -m distill_core train-teacher (--flow for the flow teacher)")
    tensors, card = safetensors_io.load(path)
    keys = ("preconditioning", "sigma_data", "sigma_min", "sigma_max", "time_scale")
    denoiser = from_settings(UNetConfig.from_dict(card["config"]), {k: card[k] for k in keys if k in card})
    denoiser.net.load_state_dict(tensors)
    return denoiser.eval().requires_grad_(False).to(device)


#: networks cast to another precision after loading (``cast_weights``), with their fingerprint as loaded (a copy
#: of one is another network: its own weights are its fingerprint)
_LOADED: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()
#: the precision each of them was cast to
_CAST: weakref.WeakKeyDictionary[torch.nn.Module, torch.dtype] = weakref.WeakKeyDictionary()


def fingerprint(module: torch.nn.Module) -> str:
    """A short hash of a network's weights and, for a denoiser, of its parametrisation (``settings()``:
    prediction type and noise range): ties a student to the teacher it was distilled from, so that the same
    weights read as another prediction type are another teacher. A network cast after loading (``cast_weights``)
    keeps the hash of its weights as loaded: its students belong to the teacher the user has."""
    if module in _LOADED:
        return _LOADED[module]
    h = hashlib.sha256()
    if hasattr(module, "settings"):
        h.update(json.dumps(module.settings(), sort_keys=True).encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


#: the dtype of each frozen precision a run may cast its teacher to (``frozen_precision``)
CAST_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


def cast_weights(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """``module``'s floating-point weights in ``dtype``, in place, but those its networks keep in float32 at any
    precision (``kept_float32``); for ``fp8.FP8``, its Linear layers' weights in 8 bits with their scales
    (``fp8.store_linear_fp8``) and the rest in bf16. Its ``fingerprint`` stays the one of its weights as loaded."""
    from distill_core.fp8 import FP8, SCALE, store_linear_fp8

    loaded, precision = fingerprint(module), dtype
    kept = kept_float32(module)
    if dtype == FP8:
        store_linear_fp8(module, kept)
        dtype = torch.bfloat16
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.is_floating_point() and t.dtype != FP8 and name not in kept and not name.endswith(SCALE):
            t.data = t.data.to(dtype)
    _LOADED[module] = loaded
    _CAST[module] = precision


def kept_float32(module: torch.nn.Module) -> set[str]:
    """The names of the weights in ``module`` that its diffusers networks keep in float32 in every precision, as
    diffusers loads them (each network's ``_keep_in_fp32_modules``, matched within a weight's name: Wan's time
    embedder, modulation tables and norms)."""
    kept = set()
    for prefix, network in module.named_modules():
        patterns = getattr(network, "_keep_in_fp32_modules", None) or ()
        for name, _ in [*network.named_parameters(), *network.named_buffers()] if patterns else ():
            if any(p in name for p in patterns):
                kept.add(f"{prefix}.{name}" if prefix else name)
    return kept


def cast_precision(module: torch.nn.Module) -> torch.dtype | None:
    """The precision ``cast_weights`` cast this network to after it was loaded (None: it did not)."""
    return _CAST.get(module)


def solve_fingerprint(module: torch.nn.Module) -> str:
    """The ``fingerprint`` of what a network computes, which keys its cached solves: a network cast after loading
    computes in its new precision, so the dtypes of its floating-point weights join the fingerprint."""
    if cast_precision(module) is None:
        return fingerprint(module)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in [*module.parameters(), *module.buffers()]
                     if t.is_floating_point()})
    return f"{fingerprint(module)}-{'-'.join(dtypes)}"


def refuse_replacing_asset(out: str | Path, replace: bool, what: str) -> None:
    """Refuse, before any training, to write over an existing file at ``out`` unless ``replace``: a shipped
    asset written over changes the fingerprint that every student of it is checked against (``what`` says
    what the file is and what depends on it)."""
    if Path(out).exists() and not replace:
        raise ValueError(f"{out} exists ({what}): give --out with a new file's path, or --replace to write over it")


def add_replace_argument(p) -> None:
    p.add_argument("--replace", action="store_true", help="write over the file at --out where one exists (for the "
                   "shipped one: what was made with the old one no longer matches it)")
