"""The built-in reference teacher and metric classifier that ship with the engine (16x16 MNIST)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from distill_core import safetensors_io
from distill_core.denoisers.edm import EDMDenoiser
from distill_core.nets.unet import UNet, UNetConfig

ASSETS = Path(__file__).parent / "assets"
TEACHER_PATH = ASSETS / "teacher.safetensors"
CLASSIFIER_PATH = ASSETS / "classifier.safetensors"
#: Mean and covariance of the classifier's features over the MNIST test split (Frechet distance reference).
REFERENCE_STATS_PATH = ASSETS / "reference_stats.safetensors"

#: Teacher network configuration (about 1.2M parameters).
TEACHER_CONFIG = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(4,))
#: Guidance scale at which the built-in teacher is sampled and benchmarked by default.
DEFAULT_GUIDANCE = 2.0
SHAPE = (1, 16, 16)
NUM_CLASSES = 10


def build_denoiser(cfg: UNetConfig = TEACHER_CONFIG, sigma_min: float = 0.002, sigma_max: float = 80.0) -> EDMDenoiser:
    return EDMDenoiser(UNet(cfg), sigma_data=0.5, sigma_min=sigma_min, sigma_max=sigma_max)


def load_builtin_teacher(path: str | Path = TEACHER_PATH, device: str | torch.device = "cpu") -> EDMDenoiser:
    """The shipped teacher denoiser (weights frozen, eval mode)."""
    tensors, card = safetensors_io.load(path)
    denoiser = build_denoiser(UNetConfig.from_dict(card["config"]), card["sigma_min"], card["sigma_max"])
    denoiser.net.load_state_dict(tensors)
    return denoiser.eval().requires_grad_(False).to(device)


def fingerprint(module: torch.nn.Module) -> str:
    """A short hash of a network's weights: ties a student to the teacher it was distilled from."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]
