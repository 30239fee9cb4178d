"""A GAN classifier on a denoiser's bottleneck features: DMD2's GAN head (Yin et al. 2024, sec. 4.3), which
reads the fake score's own features of a noised image and says whether the image was real or generated.

    logit(x_t) = h( f(x_t, sigma) ),   f: the network's bottleneck output (its middle block),
    h: 4x4 stride-2 conv -> GroupNorm -> SiLU -> 1x1 conv to one channel -> spatial mean.

``ScoreWithHead`` is the fake score with its head: a denoiser like the fake score (``forward``), plus
``classify``; checkpoints hold the score's trained part and the head.
"""

from __future__ import annotations

import torch
from torch import nn

from distill_core.denoisers.base import Cond
from distill_core.students import PartlySaved, StudentNet

#: names of a network's bottleneck module (ComfyUI / LDM, diffusers, the built-in UNet)
BOTTLENECK_NAMES = ("middle_block", "mid_block", "mid")


def bottleneck(network: nn.Module) -> nn.Module:
    """The bottleneck module of ``network``: the first module named one of ``BOTTLENECK_NAMES`` (the last
    entry of it when it is a list of blocks)."""
    for name, module in network.named_modules():
        if name.split(".")[-1] in BOTTLENECK_NAMES:
            return module[-1] if isinstance(module, nn.ModuleList) else module
    raise ValueError(f"the GAN head reads the network's bottleneck, a module named one of {BOTTLENECK_NAMES}; "
                     f"a {type(network).__name__} has none (set gan_weight 0)")


class Head(nn.Module):
    """h: features [B, C, H, W] -> one logit per sample."""

    def __init__(self, channels: int):
        super().__init__()
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.GroupNorm(groups, channels), nn.SiLU(),
            nn.Conv2d(channels, 1, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float()).mean(dim=(1, 2, 3))


class ScoreWithHead(PartlySaved):
    """The fake score ``score`` and a GAN head on its bottleneck; ``probe``: an input (x, sigma, cond) of the
    right shape, run once to size the head."""

    def __init__(self, score: StudentNet, probe: tuple[torch.Tensor, torch.Tensor, Cond]):
        super().__init__()
        self.score = score
        self.sigma_min, self.sigma_max = score.sigma_min, score.sigma_max
        with torch.no_grad():
            channels = self.features(*probe).shape[1]
        self.head = Head(channels).to(next(score.parameters()).device)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond = None) -> torch.Tensor:
        return self.score(x, sigma, cond)

    def features(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond = None) -> torch.Tensor:
        """f(x, sigma): the bottleneck output of the score's forward pass (hooked for this pass only: a shared
        base's other networks run it unhooked)."""
        caught = {}

        def catch(module, args, output):
            caught["features"] = output

        handle = bottleneck(self.score.denoiser).register_forward_hook(catch)
        try:
            self.score(x, sigma, cond)
        finally:
            handle.remove()
        return caught["features"]

    def classify(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond = None) -> torch.Tensor:
        """logit(x_t): real (> 0) or generated (< 0)."""
        return self.head(self.features(x, sigma, cond))

    def saved_state(self) -> dict[str, torch.Tensor]:
        return {**{f"score.{k}": v for k, v in self.score.saved_state().items()},
                **{f"head.{k}": v for k, v in self.head.state_dict().items()}}

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        self.score.load_saved_state({k[len("score."):]: v for k, v in state.items() if k.startswith("score.")})
        self.head.load_state_dict({k[len("head."):]: v for k, v in state.items() if k.startswith("head.")})
