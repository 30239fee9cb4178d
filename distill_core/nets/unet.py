"""The built-in UNet: a small class-conditional image network in the style of DDPM++ / EDM.

It computes the raw network F(c_in x, c_noise, class) of Karras et al. (2022); the EDM
preconditioning around it lives in ``distill_core.denoisers.edm``. Width and depth multipliers
give the lighter students of phased distillation from the same family. Class ``num_classes``
is the null class used for classifier-free guidance. ``extra_emb`` lets a method add a
conditioning vector (for example SFD-v's step-count embedding) next to the time embedding.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from distill_core.attention import attention


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 1
    resolution: int = 16
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (4,)
    num_classes: int = 10
    num_heads: int = 1
    dropout: float = 0.0

    def scaled(self, width: float = 1.0, depth: float = 1.0) -> UNetConfig:
        """The same family with ``width`` x channels and ``depth`` x blocks per level."""
        return UNetConfig(**{
            **asdict(self),
            "model_channels": max(8, int(round(self.model_channels * width / 8)) * 8),
            "num_blocks": max(1, int(round(self.num_blocks * depth))),
        })

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> UNetConfig:
        return UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _norm(channels: int) -> nn.GroupNorm:
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` [B, C, H, W] laid out channels-last, stride for stride (a one-channel image is contiguous and
    channels-last at once, and convolutions read its strides). A convolution picks its kernel from the layouts
    of input and weights; with the input in this layout it runs the same kernel whatever its weights' layout,
    so the net computes the same bits with the channels-last weights it keeps and with contiguous copies of
    them (the weights a sharded teacher gathers)."""
    b, c, h, w = x.shape
    if x.stride() == (h * w * c, 1, w * c, c):
        return x
    return torch.empty_like(x, memory_format=torch.channels_last).copy_(x)


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(t w_i), sin(t w_i)] with w_i = max_period^(-i / (dim/2)), as in DDPM's timestep embedding."""
    half = dim // 2
    dtype = torch.promote_types(t.dtype, torch.float32)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = t.to(dtype)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """GN-SiLU-conv, scale/shift from the embedding, GN-SiLU-dropout-conv, residual."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb_dim, 2 * cout)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = nn.functional.silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(self.dropout(h))


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, through the engine's backend."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w).unbind(1)
        out = attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(channels_last(out.transpose(-1, -2).reshape(b, c, h, w)))


class Level(nn.Module):
    """One ResBlock (+ attention) of the encoder or decoder."""

    def __init__(self, cin: int, cout: int, emb_dim: int, attn: bool, cfg: UNetConfig):
        super().__init__()
        self.res = ResBlock(cin, cout, emb_dim, cfg.dropout)
        self.attn = AttentionBlock(cout, cfg.num_heads) if attn else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.attn(self.res(x, emb))


class UNet(nn.Module):
    """F(x, c_noise, class_labels, extra_emb) -> tensor shaped like x."""

    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.cfg = cfg
        ch = cfg.model_channels
        self.emb_dim = emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(cfg.num_classes + 1, emb_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        widths = [ch * m for m in cfg.channel_mult]
        self.down, skips, cur, res = nn.ModuleList(), [ch], ch, cfg.resolution
        for i, width in enumerate(widths):
            for _ in range(cfg.num_blocks):
                self.down.append(Level(cur, width, emb_dim, res in cfg.attn_resolutions, cfg))
                cur = width
                skips.append(cur)
            if i < len(widths) - 1:
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skips.append(cur)
                res //= 2
        self.mid = nn.ModuleList([Level(cur, cur, emb_dim, True, cfg), Level(cur, cur, emb_dim, False, cfg)])
        self.up = nn.ModuleList()
        for i, width in reversed(list(enumerate(widths))):
            for _ in range(cfg.num_blocks + 1):
                self.up.append(Level(cur + skips.pop(), width, emb_dim, res in cfg.attn_resolutions, cfg))
                cur = width
            if i > 0:
                upsample = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cur, cur, 3, padding=1))
                self.up.append(upsample)
                res *= 2
        self.out = nn.Sequential(_norm(cur), nn.SiLU(), nn.Conv2d(cur, cfg.in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        # convolution weights in channels_last: oneDNN's CPU convolutions run about 17 % faster on this
        # net (the activations follow the weights); state_dict values keep this layout, files do not
        self.to(memory_format=torch.channels_last)

    def embedding(self, c_noise: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        """Time embedding (of EDM's c_noise, scaled to a useful frequency range) plus class embedding."""
        dtype = self.class_emb.weight.dtype
        emb = self.time_mlp(sinusoidal_embedding(c_noise * 250.0, self.cfg.model_channels).to(dtype))
        if class_labels is None:
            class_labels = torch.full((c_noise.shape[0],), self.cfg.num_classes, device=c_noise.device)
        return emb + self.class_emb(class_labels)

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        extra_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.embedding(c_noise, class_labels)
        if extra_emb is not None:
            emb = emb + extra_emb
        emb = nn.functional.silu(emb)
        h = self.conv_in(channels_last(x))
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, Level) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], dim=1), emb) if isinstance(layer, Level) else layer(h)
        return self.out(h)
