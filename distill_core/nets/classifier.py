"""The metric classifier: a small CNN on 1x16x16 digits in [-1, 1].

Its logits give the class accuracy of samples; its penultimate layer (a 128-d globally pooled
feature) is the space in which Frechet distances to the data are measured, as Inception-v3's pool
features are for FID (Heusel et al. 2017).
"""

from __future__ import annotations

import torch
from torch import nn


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution, GroupNorm, SiLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU())


class Classifier(nn.Module):
    """16x16 -> conv 32 -> conv 64 (stride 2, 8x8) -> conv 128 (stride 2, 4x4) -> conv 128 -> mean over
    space -> feature [B, 128] -> linear -> logits [B, 10]. Every conv is 3x3, GroupNorm(8), SiLU.
    About 240k parameters; three epochs reach 98.9 % test accuracy in under two minutes on one core."""

    def __init__(self, channels: tuple[int, int, int] = (32, 64, 128), num_classes: int = 10):
        super().__init__()
        c1, c2, c3 = channels
        self.body = nn.Sequential(_conv(1, c1), _conv(c1, c2, 2), _conv(c2, c3, 2), _conv(c3, c3))
        self.head = nn.Linear(c3, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate layer, ``[B, 128]``: body activations averaged over the 4x4 positions."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
