"""Student networks and student files.

A student is its teacher's denoiser made trainable, in one of two kinds:

* ``full``: a copy of the teacher with every weight trained (as in SFD);
* ``lora``: low-rank adapters (``distill_core.lora``) hooked into the teacher's own network, whose
  weights stay frozen; the teacher is the same network with the adapters switched off
  (``AdaptersOff``), so only one copy of the base weights is in memory. Its file holds only the
  adapters, in the key format of ComfyUI's stock LoRA loader.

A method that trains several networks of the teacher's architecture (DMD2: a generator and a fake
score) gets them from ``make_networks``: full copies, or one set of adapters each on the one shared
base ("shared base"), where each network's forward pass switches its siblings' adapters off. A student
of experts (``Experts``, Phased DMD) is several such networks, one per phase of the noise range, chosen
by sigma; its file holds each expert's tensors under ``expert.{k}.`` and its card the phase boundaries.

A conditioned student sees a scalar input besides (x, sigma, c): the step count N (SFD-v, a
step-conditioned student) or the guidance scale w (LCM, a guidance-conditioned student), or both. Each
goes through its own ``ScalarEmbedding``, a sinusoidal embedding through a two-layer MLP whose last
layer starts at zero, so the new student starts as the teacher. The embeddings are summed and added
next to the time embedding, so every block sees them:

* the built-in UNet (``distill_core.nets.unet``): through its ``extra_emb`` argument;
* networks we do not own: through a forward hook on their time-embedding module, found by name
  (``time_embedding`` in diffusers' ``UNet2DModel`` / ``UNet2DConditionModel``, ``time_embed`` in the
  openaimodel UNets of ComfyUI / LDM, ``time_text_embed`` in diffusers' SD3, Flux and Qwen-Image transformers,
  whose timestep embedding carries the pooled text embedding, ``time_embedder`` in diffusers' Wan
  transformer). Other architectures are refused with a clear error.

Student files (the card, saving and loading) are ``distill_core.student_files``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from distill_core.config import STUDENT_KINDS
from distill_core.denoisers.base import Cond, index_cond
from distill_core.lora import LoRAAdapters, target_layers
from distill_core.nets.unet import sinusoidal_embedding
from distill_core.teacher import CFGTeacher

STEP_EMBEDDING_DIM = 64


class ScalarInput(NamedTuple):
    """A scalar input a student may be conditioned on: the ``StudentNet`` attribute holding its embedding (also
    the prefix of its tensors in files and checkpoints), the card entry that says where it enters, and what a
    student conditioned on it asks for when it is missing."""

    attr: str
    card: str
    missing: str


#: the scalar inputs, by their keyword in ``StudentNet.forward``
SCALAR_INPUTS = {
    "nfe": ScalarInput("step_embed", "step_embedding", "a step-conditioned (SFD-v) student needs the step count nfe"),
    "w": ScalarInput("w_embed", "w_embedding", "a guidance-conditioned (LCM) student needs the guidance scale w"),
}
#: prefixes of a full student file's tensors that are not its network's weights
NOT_NETWORK = (*(f"{i.attr}." for i in SCALAR_INPUTS.values()), "afs.")
AFS_MEANS_KEY = "afs.class_means"
EXPERT_PREFIX = "expert.{}."  # an Experts student's tensors of expert k, in its file
TIME_EMBEDDING_NAMES = ("time_embedding", "time_embed", "time_text_embed", "time_embedder",  # UNets; DiTs; Wan
                        "time_step_proj", "t_embedder", "time_guidance_embed",  # AuraFlow; Z-Image; Flux.2
                        "time_condition_embed")  # CogView4
#: the attributes through which adapters hold the network they wrap
WRAPPED = ("inner", "net", "unet", "transformer")


def lora_target(denoiser: nn.Module) -> tuple[nn.Module, str]:
    """(root, submodule) of a denoiser's network for LoRA: file keys are paths relative to root.
    Adapters declare ``lora_target`` (a ComfyUI model: its BaseModel and "diffusion_model");
    otherwise the denoiser itself and its whole network."""
    return getattr(denoiser, "lora_target", (denoiser, ""))


class ScalarEmbedding(nn.Module):
    """e(v) = W2 SiLU(W1 sin/cos(v)) of a scalar input v (the step count N, the guidance scale w), with
    W2 = 0 at initialisation (the student starts as the teacher)."""

    def __init__(self, out_dim: int, dim: int = STEP_EMBEDDING_DIM):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(value.float(), self.dim, max_period=100.0))


class PartlySaved(nn.Module):
    """A trained network whose checkpoints hold only what it trains (``saved_state``: a LoRA student's
    adapters, not the frozen base it shares with the teacher)."""

    def saved_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError


class StudentNet(PartlySaved):
    """The trainable student: ``forward(x, sigma, cond, nfe=None, w=None) -> x0``, a denoiser like its teacher
    (``nfe``: the step count of a step-conditioned student; ``w``: the guidance scale of a guidance-conditioned
    one, a number or one per sample)."""

    def __init__(self, denoiser: nn.Module, step_conditioned: bool = False, lora: dict | None = None,
                 w_conditioned: bool = False):
        super().__init__()
        if not isinstance(denoiser, nn.Module):
            raise TypeError(
                "a student is a trainable copy of its teacher: the denoiser must be a torch.nn.Module"
            )
        self.denoiser = denoiser
        self.sigma_min, self.sigma_max = denoiser.sigma_min, denoiser.sigma_max
        self.lora = None
        #: adapters of other networks on the same base (``make_networks``), off during this one's forward
        self.siblings: list[LoRAAdapters] = []
        if lora is not None:
            denoiser.requires_grad_(False)
            root, under = lora_target(denoiser)
            self.lora = LoRAAdapters(root, target_layers(root, under), lora["rank"], lora.get("alpha"))
        self.injection = None
        self.step_embed = self.w_embed = None
        if step_conditioned or w_conditioned:
            self.injection, out_dim = _injection_point(denoiser)
            self.step_embed = ScalarEmbedding(out_dim) if step_conditioned else None
            self.w_embed = ScalarEmbedding(out_dim) if w_conditioned else None
            if self.injection != "extra_emb":
                self._pending: torch.Tensor | None = None
                denoiser.get_submodule(self.injection).register_forward_hook(self._add_embedding)

    def train(self, mode: bool = True) -> StudentNet:
        """Train or eval mode for what is trained; a LoRA student's frozen base is the teacher's own network
        and stays in eval mode (its dropout or norm statistics would otherwise change the teacher's targets)."""
        if self.lora is None:
            return super().train(mode)
        self.training = mode
        for module in (self.lora, self.step_embed, self.w_embed):
            if module is not None:
                module.train(mode)
        return self

    def saved_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: every weight of a full student; adapters and embeddings of a LoRA
        student (the frozen base is the teacher's)."""
        state = self.state_dict()
        if self.lora is None:
            return state
        prefixes = ("lora.", *(f"{i.attr}." for i in SCALAR_INPUTS.values()))
        return {k: v for k, v in state.items() if k.startswith(prefixes)}

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state, strict=self.lora is None)

    def _add_embedding(self, module, args, output):
        """The time embedding's output plus the pending step or guidance embedding; an embedding that returns
        (modulation, embedding), as SANA's ``AdaLayerNormSingle``, gets it on the modulation, which its last
        layer makes."""
        if self._pending is None:
            return output
        if isinstance(output, tuple):
            return (output[0] + self._pending.to(output[0].dtype), *output[1:])
        return output + self._pending.to(output.dtype)

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond = None, nfe: int | None = None,
        w: torch.Tensor | float | None = None,
    ):
        with disabled(self.siblings):
            return self._forward(x, sigma, cond, nfe, w)

    def embedding(self, batch: int, device: torch.device, nfe: int | None = None,
                  w: torch.Tensor | float | None = None) -> torch.Tensor | None:
        """The sum of the embeddings of the scalar inputs this student is conditioned on, one per sample (None:
        it is conditioned on none)."""
        total = None
        for scalar, value in zip(SCALAR_INPUTS.values(), (nfe, w), strict=True):
            embed = getattr(self, scalar.attr)
            if embed is None:
                continue
            if value is None:
                raise ValueError(scalar.missing)
            e = embed(torch.as_tensor(value, dtype=torch.float32, device=device).expand(batch))
            total = e if total is None else total + e
        return total

    def _forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond, nfe: int | None,
                 w: torch.Tensor | float | None):
        emb = self.embedding(x.shape[0], x.device, nfe, w)
        if emb is None:
            return self.denoiser(x, sigma, cond)
        if self.injection == "extra_emb":
            return self.denoiser(x, sigma, cond, extra_emb=emb)
        self._pending = emb
        try:
            return self.denoiser(x, sigma, cond)
        finally:
            self._pending = None


def _injection_point(denoiser: nn.Module) -> tuple[str, int]:
    """Where the embeddings of scalar inputs enter: ("extra_emb", dim) for the built-in UNet, else the name of a
    time-embedding module (and its output width) to hook."""
    net = getattr(denoiser, "net", None)
    if (
        net is not None
        and "extra_emb" in inspect.signature(net.forward).parameters
        and hasattr(net, "emb_dim")
    ):
        return "extra_emb", net.emb_dim
    found = {name: [m for m in module.modules() if isinstance(m, nn.Linear)]
             for name, module in denoiser.named_modules() if name.split(".")[-1] in TIME_EMBEDDING_NAMES}
    found = {name: linears for name, linears in found.items() if linears}
    if len(found) > 1:  # experts (Wan 2.2 A14B), each with its own time embedding
        raise ValueError(f"this teacher has {len(found)} networks with their own time embeddings (experts): a step "
                         "count or guidance scale input would reach only one; distil with method sfd")
    for name, linears in found.items():
        return name, linears[-1].out_features
    inner = denoiser
    while any(hasattr(inner, a) for a in WRAPPED):  # name the network, not the adapters around it
        inner = next(getattr(inner, a) for a in WRAPPED if hasattr(inner, a))
    raise ValueError(
        f"cannot condition a {type(inner).__name__} on a step count or a guidance scale: supported are the "
        f"built-in UNet (extra_emb) and networks with a time-embedding module named one of {TIME_EMBEDDING_NAMES}"
    )


class AdaptersOff:
    """The teacher of LoRA students: the shared network with every set of adapters switched off."""

    def __init__(self, denoiser: nn.Module, adapters: list[LoRAAdapters]):
        self.denoiser, self.adapters = denoiser, list(adapters)
        self.sigma_min, self.sigma_max = denoiser.sigma_min, denoiser.sigma_max

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond = None) -> torch.Tensor:
        with disabled(self.adapters):
            return self.denoiser(x, sigma, cond)


@contextlib.contextmanager
def disabled(adapter_sets: list[LoRAAdapters]) -> Iterator[None]:
    """Every set of ``adapter_sets`` switched off inside the block."""
    with contextlib.ExitStack() as stack:
        for adapters in adapter_sets:
            stack.enter_context(adapters.disabled())
        yield


def make_networks(
    denoiser: nn.Module, names: tuple[str, ...], kind: str = "full", rank: int = 16, alpha: float | None = None,
    step_conditioned: bool = False, w_conditioned: bool = False,
) -> tuple[dict[str, StudentNet], nn.Module | AdaptersOff]:
    """Trainable networks ``names``, each starting as ``denoiser``, and the teacher denoiser to use next to
    them: for ``full``, a copy of ``denoiser`` each and the original as the teacher; for ``lora``, one set of
    adapters each on ``denoiser`` itself (one copy of the base weights however many networks), each network's
    forward with its siblings' adapters off, and the base with every adapter off as the teacher."""
    if kind not in STUDENT_KINDS:
        raise ValueError(f"student kind must be one of {list(STUDENT_KINDS)}, got {kind!r}")
    if kind == "full":
        nets = {n: StudentNet(copy.deepcopy(denoiser).requires_grad_(True), step_conditioned,
                              w_conditioned=w_conditioned) for n in names}
        return nets, denoiser
    nets = {n: StudentNet(denoiser, step_conditioned, {"rank": rank, "alpha": alpha}, w_conditioned)
            for n in names}
    for name, net in nets.items():
        net.siblings = [other.lora for other_name, other in nets.items() if other_name != name]
    return nets, AdaptersOff(denoiser, [net.lora for net in nets.values()])


def make_student(
    denoiser: nn.Module, step_conditioned: bool = False, kind: str = "full", rank: int = 16,
    alpha: float | None = None, w_conditioned: bool = False,
) -> tuple[StudentNet, nn.Module | AdaptersOff]:
    """A trainable student of ``denoiser`` and the teacher denoiser to use next to it (``make_networks``
    of one network)."""
    nets, teacher = make_networks(denoiser, ("student",), kind, rank, alpha, step_conditioned, w_conditioned)
    return nets["student"], teacher


class Experts(PartlySaved):
    """A student made of one network per phase of the noise range, a mixture of experts over noise levels
    (Phased DMD): for boundaries s_0 > s_1 > ... > s_K = 0, expert k denoises sigma in (s_{k+1}, s_k]
    (expert 0 also above s_0). ``forward(x, sigma, cond)`` is a denoiser like each expert; a batch of
    several noise levels goes to each sample's own expert."""

    step_embed = w_embed = None  # the experts are not conditioned on scalar inputs (``AtSteps`` asks)

    def __init__(self, experts: list[StudentNet], boundaries: list[float]):
        super().__init__()
        if len(boundaries) != len(experts) + 1 or boundaries[-1] != 0:
            raise ValueError(f"{len(experts)} experts need {len(experts) + 1} boundaries ending at 0, got "
                             f"{list(boundaries)}")
        self.experts = nn.ModuleList(experts)
        self.boundaries = [float(b) for b in boundaries]
        self.sigma_min, self.sigma_max = experts[0].sigma_min, experts[0].sigma_max

    def expert_of(self, sigma: torch.Tensor) -> torch.Tensor:
        """k with s_{k+1} < sigma <= s_k, per element of ``sigma``: how many inner boundaries lie at or above it."""
        inner = torch.tensor(self.boundaries[1:-1], dtype=torch.float64)
        return (sigma.detach().reshape(-1, 1).double().cpu() <= inner).sum(1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond = None, nfe: int | None = None,
                w: float | None = None):
        sigma = torch.as_tensor(sigma, device=x.device)
        index = self.expert_of(sigma)
        if bool((index == index[0]).all()):
            return self.experts[int(index[0])](x, sigma, cond)
        sigma = sigma.expand(x.shape[0])
        rows = {k: torch.nonzero(index == k).squeeze(1).to(x.device) for k in index.unique().tolist()}
        out = torch.cat([self.experts[k](x[r], sigma[r], index_cond(cond, r)) for k, r in rows.items()])
        return out[torch.argsort(torch.cat(list(rows.values())))]

    def saved_state(self) -> dict[str, torch.Tensor]:
        """Every expert's ``saved_state`` under ``{k}.``."""
        return {f"{k}.{name}": v for k, e in enumerate(self.experts) for name, v in e.saved_state().items()}

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        for k, e in enumerate(self.experts):
            e.load_saved_state({name[len(f"{k}."):]: v for name, v in state.items() if name.startswith(f"{k}.")})


class AtSteps:
    """A student seen as a plain denoiser ``(x, sigma, cond) -> x0`` at a fixed step count and guidance scale
    (``nfe`` is ignored by students that are not step-conditioned, ``w`` by those that are not
    guidance-conditioned). ``net`` may be wrapped (DDP) around a StudentNet."""

    def __init__(self, net: nn.Module, nfe: int | None, w: torch.Tensor | float | None = None):
        inner = getattr(net, "module", net)
        self.net, self.nfe = net, nfe if inner.step_embed is not None else None
        self.w = w if inner.w_embed is not None else None
        self.sigma_min, self.sigma_max = inner.sigma_min, inner.sigma_max

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond = None) -> torch.Tensor:
        return self.net(x, sigma, cond, nfe=self.nfe, w=self.w)


@dataclass
class Student:
    """A loaded student, ready to sample (see ``distill_core.sampling.sample``)."""

    net: StudentNet | Experts
    card: dict
    uncond: Cond = None
    afs_means: torch.Tensor | None = None  # the first step's class-mean table (None: SFD's centre 0)

    @property
    def nfe_choices(self) -> list[int]:
        return sorted(int(n) for n in self.card["sigmas"])

    @property
    def afs(self) -> bool:
        return bool(self.card.get("afs", False))

    def sigmas(self, steps: int | None = None) -> torch.Tensor:
        """The stored schedule for ``steps`` evaluations (default: the student's own, or its range's top)."""
        choices = self.nfe_choices
        steps = choices[-1] if steps is None else int(steps)
        if steps not in choices:
            kind = "SFD-v student trained" if len(choices) > 1 else "student distilled"
            raise ValueError(
                f"this {kind} for NFE {_span(choices)} cannot sample with {steps} steps; "
                f"choose one of {choices} (or distil a student for {steps} steps)"
            )
        return torch.tensor(self.card["sigmas"][str(steps)], dtype=torch.float32)

    @property
    def w_conditioned(self) -> bool:
        """Whether w is an input of the network (LCM): it samples at any w of its trained range."""
        return self.card.get(SCALAR_INPUTS["w"].card) is not None

    def guidance_w(self, w: float | None = None) -> float:
        """The guidance scale the student samples at: ``w`` for a "cfg" student or a guidance-conditioned one
        (default: the card's; the latter refuses a w outside the range it was trained on), the distilled w
        otherwise."""
        guidance = self.card["guidance"]
        if w is not None and self.w_conditioned:
            lo, hi = guidance["w_range"]
            if not lo <= w <= hi:
                raise ValueError(f"this student was trained for guidance w in [{lo:g}, {hi:g}]; it cannot sample "
                                 f"at w={w:g}")
            return float(w)
        return float(guidance["w"] if w is None or guidance["mode"] == "distilled" else w)

    def denoiser(self, steps: int | None = None, w: float | None = None):
        """The student as a denoiser at ``steps``; with guidance mode "cfg", wrapped in CFG at ``w``
        (default: the w stored in the card); a guidance-conditioned student gets ``w`` as its input (default:
        the card's). Any other distilled-guidance student takes no w."""
        steps = self.nfe_choices[-1] if steps is None else steps
        if self.w_conditioned:
            return AtSteps(self.net, steps, self.guidance_w(w))
        d = AtSteps(self.net, steps)
        guidance = self.card["guidance"]
        if guidance["mode"] == "cfg":
            return CFGTeacher(d, guidance["w"] if w is None else w, self.uncond)
        if w is not None and w != guidance["w"]:
            raise ValueError(
                f"guidance w={guidance['w']:g} is distilled into this student; it cannot sample at "
                f"w={w:g} (distil with guidance_mode 'cfg' to choose w when sampling)"
            )
        return d


def _span(choices: list[int]) -> str:
    return str(choices[0]) if len(choices) == 1 else f"{choices[0]}..{choices[-1]}"

