"""Shared fixtures: tiny models built from config with every parameter randomised (no download)."""

from __future__ import annotations

import pytest
import torch

from distill_core.denoisers.edm import EDMDenoiser
from distill_core.nets.unet import UNet, UNetConfig

TINY_UNET = UNetConfig(in_channels=1, resolution=8, model_channels=8, channel_mult=(1, 2), num_blocks=1,
                       attn_resolutions=(4,), num_classes=10)


def randomise(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Give every parameter a seeded random value (zero-initialised output layers would make the
    denoiser linear in x and hide solver errors)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return module


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture
def tiny_edm() -> EDMDenoiser:
    """A tiny class-conditional EDM denoiser on 1x8x8 images with random weights, in eval mode."""
    return EDMDenoiser(randomise(UNet(TINY_UNET))).eval().requires_grad_(False)
