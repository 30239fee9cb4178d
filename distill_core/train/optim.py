"""One trained group's optimisation: its settings resolved from the method's ``OptimSpec`` and the run's
config, its optimizer (Adam, AdamW or 8-bit Adam), its learning-rate multiplier per iteration, the EMA copy of
its weights, and the gradient hygiene of an update (the norm over all gradients, non-finite entries zeroed).
"""

from __future__ import annotations

import copy
import importlib.util
import math
from dataclasses import dataclass

import torch
from torch import nn

from distill_core.config import DistillConfig
from distill_core.methods.base import OptimSpec


@dataclass
class Group:
    """One group's optimisation, resolved from the method's ``OptimSpec`` and the run's config."""

    optimizer: str
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    schedule: str
    warmup: int
    ema: float | None


def resolve_group(spec: OptimSpec, cfg: DistillConfig, exported: bool) -> Group:
    """The run's config overrides the method's choices where it sets them (``None``: the method's); the run's
    ``ema`` applies to the exported group."""
    return Group(
        optimizer=cfg.optimizer or spec.optimizer,
        lr=cfg.lr if spec.lr is None else spec.lr,
        betas=tuple(spec.betas),
        weight_decay=spec.weight_decay if cfg.weight_decay is None else cfg.weight_decay,
        schedule=cfg.lr_schedule or spec.schedule,
        warmup=resolve_warmup(cfg.lr_warmup, spec.warmup, cfg.iters),
        ema=cfg.ema if exported and cfg.ema is not None else spec.ema,
    )


def make_optimizer(group: Group, params: list[nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """The group's optimizer: Adam, AdamW, or bitsandbytes' 8-bit Adam (its two moments block-wise quantised
    to 8 bits, Dettmers et al. 2022), which needs CUDA and the optional ``bitsandbytes`` package."""
    if group.optimizer == "adam8bit":
        if device.type != "cuda" or importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("optimizer adam8bit keeps Adam's states in 8 bits with bitsandbytes on CUDA: install it "
                             "(pip install bitsandbytes) on a CUDA machine, or choose adam")
        import bitsandbytes  # noqa: PLC0415 - optional, CUDA-only dependency

        return bitsandbytes.optim.Adam8bit(params, lr=group.lr, betas=group.betas, weight_decay=group.weight_decay)
    optim = torch.optim.AdamW if group.optimizer == "adamw" else torch.optim.Adam
    return optim(params, lr=group.lr, betas=group.betas, weight_decay=group.weight_decay)


def ema_copy(net: nn.Module) -> nn.Module:
    """The network an EMA of ``net``'s trained weights is kept in: a copy of its trainable parameters and
    buffers that shares its frozen parameters (a LoRA student's base, the teacher, is not copied: the EMA
    costs 4 bytes per trained parameter, as the memory plan counts)."""
    frozen = {id(p): p for p in net.parameters() if not p.requires_grad}
    return copy.deepcopy(net, memo=frozen).requires_grad_(False)


def keep_trainables_float32(net: nn.Module) -> None:
    """Trainable parameters in float32 (Adam on fp16 / bf16 weights loses small updates); frozen weights keep
    their precision."""
    for p in net.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()


def resolve_warmup(configured: int | None, method_default: int, iters: int) -> int:
    """The warmup iterations: ``lr_warmup`` as configured, else the method's own, capped at a tenth of
    the run (a 4-iteration node run of SFD, whose own warmup is 10, would never reach its lr)."""
    return configured if configured is not None else min(method_default, iters // 10)


def lr_factor(schedule: str, it: int, iters: int, decay_at: float, warmup: int = 0) -> float:
    """The learning-rate multiplier of iteration ``it`` (from 0): "step" is 1, then 0.1 from ``decay_at``
    of the run; "cosine" is (1 + cos(pi it / iters)) / 2; "constant" is 1; times min(1, (it + 1) /
    ``warmup``) over the first ``warmup`` iterations."""
    ramp = min(1.0, (it + 1) / warmup) if warmup else 1.0
    if schedule == "step":
        return ramp * (1.0 if it < math.ceil(decay_at * iters) else 0.1)
    if schedule == "cosine":
        return ramp * 0.5 * (1 + math.cos(math.pi * min(it, iters) / iters))
    return ramp


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all gradients together (non-finite when any entry is)."""
    norms = [p.grad.norm() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def zero_nonfinite(params: list[torch.Tensor]) -> bool:
    """Zero NaN / inf gradient entries in place; whether there were any."""
    found = False
    for p in params:
        if p.grad is not None:
            bad = ~torch.isfinite(p.grad)
            if bad.any():
                p.grad[bad] = 0
                found = True
    return found

