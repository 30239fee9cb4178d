"""The frozen teacher sharded over the processes of a multi-process run (``shard_teacher``).

A teacher that does not fit one GPU fits N of them in shards: each of the N processes keeps 1/N of every
frozen weight, and a block's full weights exist only while the block runs, gathered from all processes
(fully sharded data parallelism, FSDP; PyTorch's ``fully_shard``, applied to every block of the teacher's
outermost module lists and then to the teacher as a whole). Gathering is exact, so a sharded run computes
what an unsharded one computes. What the processes still hold in full: the trained networks (a LoRA
student's adapters, which DDP keeps equal), each process's micro-batch of activations, and one block's
weights at a time.

Every forward pass of a sharded teacher is a collective: all processes run it together. Training does
(every process solves its teacher targets and trains its micro-batch in lockstep); the trainer's sample
grids are drawn on every process, and the report after training is made by the main process on the
teacher loaded again, unsharded. A LoRA student's base is the teacher itself: DDP, which keeps the trained
networks equal, is told to leave the sharded weights alone.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel


def shard_teacher(teacher: nn.Module, device: torch.device) -> None:
    """Shard ``teacher``'s weights over every process of the run, in place, onto ``device``: each block of its
    outermost ``nn.ModuleList`` s is one unit (its weights gathered for its forward and freed after), the rest
    of the network another."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        raise ValueError("shard_teacher splits the teacher over the processes of a multi-process run (accelerate "
                         "launch --multi_gpu --num_processes N -m distill_core distill ...); this run has one process")
    for p in teacher.parameters():  # FSDP shards contiguous tensors (the built-in UNet keeps channels-last ones)
        p.data = p.data.contiguous()
    mesh = DeviceMesh.from_group(dist.group.WORLD, device.type)
    for block in _blocks(teacher):
        fully_shard(block, mesh=mesh)
    fully_shard(teacher, mesh=mesh)


def refuse_with_shards(cfg) -> None:
    """What a sharded teacher cannot be combined with, refused in one line each: an EMA of the student (kept in
    a copy of its network, and sharded modules cannot be copied) and a teacher cache (a process that reads a
    solve another is still writing would skip the teacher's forward passes the others run)."""
    if cfg.ema is not None:
        raise ValueError("ema keeps the student's average in a copy of its network, which cannot be made of a "
                         "sharded teacher's modules: train without ema, or without shard_teacher")
    if cfg.teacher_cache is not None:
        raise ValueError("shard_teacher runs every teacher forward pass on all processes together, which a teacher "
                         "cache would skip on some: run python -m distill_core precompute first, unsharded, or "
                         "train without teacher_cache")


def _blocks(root: nn.Module) -> list[nn.Module]:
    """The elements (holding weights) of ``root``'s module lists that lie in no other module list."""
    lists: list[str] = []
    for name, module in root.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(f"{outer}.") for outer in lists):
            lists.append(name)
    return [block for name in lists for block in root.get_submodule(name)
            if next(block.parameters(), None) is not None]


def is_sharded(module: nn.Module) -> bool:
    """Whether any of ``module``'s weights is a shard (``shard_teacher``)."""
    return any(isinstance(p, DTensor) for p in module.parameters())


def leave_shards_to_fsdp(net: nn.Module, teacher: nn.Module) -> None:
    """Tell DDP (which the trainer wraps ``net`` in) to leave out the weights ``net`` shares with the sharded
    ``teacher`` (a LoRA student's base): they are frozen, and each process holds its own shard of them."""
    shared = {id(t) for t in (*teacher.parameters(), *teacher.buffers())}
    names = [n for n, t in (*net.named_parameters(), *net.named_buffers()) if id(t) in shared]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(net, names)


def local_weight_count(module: nn.Module) -> int:
    """The weights (parameters) this process holds of ``module``: its shards' where it is sharded."""
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in module.parameters())
