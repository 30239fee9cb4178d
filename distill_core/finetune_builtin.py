"""A fine-tune of the built-in teacher: the same digits in a bold style, for measuring how a generic
few-step student drifts on a fine-tune and what distilling the fine-tune itself buys.

    python -m distill_core finetune-teacher [--steps 600] [--out FILE]

The style: every training digit's strokes dilated by a 3 x 3 maximum (``bold``), about twice the ink of
the originals. The fine-tune is a LoRA (rank 8 on every Linear and Conv2d) trained on those digits with
the teacher's own EDM loss and label dropout, shipped as ``assets/finetune_bold.safetensors`` in the key
format of ComfyUI's stock loader; ``load_finetuned_teacher`` merges it into a copy of the teacher.
``ink``, the fraction of a sample's pixels above mid-grey, measures the style.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from distill_core import builtin, safetensors_io
from distill_core.lora import LoRAAdapters, merge, target_layers

FINETUNE_PATH = builtin.ASSETS / "finetune_bold.safetensors"
STYLE = "bold: strokes dilated by a 3 x 3 maximum"


def bold(images: torch.Tensor) -> torch.Tensor:
    """Digits ``[N, 1, H, W]`` in [-1, 1] with their strokes dilated by a 3 x 3 maximum."""
    return F.max_pool2d(images, 3, stride=1, padding=1)


def ink(images: torch.Tensor) -> float:
    """The fraction of pixels above mid-grey (0 in [-1, 1]): the stroke area the bold style doubles."""
    return float((images > 0).float().mean())


def finetune_teacher(out: str | Path = FINETUNE_PATH, steps: int = 600, batch: int = 64, lr: float = 1e-3,
                     rank: int = 8, label_dropout: float = 0.1, seed: int = 0) -> Path:
    """Train LoRA adapters on the built-in teacher on bold digits (EDM loss, the teacher's recipe) and
    save them with a card naming the base teacher's fingerprint."""
    from distill_core.data import load_mnist
    from distill_core.train_builtin import edm_loss

    torch.manual_seed(seed)
    images, labels = load_mnist("train")
    images = bold(images)
    denoiser = builtin.load_builtin_teacher()
    adapters = LoRAAdapters(denoiser.net, target_layers(denoiser.net), rank=rank)
    opt = torch.optim.Adam(adapters.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    start, loss = time.time(), torch.tensor(float("nan"))
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (batch,), generator=gen)
        y = labels[idx].clone()
        y[torch.rand(batch, generator=gen) < label_dropout] = builtin.NUM_CLASSES
        loss = edm_loss(denoiser, images[idx], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}/{steps}  loss {loss.item():.4f}  {time.time() - start:.0f}s", flush=True)
    card = {"kind": "teacher_lora", "style": STYLE, "base": "builtin",
            "base_fingerprint": builtin.fingerprint(builtin.load_builtin_teacher().net), "rank": rank,
            "steps": steps, "batch": batch, "lr": lr, "label_dropout": label_dropout, "seed": seed,
            "final_loss": round(loss.item(), 5), "train_seconds": round(time.time() - start)}
    return safetensors_io.save_atomic({k: v.contiguous() for k, v in adapters.file_tensors().items()}, out, card)


def load_finetuned_teacher(path: str | Path = FINETUNE_PATH):
    """The built-in teacher with the fine-tune's LoRA merged into a copy of its weights."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no fine-tune at {path}: make it with python -m distill_core finetune-teacher")
    tensors, card = safetensors_io.load(path)
    denoiser = copy.deepcopy(builtin.load_builtin_teacher())
    if card.get("base_fingerprint") != builtin.fingerprint(denoiser.net):
        raise ValueError(f"{path} fine-tunes another teacher (fingerprint {card.get('base_fingerprint')})")
    merge(denoiser.net, tensors)
    return denoiser


def add_arguments(p) -> None:
    p.add_argument("--out", default=str(FINETUNE_PATH), help="where to write the fine-tune's LoRA")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps (a few minutes on 2 CPU cores)")
    p.add_argument("--seed", type=int, default=0)
    builtin.add_replace_argument(p)


def run(args) -> None:
    builtin.refuse_replacing_asset(args.out, args.replace,
                                   "a fine-tune; students of builtin-bold are refused once it changes")
    print(finetune_teacher(args.out, steps=args.steps, seed=args.seed))
