"""Network surgery shared by methods that train a network other than a plain copy of the teacher: a
lighter student of the built-in UNet family initialised by weight selection (Xu et al. 2024, "Initializing
models with larger ones"), gradient checkpointing, and spectral-norm clipping."""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.utils.checkpoint
from torch import nn

from distill_core.lora import LoRA
from distill_core.nets.unet import Level, UNet


def select_weights(student: nn.Module, teacher: nn.Module) -> int:
    """Weight selection: copy the leading slice of every same-named teacher tensor that is at least as
    large in every dimension; returns how many tensors were copied."""
    theirs, copied = teacher.state_dict(), 0
    with torch.no_grad():
        for name, t in student.state_dict().items():
            src = theirs.get(name)
            if src is not None and src.ndim == t.ndim and all(a >= b for a, b in zip(src.shape, t.shape)):
                t.copy_(src[tuple(slice(0, n) for n in t.shape)])
                copied += 1
    return copied


def checkpoint_call(owner: nn.Module, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` (the forward of ``owner``) under torch's non-reentrant gradient checkpointing,
    recomputed in the backward pass with the LoRA adapters hooked inside ``owner`` switched as they were in the
    forward pass: a method that trains several adapter sets on one base switches the others off for each
    network's forward, and the backward pass runs after that switch is undone."""
    adapters = [hook.__self__ for m in owner.modules() for hook in m._forward_hooks.values()
                if isinstance(getattr(hook, "__self__", None), LoRA)]
    state = [a.enabled for a in adapters]

    @contextlib.contextmanager
    def as_in_forward():
        previous = [a.enabled for a in adapters]
        for a, enabled in zip(adapters, state):
            a.enabled = enabled
        try:
            yield
        finally:
            for a, enabled in zip(adapters, previous):
                a.enabled = enabled

    return torch.utils.checkpoint.checkpoint(
        fn, *args, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), as_in_forward()), **kwargs
    )


class Checkpointed:
    """Put before a block's class (``enable_checkpointing``): the block's forward recomputed in the backward pass
    while gradients are on, and its plain forward otherwise (the teacher's targets and a host's own sampling of
    a network a LoRA student shares)."""

    def forward(self, *args, **kwargs):
        forward = super().forward
        return checkpoint_call(self, forward, *args, **kwargs) if torch.is_grad_enabled() else forward(*args, **kwargs)


#: the checkpointed class made for each block class (one per class, so that instances of a class share it)
_CHECKPOINTED: dict[type, type] = {}


def enable_checkpointing(denoiser: nn.Module) -> None:
    """Gradient checkpointing (``checkpoint_call`` in every case): per level for the built-in UNet; per block
    through diffusers' own switch; for a host's network (a ComfyUI model's ``diffusion_model``), per block
    (``host_blocks``: a DiT's transformer blocks, a UNet's layers). A level or a host's block gains
    ``Checkpointed`` before its class until ``disable_checkpointing``."""
    blocks = [m for m in denoiser.modules() if type(m) is Level]
    switch = next((m.enable_gradient_checkpointing for m in denoiser.modules()
                   if hasattr(m, "enable_gradient_checkpointing")), None)
    if not blocks and switch is not None:
        switch(lambda module, *args: checkpoint_call(module, module.__call__, *args))
        return
    blocks = blocks or [block for name, m in denoiser.named_modules() if name.split(".")[-1] == "diffusion_model"
                        for block in host_blocks(m)]
    if not blocks:
        raise ValueError(f"no gradient checkpointing for a {type(denoiser).__name__}")
    for block in blocks:
        cls = type(block)
        if not issubclass(cls, Checkpointed):
            block.__class__ = _CHECKPOINTED.setdefault(cls, type(f"Checkpointed{cls.__name__}", (Checkpointed, cls),
                                                                  {}))


def host_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of a host's network to checkpoint: the items of its block lists, and of a ComfyUI UNet's
    sequential blocks (input, middle and output), which it runs layer by layer, the layers that hold weights."""
    blocks = []
    for child in model.children():
        items = list(child) if isinstance(child, nn.ModuleList) else [child] if isinstance(child, nn.Sequential) \
            else []
        for item in items:
            layers = list(item.children()) if isinstance(item, nn.Sequential) else [item]
            blocks += [layer for layer in layers if any(True for _ in layer.parameters())]
    return blocks


def disable_checkpointing(net: nn.Module) -> None:
    """Give the levels and a host's blocks that ``enable_checkpointing`` checkpointed their own classes back."""
    for m in net.modules():
        if isinstance(m, Checkpointed):
            m.__class__ = type(m).__bases__[1]


def lighter_student(denoiser: nn.Module, width: float = 1.0, depth: float = 1.0, init: str = "teacher") -> nn.Module:
    """The student network: the built-in UNet family scaled by ``width`` / ``depth`` (weight selection
    from the teacher, or ``init="scratch"``); any other teacher is copied whole (same architecture)."""
    if init not in ("teacher", "scratch"):
        raise ValueError(f"student_init must be 'teacher' or 'scratch', got {init!r}")
    net = getattr(denoiser, "net", None)
    if not (hasattr(denoiser, "like") and isinstance(net, UNet)):
        if (width, depth) != (1.0, 1.0):
            raise ValueError("width / depth multipliers apply to the built-in UNet family only")
        return copy.deepcopy(denoiser).requires_grad_(True)
    student = denoiser.like(UNet(net.cfg.scaled(width, depth)))
    if init == "teacher":
        select_weights(student, denoiser)
    return student.requires_grad_(True)


@torch.no_grad()
def clip_spectral_norms(module: nn.Module, bound: float, vectors: dict[str, torch.Tensor]) -> None:
    """W <- W / max(1, sigma_1(W) / bound) for every conv / linear weight (as a matrix out x rest), sigma_1
    by one power iteration per call with the vector kept in ``vectors`` (Miyato et al. 2018's estimate;
    applied as a projection, Gouk et al. 2021, so the file format does not change)."""
    for name, m in module.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight.flatten(1)
            u = vectors.get(name)
            if u is None:
                u = torch.nn.functional.normalize(torch.ones(w.shape[0], device=w.device, dtype=w.dtype), dim=0)
            v = torch.nn.functional.normalize(w.T @ u, dim=0)
            u = torch.nn.functional.normalize(w @ v, dim=0)
            vectors[name] = u
            s = float(u @ w @ v)
            if s > bound:
                m.weight.mul_(bound / s)
