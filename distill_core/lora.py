"""LoRA students: low-rank adapters on a frozen network (Hu et al. 2022, "LoRA").

For a layer with weight W (a Linear, or a Conv2d with kernel k), the adapted layer computes

    y = W x + b + (alpha / r) * B (A x)

with A = ``lora_down`` (a Linear in -> r, or a Conv2d in -> r with W's kernel, stride and padding)
and B = ``lora_up`` (r -> out, a 1x1 conv for convolutions). B starts at zero, so the student
starts as the teacher. Adapters enter through forward hooks: the network's modules, parameter
names and weights stay untouched, so the same network is the teacher with the adapters switched
off (one copy of the base weights in memory) and a shared model (ComfyUI's MODEL) is never
modified; ``detach`` removes the hooks.

Files use the key format ComfyUI's stock LoRA loader applies, relative to a root module:
``<path>.lora_down.weight``, ``<path>.lora_up.weight``, ``<path>.alpha``, which merges as
W <- W + (alpha / r) * (B.flatten(1) @ A.flatten(1)).reshape(W.shape). For a ComfyUI model the root
is its BaseModel, so paths start with ``diffusion_model.``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class LoRA(nn.Module):
    """The low-rank update (alpha / r) B A of one Linear or Conv2d layer."""

    def __init__(self, layer: nn.Module, rank: int, alpha: float):
        super().__init__()
        if isinstance(layer, nn.Linear):
            self.lora_down = nn.Linear(layer.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, layer.out_features, bias=False)
        elif isinstance(layer, nn.Conv2d):
            if layer.groups != 1:
                raise ValueError("LoRA on grouped convolutions is not supported")
            self.lora_down = nn.Conv2d(
                layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, layer.dilation, bias=False
            )
            self.lora_up = nn.Conv2d(rank, layer.out_channels, 1, bias=False)
        else:
            raise TypeError(f"LoRA adapts Linear and Conv2d layers, not {type(layer).__name__}")
        # trained in float32 whatever the frozen base's precision (fp16, bf16, fp8): Adam on half-precision
        # weights loses the small updates; the input is cast up and the update back to the layer's dtype
        self.to(device=layer.weight.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=5**0.5)
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.rank = rank
        self.enabled = True

    def hook(self, layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on the adapted layer: adds the update to its output while enabled. A bound
        method, so a deep copy of network and adapters hooks the copied adapter into the copied layer."""
        return output + self(args[0]).to(output.dtype) if self.enabled else output

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_down.weight.dtype)
        return self.lora_up(self.lora_down(x)) * self.scale


def target_layers(root: nn.Module, under: str = "") -> list[str]:
    """Paths (relative to ``root``) of every Linear and Conv2d below the submodule ``under``."""
    base = root.get_submodule(under) if under else root
    prefix = f"{under}." if under else ""
    return [
        prefix + name
        for name, m in base.named_modules()
        if isinstance(m, nn.Linear | nn.Conv2d) and getattr(m, "groups", 1) == 1
    ]


class LoRAAdapters(nn.Module):
    """Adapters for layers of ``root`` (paths relative to it); hooked into ``root`` at construction."""

    def __init__(self, root: nn.Module, paths: list[str], rank: int = 16, alpha: float | None = None):
        super().__init__()
        if not paths:
            raise ValueError("no layers to adapt: the network has no Linear or Conv2d layers")
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.paths = list(paths)
        self.rank, self.alpha = rank, float(rank if alpha is None else alpha)
        self.adapters = nn.ModuleList(LoRA(root.get_submodule(p), rank, self.alpha) for p in self.paths)
        # plain references (not submodules): a deep copy of root and adapters keeps them paired
        self._layers = [root.get_submodule(p) for p in self.paths]
        for layer, a in zip(self._layers, self.adapters):
            layer.register_forward_hook(a.hook)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The bare network (the teacher) inside the block."""
        previous = [a.enabled for a in self.adapters]
        for a in self.adapters:
            a.enabled = False
        try:
            yield
        finally:
            for a, was in zip(self.adapters, previous):
                a.enabled = was

    def detach(self) -> None:
        """Remove the hooks: the network computes what it did before the adapters were attached."""
        for layer, a in zip(self._layers, self.adapters):
            for key, fn in list(layer._forward_hooks.items()):
                if getattr(fn, "__self__", None) is a:
                    del layer._forward_hooks[key]

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The adapters in the stock loader's key format (see the module docstring)."""
        out = {}
        for path, a in zip(self.paths, self.adapters):
            out[f"{path}.lora_down.weight"] = a.lora_down.weight.detach()
            out[f"{path}.lora_up.weight"] = a.lora_up.weight.detach()
            out[f"{path}.alpha"] = a.alpha.detach()
        return out

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.file_tensors()) - set(tensors))
        if missing:
            raise ValueError(f"the LoRA file lacks {len(missing)} adapter tensors, e.g. {missing[:3]}")
        with torch.no_grad():
            for path, a in zip(self.paths, self.adapters):
                a.lora_down.weight.copy_(tensors[f"{path}.lora_down.weight"])
                a.lora_up.weight.copy_(tensors[f"{path}.lora_up.weight"])
                a.alpha.copy_(tensors[f"{path}.alpha"])


@torch.no_grad()
def merge(root: nn.Module, tensors: dict[str, torch.Tensor], strength: float = 1.0) -> int:
    """Add LoRA file ``tensors`` into ``root``'s weights in place, as a stock loader does; returns the
    number of layers changed."""
    downs = [k[: -len(".lora_down.weight")] for k in tensors if k.endswith(".lora_down.weight")]
    for path in downs:
        up, down = tensors[f"{path}.lora_up.weight"], tensors[f"{path}.lora_down.weight"]
        alpha = float(tensors.get(f"{path}.alpha", torch.tensor(float(down.shape[0]))))
        weight = root.get_submodule(path).weight
        delta = (up.flatten(1).float() @ down.flatten(1).float()).reshape(weight.shape)
        weight.add_(delta.to(weight.dtype) * (strength * alpha / down.shape[0]))
    return len(downs)
