"""Student files: safetensors with the engine's JSON card.

The card holds the method, NFE (or NFE range), schedule and its sigmas, AFS and its centre, guidance mode
and w (and the trained range of w, for a guidance-conditioned student), the teacher's fingerprint and the
engine version. A full student's file holds its network's weights under the network's own keys (a ComfyUI
model's ``diffusion_model``: what a stock loader reads); a LoRA student's, its adapters in the key format of
ComfyUI's stock LoRA loader. The embeddings of a conditioned student's scalar inputs are stored under
``step_embed.`` and ``w_embed.``, and the card says where they enter (``step_embedding``, ``w_embedding``).
A student of experts (Phased DMD) holds each expert's tensors under ``expert.{k}.`` and its boundaries in
the card. A student whose analytic first step is centred on its teacher's class means (``distill_core.afs``)
carries their table as the tensor ``afs.class_means``.

``load_student`` checks the fingerprint against the teacher it is given; ``check_card`` and ``check_fits``
refuse an altered or foreign file with one line naming it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

import distill_core
from distill_core import safetensors_io
from distill_core.builtin import fingerprint, from_settings
from distill_core.denoisers.base import Cond
from distill_core.nets.surgery import disable_checkpointing
from distill_core.nets.unet import UNet, UNetConfig
from distill_core.students import (
    AFS_MEANS_KEY,
    EXPERT_PREFIX,
    NOT_NETWORK,
    SCALAR_INPUTS,
    Experts,
    Student,
    StudentNet,
    lora_target,
    make_networks,
)
from distill_core.teacher import CFGTeacher


def student_card(
    method: str,
    sampler: str,
    nfes: list[int],
    sigmas: dict[int, torch.Tensor],
    schedule: dict,
    guidance_mode: str,
    w: float,
    teacher_fingerprint: str,
    **extra,
) -> dict:
    """The metadata every student file carries: the method, the sampler it is sampled with (a key of
    ``sampling.SAMPLERS``), its step counts and their schedules, guidance, and the teacher's fingerprint;
    ``extra``: the method's own entries (SFD: ``afs`` and ``afs_center``)."""
    return {
        "kind": "student",
        "method": method,
        "sampler": sampler,
        **({"nfe": nfes[0]} if len(nfes) == 1 else {"nfe_range": [min(nfes), max(nfes)]}),
        "schedule": schedule,
        "sigmas": {str(n): [float(s) for s in sigmas[n]] for n in nfes},
        "guidance": {"mode": guidance_mode, "w": float(w)},
        "teacher_fingerprint": teacher_fingerprint,
        "engine_version": distill_core.__version__,
        **extra,
    }


def architecture(denoiser: nn.Module) -> dict | None:
    """A card entry that rebuilds a built-in-family student of its own size (phased distillation's
    lighter students): its UNet and its parametrisation (EDM or flow); ``None`` for other networks (a student
    file then has its teacher's architecture)."""
    if not (hasattr(denoiser, "settings") and isinstance(getattr(denoiser, "net", None), UNet)):
        return None
    return {"unet": denoiser.net.cfg.to_dict(), **denoiser.settings()}


def from_architecture(arch: dict) -> nn.Module:
    """The (untrained) network an ``architecture`` card entry describes."""
    arch = dict(arch)
    return from_settings(UNetConfig.from_dict(arch.pop("unet")), arch)


def network_module(denoiser: nn.Module) -> nn.Module:
    """The module whose own keys a full student file uses: the network a stock loader reads (a ComfyUI
    model's ``diffusion_model``), or the denoiser itself."""
    root, under = lora_target(denoiser)
    return root.get_submodule(under) if under else root


def save_student(path: str | Path, net: StudentNet | Experts, card: dict,
                 extra: dict[str, torch.Tensor] | None = None) -> Path:
    """A full student's network weights, or a LoRA student's adapters in the stock loader's key format,
    plus the embeddings of its scalar inputs (``step_embed.*``: SFD-v's step count; ``w_embed.*``: LCM's
    guidance scale) and the method's ``extra`` tensors (``afs.class_means``), with the card as metadata. An
    ``Experts`` student: each expert's tensors under ``expert.{k}.``, and its boundaries in the card
    (``experts``)."""
    first = net.experts[0] if isinstance(net, Experts) else net
    embeddings = {i.card: None if getattr(first, i.attr) is None else
                  {"injection": first.injection, "dim": getattr(first, i.attr).dim} for i in SCALAR_INPUTS.values()}
    card = {
        **card,
        **embeddings,
        "student": student_kind(first),
    }
    if isinstance(net, Experts):
        card["experts"] = {"count": len(net.experts), "boundaries": net.boundaries}
        tensors = {f"{EXPERT_PREFIX.format(k)}{name}": v for k, e in enumerate(net.experts)
                   for name, v in _net_tensors(e).items()}
    else:
        tensors = _net_tensors(net)
    return safetensors_io.save_atomic({**tensors, **(extra or {})}, path, card)


def student_kind(net: StudentNet) -> dict:
    """The card's ``student`` entry for ``net``: a full network, or LoRA adapters with their rank, alpha and
    adapted layers."""
    if net.lora is None:
        return {"kind": "full"}
    return {"kind": "lora", "rank": net.lora.rank, "alpha": net.lora.alpha, "layers": len(net.lora.paths)}


def _net_tensors(net: StudentNet) -> dict[str, torch.Tensor]:
    weights = network_module(net.denoiser).state_dict() if net.lora is None else net.lora.file_tensors()
    embeds = {f"{i.attr}.{k}": v for i in SCALAR_INPUTS.values() if getattr(net, i.attr) is not None
              for k, v in getattr(net, i.attr).state_dict().items()}
    return {**weights, **embeds}


def expert_tensors(tensors: dict[str, torch.Tensor], card: dict) -> list[dict[str, torch.Tensor]]:
    """The tensors of each network of a student file: per expert of an ``Experts`` student (its prefix
    ``expert.{k}.`` removed), else the file's own."""
    count = card.get("experts", {}).get("count", 0)
    if not count:
        return [tensors]
    prefixes = [EXPERT_PREFIX.format(k) for k in range(count)]
    return [{name[len(p):]: v for name, v in tensors.items() if name.startswith(p)} for p in prefixes]


#: the scalar inputs of ``SCALAR_INPUTS`` in words
INPUT_WORDS = {"nfe": "step count", "w": "guidance scale"}
#: what every student card holds, and the type of each entry
CARD_KEYS = {"kind": str, "method": str, "sigmas": dict, "guidance": dict, "teacher_fingerprint": str}


def check_card(path: str | Path, card: dict) -> dict:
    """``card`` if it is a student card with every entry sampling needs; else an error naming the file and
    what is wrong."""
    if card.get("kind") != "student":
        raise ValueError(f"{path} is not a student file (its card says kind={card.get('kind')!r})")
    wrong = [k for k, kind in CARD_KEYS.items() if not isinstance(card.get(k), kind)]
    guidance = card.get("guidance") if isinstance(card.get("guidance"), dict) else {}
    if guidance.get("mode") not in ("distilled", "cfg") or not isinstance(guidance.get("w"), (int, float)):
        wrong.append("guidance (mode, w)")
    sigmas = card.get("sigmas") if isinstance(card.get("sigmas"), dict) else {}
    if not sigmas or not all(k.isdigit() and isinstance(v, list) and len(v) > 1 and
                             all(isinstance(x, (int, float)) for x in v) for k, v in sigmas.items()):
        wrong.append("sigmas (a schedule per step count)")
    if wrong:
        raise ValueError(f"{path}: its student card lacks or garbles {', '.join(sorted(set(wrong)))} (the file was "
                         "altered or cut short; save the student again)")
    return card


def read_student_card(path: str | Path) -> dict:
    """The card of the student file at ``path`` (``check_card``): an error naming the file when it is another
    kind of file (a teacher, a checkpoint) or its card is garbled."""
    return check_card(path, safetensors_io.read_card(path))


def check_fits(path: str | Path, denoiser: nn.Module) -> None:
    """An error naming the file when the student file's weights do not fit ``denoiser``'s network (another
    architecture, a file cut short), checked on shapes alone: nothing is built or copied."""
    card = read_student_card(path)
    tensors, _ = safetensors_io.load(path, mapped=True)  # shapes only: no tensor is read
    if card.get("architecture"):  # a student of its own size: rebuilt from the card, not from the teacher
        return
    root, under = lora_target(denoiser)
    parts = expert_tensors(tensors, card)
    if card.get("student", {}).get("kind") == "lora":
        expected = {}
        for name, layer in root.named_modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                expected[f"{name}.lora_down.weight"] = layer.weight.shape[1]
                expected[f"{name}.lora_up.weight"] = layer.weight.shape[0]
        bad = [k for part in parts for k, v in part.items() if k.endswith(("lora_down.weight", "lora_up.weight"))
               and expected.get(k) != v.shape[1 if k.endswith("down.weight") else 0]]
    else:
        theirs = network_module(denoiser).state_dict()
        bad = []
        for part in parts:
            weights = {k: v for k, v in part.items() if not k.startswith(NOT_NETWORK)}
            bad += sorted(set(theirs) ^ set(weights)) + [k for k in weights if k in theirs and
                                                            weights[k].shape != theirs[k].shape]
    if bad:
        raise ValueError(f"{path}: its weights do not fit this teacher's network ({len(bad)} tensors, e.g. "
                         f"{bad[:3]}); load it with the model it was distilled from")


def check_teacher(path: str | Path, card: dict, denoiser: nn.Module) -> None:
    """Refuse the student file at ``path`` (with ``card``) for a teacher ``denoiser`` it was not distilled from."""
    theirs, ours = card["teacher_fingerprint"], fingerprint(denoiser)
    if theirs != ours:
        raise ValueError(
            f"{path} was distilled from a different teacher (fingerprint {theirs}); the teacher "
            f"given has fingerprint {ours}. Load it with the teacher it was distilled from."
        )


def load_student(path: str | Path, teacher: CFGTeacher | nn.Module, uncond: Cond = None, share: bool = False,
                 any_teacher: bool = False, consume: bool = False) -> Student:
    """Load a student file for ``teacher`` (a CFGTeacher, or its denoiser with ``uncond`` for CFG).
    ``share``: a LoRA student hooks its adapters into the teacher's own network instead of a copy (no
    second copy of the weights; detach them when done, ``release_teacher``, or load it with ``borrowing``).
    ``consume``: the teacher is not used again, so a full student's weights load into the teacher's own
    network too (which then is the student's; a LoRA's adapters stay hooked in). A file of experts
    (``experts`` in its card) loads as ``Experts``. ``any_teacher``: put the student on a network of the same
    architecture that it was not distilled from (a generic few-step LoRA on a fine-tune)."""
    card = read_student_card(path)
    denoiser = teacher.denoiser if isinstance(teacher, CFGTeacher) else teacher
    if uncond is None and isinstance(teacher, CFGTeacher):
        uncond = teacher.uncond
    if not any_teacher:
        check_teacher(path, card, denoiser)
    tensors, _ = safetensors_io.load(path, mapped=True)  # copied into the network below, no second copy
    kind = card.get("student", {"kind": "full"})
    lora = None if kind["kind"] == "full" else {"rank": kind["rank"], "alpha": kind["alpha"]}
    if card.get("experts"):  # one network per phase, built as ``make_networks`` builds them (full: a copy each)
        parts = expert_tensors(tensors, card)
        nets, _ = make_networks(denoiser if share or consume or lora is None else copy.deepcopy(denoiser),
                                tuple(f"expert.{k}" for k in range(len(parts))), kind["kind"], **(lora or {}))
        for expert, part in zip(nets.values(), parts):
            _load_weights(path, expert, part)
        net = Experts(list(nets.values()), card["experts"]["boundaries"])
    else:
        if card.get("architecture"):  # a student of its own size (phased distillation)
            base = from_architecture(card["architecture"])
        else:
            base = denoiser if consume or (share and lora is not None) else copy.deepcopy(denoiser)
        net = StudentNet(base, card.get(SCALAR_INPUTS["nfe"].card) is not None, lora,
                         card.get(SCALAR_INPUTS["w"].card) is not None)
        _load_weights(path, net, tensors)
    if card.get("afs_center", "zero") == "class_mean" and AFS_MEANS_KEY not in tensors:
        raise ValueError(f"{path} says its first step is centred on class means but holds no {AFS_MEANS_KEY}")
    means = tensors.get(AFS_MEANS_KEY)
    return Student(net.eval().requires_grad_(False), card, uncond, None if means is None else means.clone())


def start_from(path: str | Path, net: StudentNet | Experts, teacher_fingerprint: str) -> None:
    """Put the weights of the student file at ``path`` into ``net``, the network a run trains (``init_from``),
    instead of the teacher's: a run that continues a student with another method (a 4-step SFD student
    sharpened by DMD2, a one-step regression student refined by distribution matching; Hyper-SD's second
    stage). The file must be a student of the same teacher (``teacher_fingerprint``) and of the run's kind: a
    full network, or LoRA adapters of the same rank and alpha, with the same scalar inputs (step count,
    guidance scale). A file of one network starts every expert of an ``Experts`` network; a file of experts,
    the same number of experts one by one. Only the trained network's weights are taken: the file's
    schedule, method and the other networks of the run (a fake score) start as the run's own."""
    card = read_student_card(path)
    if card["teacher_fingerprint"] != teacher_fingerprint:
        raise ValueError(f"init_from {path} is a student of another teacher (fingerprint "
                         f"{card['teacher_fingerprint']}, this run's teacher {teacher_fingerprint}): start from a "
                         "student of the teacher the run distils")
    experts = net.experts if isinstance(net, Experts) else [net]
    first = experts[0]
    theirs, ours = card.get("student", {"kind": "full"}), student_kind(first)
    if any(theirs.get(k) != ours.get(k) for k in ("kind", "rank", "alpha")):
        fits = ("student: full" if theirs["kind"] == "full" else
                f"student: lora, lora_rank: {theirs['rank']}, lora_alpha: {theirs['alpha']:g}")
        raise ValueError(f"init_from {path} holds a {_kind_words(theirs)} and this run trains a {_kind_words(ours)}: "
                         f"train the kind the file holds ({fits})")
    for key, scalar in SCALAR_INPUTS.items():
        takes = card.get(scalar.card) is not None
        if takes != (getattr(first, scalar.attr) is not None):
            raise ValueError(f"init_from {path}: its network {'takes' if takes else 'does not take'} the "
                             f"{INPUT_WORDS[key]} as an input and this run's {'does not' if takes else 'does'}: start "
                             "from a student whose network matches the method's")
    tensors, _ = safetensors_io.load(path, mapped=True)
    parts = expert_tensors(tensors, card)
    if len(parts) == 1:
        parts = parts * len(experts)
    if len(parts) != len(experts):
        raise ValueError(f"init_from {path} holds {len(parts)} experts and this run trains {len(experts)} network(s): "
                         f"start from a student with one network or with {len(experts)} experts")
    for expert, part in zip(experts, parts):
        _load_weights(path, expert, part)


def _kind_words(kind: dict) -> str:
    if kind["kind"] == "full":
        return "full-weight network"
    return f"LoRA of rank {kind['rank']} and alpha {kind['alpha']:g}"


def _load_weights(path: str | Path, net: StudentNet, tensors: dict[str, torch.Tensor]) -> None:
    """A student file's ``tensors`` into ``net``: its network's weights or its adapters, and the embeddings of
    its scalar inputs."""
    try:
        if net.lora is None:
            weights = {k: v for k, v in tensors.items() if not k.startswith(NOT_NETWORK)}
            network_module(net.denoiser).load_state_dict(weights)
        else:
            net.lora.load_file_tensors(tensors)
        for i in SCALAR_INPUTS.values():
            if getattr(net, i.attr) is not None:
                getattr(net, i.attr).load_state_dict({k[len(i.attr) + 1:]: v for k, v in tensors.items()
                                                      if k.startswith(f"{i.attr}.")})
    except (RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0][:300]
        raise ValueError(f"{path}: its weights do not fit the teacher's network ({first})") from None


@contextlib.contextmanager
def borrowing(path: str | Path, teacher: CFGTeacher | nn.Module, uncond: Cond = None,
              any_teacher: bool = False) -> Iterator[Student]:
    """The student file at ``path`` loaded for the length of the block (``load_student``): a LoRA student's
    adapters hooked into ``teacher``'s own network (no copy of its weights) and taken out again at the end
    (``release_teacher``), so that the teacher samples bare before and after, and students of one teacher
    sample one after another on one copy of it; a full student is its own copy."""
    student = load_student(path, teacher, uncond, share=True, any_teacher=any_teacher)
    try:
        yield student
    finally:
        release_teacher(student.net)


def release_teacher(net: torch.nn.Module) -> None:
    """Detach a LoRA student's adapters (every expert's, of ``Experts``) from the teacher network they were
    hooked into, and give a host's blocks that training checkpointed their own classes back."""
    disable_checkpointing(net)
    for module in net.modules():
        if isinstance(module, StudentNet) and module.lora is not None:
            module.lora.detach()
