"""The memory a training run will take, estimated before it starts, so a run that cannot fit is refused with a
concrete way to make it fit instead of failing part way.

    peak = W_frozen + W_trained + m * a * f

* W_frozen: the bytes of every frozen parameter and buffer (the teacher; a LoRA student's base is the same
  tensors, counted once), in the precision they are held; of a sharded teacher (``shard_teacher``), this
  process's shards (the one block whose weights are gathered while it runs is left out).
* W_trained: per trainable parameter, float32 weight + gradient (8 bytes) and the optimizer's state (Adam's two
  moments: 8 bytes in float32, 2 in 8-bit Adam), plus an EMA copy (4 bytes) for a group that keeps one.
* a: the activation bytes one sample's training forward keeps for the backward pass, counted on the run's own
  network at the run's sample shape (``activation_bytes``: every tensor autograd saves, each storage once,
  the weights excepted), under the run's autocast; m: the micro-batch (``batch / grad_accum``). A method
  back-propagates one network's graph at a time, so the largest network's ``a`` counts.
* f: what the backward pass and the allocator add to the saved activations, and what gradient checkpointing
  takes off them: measured per architecture family and precision (``FACTORS``) by ``bench/gpu_scale.py`` on
  CUDA and ``tests/test_memory_plan.py`` on CPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from distill_core.denoisers.base import move_cond
from distill_core.nets.unet import UNet

MIB = 2**20
GIB = 2**30
#: float32 weight + gradient, per trainable parameter
TRAINED_BYTES = 8
#: the optimizer's state per trainable parameter: Adam's two moments in float32, or in 8 bits
OPTIMIZER_STATE_BYTES = {"adam": 8, "adamw": 8, "adam8bit": 2}
EMA_BYTES = 4
#: f of ``peak``, by (architecture family, on CUDA, gradient checkpointing), each measured on one configuration
#: (``bench/gpu_scale.py`` rows on an H200, bf16 autocast; ``tests/test_memory_plan.py`` on the CPU); where a
#: family is unmeasured, ``DEFAULT_FACTORS`` by gradient checkpointing (the largest measured, rounded up)
FACTORS: dict[tuple[str, bool, bool], float] = {
    ("builtin", False, False): 0.95,  # SFD, full student, batch 32
    ("builtin", False, True): 0.38,  # SFD, full student, batch 64
    ("sd", True, False): 1.10,  # SD 1.5, SFD-LoRA, 512 px, batch 4
    ("sdxl", True, True): 0.53,  # SDXL, SFD-LoRA, 1024 px, batch 1
}
DEFAULT_FACTORS = {False: 1.2, True: 0.6}


@dataclass(frozen=True)
class MemoryPlan:
    """An estimate of a run's peak memory, in bytes, and the parts it is made of."""

    frozen: int
    trained_params: int
    ema_params: int
    activations_per_sample: int
    micro_batch: int
    factor: float
    family: str
    state_bytes: int = OPTIMIZER_STATE_BYTES["adam"]  # per trainable parameter
    frozen_values: int = 0  # the values of ``frozen`` (0: not counted)

    @property
    def activations(self) -> int:
        return int(self.micro_batch * self.activations_per_sample * self.factor)

    @property
    def trained(self) -> int:
        return self.trained_params * (TRAINED_BYTES + self.state_bytes) + self.ema_params * EMA_BYTES

    @property
    def resident(self) -> int:
        """What is on the device before training starts: the frozen and the trained weights."""
        return self.frozen + self.trained_params * 4

    @property
    def peak(self) -> int:
        return self.frozen + self.trained + self.activations

    def summary(self) -> dict[str, int]:
        """The plan's parts in bytes, for a report."""
        return {"peak_bytes": self.peak, "frozen_bytes": self.frozen, "trained_bytes": self.trained,
                "activation_bytes": self.activations, "micro_batch": self.micro_batch}

    def describe(self) -> str:
        return (f"about {self.peak / GIB:.1f} GiB: frozen weights {self.frozen / GIB:.2f}, trained weights with "
                f"gradients and optimizer state {self.trained / GIB:.2f}, activations {self.activations / GIB:.2f} "
                f"({self.micro_batch} per micro-batch)")


class DoesNotFit(RuntimeError):
    """The plan's peak exceeds the device's memory; the message says what to change."""


def activation_bytes(net: nn.Module, x: torch.Tensor, sigma: float, cond, autocast: torch.dtype | None,
                     **inputs) -> int:
    """Bytes autograd saves for the backward pass in one training forward ``net(x, sigma, cond, **inputs)``:
    each saved tensor's storage once, leaving out parameters and buffers (counted as weights), as each module
    holds them when it runs (a sharded teacher's, gathered for its forward, included)."""
    def storages(tensors) -> set[int]:
        return {t.untyped_storage().data_ptr() for t in tensors if not isinstance(t, DTensor)}

    static = storages((*net.parameters(), *net.buffers()))
    hooks = [m.register_forward_pre_hook(lambda m, args: static.update(storages((*m.parameters(False),
                                                                                  *m.buffers(False)))))
             for m in net.modules()]
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in static:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    context = torch.autocast(x.device.type, dtype=autocast) if autocast is not None else torch.autocast(
        x.device.type, enabled=False)
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), context:
            net(x, sigma, cond, **inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return sum(saved.values())


def scalar_inputs(net: nn.Module) -> dict:
    """The step count and guidance scale a student conditioned on them needs for a forward pass."""
    return {**({"nfe": 1} if getattr(net, "step_embed", None) is not None else {}),
            **({"w": 1.0} if getattr(net, "w_embed", None) is not None else {})}


def weight_counts(nets: list[nn.Module], ema_groups: set[int]) -> tuple[int, int, int, int]:
    """(W_frozen in bytes, its values, trainable parameters, parameters with an EMA copy) of the networks;
    ``ema_groups``: indices into ``nets`` of those that keep an EMA. A tensor shared by several networks counts
    once; a sharded one (``shard_teacher``) counts its local shard, what this process holds."""
    seen: set[int] = set()
    frozen = values = trained = ema = 0
    for i, net in enumerate(nets):
        for t in (*net.parameters(), *net.buffers()):
            t = t.to_local() if isinstance(t, DTensor) else t
            key = t.untyped_storage().data_ptr()
            if key in seen:
                continue
            seen.add(key)
            if isinstance(t, nn.Parameter) and t.requires_grad:
                trained += t.numel()
                ema += t.numel() if i in ema_groups else 0
            else:
                frozen += t.untyped_storage().nbytes()
                values += t.untyped_storage().nbytes() // t.element_size()
    return frozen, values, trained, ema


def family(net: nn.Module) -> str:
    """The architecture family of a network, for ``FACTORS``: the built-in UNet, Stable Diffusion 1.x/2.x and
    XL UNets (diffusers' or ComfyUI's, whose XL UNet takes the pooled embedding through ``label_emb``),
    Flux-style and SD3-style transformers, or the network's class name."""
    for m in net.modules():
        if isinstance(m, UNet):
            return "builtin"
        name = type(m).__name__
        config = getattr(m, "config", None)
        if name == "UNet2DConditionModel":
            return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd"
        if name == "UNetModel":  # ComfyUI's
            return "sdxl" if getattr(m, "label_emb", None) is not None else "sd"
        if name in ("FluxTransformer2DModel", "Flux"):
            return "flux"
        if name in ("SD3Transformer2DModel", "MMDiT"):
            return "sd3"
    return type(net).__name__


def plan_run(method, micro_batch: int, ema: set[str], autocast: torch.dtype | None,
             checkpointing: bool, optimizer: str = "adam") -> MemoryPlan:
    """The plan of a run of ``method`` (its networks built and on their device, gradient checkpointing not yet
    switched on) at ``micro_batch`` samples per micro-batch; ``ema``: the groups that keep an EMA of their
    weights; ``optimizer``: the optimizer of the trained networks. The activations are probed on the exported
    network (the others a method trains are the same architecture)."""
    names = list(method.nets)
    nets = [method.nets[n] for n in names]
    frozen, values, trained, with_ema = weight_counts([*nets, method.source.denoiser],
                                                      {i for i, n in enumerate(names) if n in ema})
    per_sample = sample_activation_bytes(method.nets[method.exported], method.source, autocast)
    arch = family(method.source.denoiser)
    device = next(method.nets[method.exported].parameters()).device
    factor = FACTORS.get((arch, device.type == "cuda", checkpointing), DEFAULT_FACTORS[checkpointing])
    return MemoryPlan(frozen, trained, with_ema, per_sample, micro_batch, factor, arch,
                      OPTIMIZER_STATE_BYTES[optimizer], values)


def sample_activation_bytes(net: nn.Module, source, autocast: torch.dtype | None) -> int:
    """``a``: one sample's activation bytes at the source's sample shape. A large sample is probed at a half
    and a quarter of its side (a clip with all its frames) and extrapolated linearly in the pixel count (exact
    where activations grow linearly with the pixels, as in convolutions, and attention through fused kernels,
    plus a constant part, such as text tokens), so the probe itself stays small on a small GPU; a network that
    refuses those sizes is probed at its own."""
    device = next(net.parameters()).device
    gen = torch.Generator().manual_seed(0)
    cond = move_cond(source.draw_cond(1, gen), device)
    channels, *frames, height, width = source.shape

    def probe(scale: int) -> tuple[int, int]:
        side = (height // scale, width // scale)
        x = torch.randn((1, channels, *frames, *side), generator=gen).to(device)
        inputs = laid_out_as(cond, (height, width), side)
        return side[0] * side[1], activation_bytes(net, x, 1.0, inputs, autocast, **scalar_inputs(net))

    if min(height, width) < 64 or height % 32 or width % 32:
        return probe(1)[1]
    try:
        (p2, a2), (p4, a4) = probe(2), probe(4)
    except Exception:  # noqa: BLE001 - a network that refuses smaller sizes (PixArt's position table): its own
        return probe(1)[1]
    return int(a2 + (a2 - a4) * (height * width - p2) / (p2 - p4))


def laid_out_as(cond, sides: tuple[int, int], smaller: tuple[int, int]):
    """``cond`` for a probe at ``smaller`` sides: the inputs laid out as the sample (an image-to-video model's start
    frames, a start latent and its mask), whose last two axes are the sample's ``sides``, cut to ``smaller``; the
    probe counts bytes, which do not depend on the values."""
    if isinstance(cond, dict):
        return {k: laid_out_as(v, sides, smaller) for k, v in cond.items()}
    if isinstance(cond, torch.Tensor) and cond.ndim >= 4 and tuple(cond.shape[-2:]) == sides:
        return cond[..., :smaller[0], :smaller[1]]
    return cond


def fitting_micro_batches(plan: MemoryPlan, available: int, batch: int) -> int:
    """The fewest micro-batches (a divisor of ``batch``) whose plan fits in ``available`` bytes; ``batch`` when
    none does (``check_fits`` then refuses with what to change)."""
    return next((k for k in range(1, batch + 1) if batch % k == 0 and
                 dataclasses.replace(plan, micro_batch=batch // k).peak <= available), batch)


def check_fits(plan: MemoryPlan, available: int, batch: int, grad_accum: int, checkpointing: bool,
               lora: bool, host: bool = False, clips: bool = False) -> None:
    """Refuse (``DoesNotFit``) a plan whose peak exceeds ``available`` bytes, naming changes that fit; for a
    host's model (``host``: a ComfyUI MODEL, whose loader chose its precision), the loader's lower precision in
    place of the engine's cast of the frozen weights; for a run on video clips (``clips``), shorter ones. Where
    the weights alone exceed ``available``, only changes to the weights can help; where none is left, the
    refusal says so."""
    if plan.peak <= available:
        return
    room = available - plan.frozen - plan.trained
    fixes = []
    per_sample = plan.activations_per_sample * plan.factor
    if room > per_sample:
        fitting = max(1, int(room // per_sample))
        accum = next((k for k in range(grad_accum, batch + 1) if batch % k == 0 and batch // k <= fitting), None)
        if accum is not None:
            fixes.append(f"grad_accum {accum} (micro-batches of {batch // accum})")
        fixes.append(f"batch {fitting}")
    if not checkpointing and room > 0:
        fixes.append("grad_checkpointing on")
    if not lora:
        fixes.append("student lora")
        if plan.state_bytes > OPTIMIZER_STATE_BYTES["adam8bit"]:
            fixes.append("optimizer adam8bit")
    # narrower frozen weights and their bytes per value, each offered where most values are wider
    narrowing = [("the loader's weight_dtype fp8_e4m3fn", 1)] if host else \
        [("frozen_precision bf16", 2), *([("frozen_precision fp8", 1)] if lora else [])]
    if plan.frozen > room and plan.frozen > plan.trained:
        fixes += [fix for fix, size in narrowing if plan.frozen > 1.5 * size * plan.frozen_values]
    if room > 0:
        fixes.append("a lower resolution" + (" or a shorter length (fewer frames per clip)" if clips else ""))
    need = f"this run needs {plan.describe()}, and the device has {available / GIB:.1f} GiB free"
    if not fixes:
        raise DoesNotFit(f"{need}: its weights alone take {(plan.frozen + plan.trained) / GIB:.1f} GiB, and no "
                         "setting of the run makes them smaller; it needs a device with more memory")
    raise DoesNotFit(f"{need}; try {', or '.join(fixes)}")
