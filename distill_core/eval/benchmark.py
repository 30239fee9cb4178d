"""Shared benchmark plumbing: a fixed evaluation set (noise, classes, the teacher's reference solve),
one row format for every benchmark and report, and a table printer.

A row is ``{method, nfe, psnr_db, rmse, fd, class_acc, images_per_s, network_evals, ...}``: ``nfe``
counts denoiser calls per image (sampling steps), ``network_evals`` the network evaluations behind
them (a CFG call is two: conditional and unconditional, batched); PSNR / RMSE against the
teacher's reference solve from the same noise, Frechet distance to the data's reference statistics
in the metric classifier's feature space, the classifier's accuracy on the requested classes, and
throughput of the sampling call. An evaluation set with a ``target`` (``teacher_target``: the teacher's
own many-step samples from other noise) adds ``fd_teacher``, the Frechet distance to the target's
features, and ``precision`` / ``recall`` against them (``coverage``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from distill_core import safetensors_io
from distill_core.atomic import write_json
from distill_core.builtin import ASSETS, SHAPE, solve_fingerprint
from distill_core.config import EDM_SIGMA_MIN, TRAINING_SEED_BASE
from distill_core.denoisers.base import Cond, move_cond
from distill_core.eval.coverage import precision_recall
from distill_core.eval.fidelity import psnr, reference_solve, rmse
from distill_core.eval.frechet import (
    class_accuracy,
    feature_set_distance,
    features,
    frechet_distance,
    gaussian_fit,
    reference_stats,
)
from distill_core.eval.speed import CountingDenoiser
from distill_core.solvers import SOLVERS, nfe_of, parse_solver_label, solver_labels, solver_sigmas
from distill_core.teacher import CFGTeacher

#: Reference solves that ship with the engine, read like a cache: the built-in teacher's, on the main job's
#: evaluation set (seed 1, w = 2, 100 samples; ``--quality``'s 500 are solved). They are what ``eval_set``
#: computes (written by ``eval_set(teacher, n, seed=1, cache_dir=SHIPPED_REFERENCES)``), shipped so that
#: the main job spends its minutes on training, not on 255 network evaluations per reference sample. A
#: smaller set of the same seed is read as their first samples.
SHIPPED_REFERENCES = ASSETS / "references"


#: the spaces the distribution metrics are computed in: the metric classifier's features (the built-in
#: teachers' digits, with ``fd`` to the data and ``class_acc``), or pixels average-pooled to 4 x 4 per channel
#: (any other data, with ``fd_teacher`` / ``precision`` / ``recall`` against the teacher's own samples only)
DIGITS, PIXELS = "digits", "pixels"
#: how a report states its metric space
METRIC_SPACES = {
    DIGITS: "the metric classifier's features: fd to the MNIST test digits and class accuracy",
    PIXELS: "pixels average-pooled to 4 x 4 per channel: fd_teacher, precision and recall against the teacher's "
            "own samples from other noise (no classifier fits this data)",
}


@dataclass
class EvalSet:
    """Initial noise x_N = sigma_max z, class labels (balanced; None for an unconditional teacher), the
    teacher's reference solve (``steps`` Heun steps), optionally ``target``: features of the teacher's own
    samples that the distribution rows are compared to, ``space``: the features' space (DIGITS, PIXELS), and
    ``device``: where its batches are sampled (the networks' device; the tensors here and every row's images
    stay on the CPU)."""

    noise: torch.Tensor
    labels: torch.Tensor | None
    reference: torch.Tensor
    steps: int = 128
    target: torch.Tensor | None = None
    space: str = DIGITS
    device: torch.device = torch.device("cpu")
    condition: Callable[[torch.Tensor], Cond] | None = None

    def rows(self, start: int, stop: int) -> Cond:
        """The conditions of samples ``start`` .. ``stop`` - 1: their labels, or what ``condition`` makes of
        them (the prompts' rows with their images' of a teacher that reads an image beside each prompt)."""
        if self.labels is None:
            return None
        labels = self.labels[start:stop]
        return labels if self.condition is None else self.condition(labels)


def metric_features(images: torch.Tensor, space: str) -> torch.Tensor:
    """``[N, D]`` features of images in [-1, 1]: the metric classifier's (DIGITS), or the pixels average-pooled
    to 4 x 4 per channel (PIXELS; a clip [N, C, T, H, W]: per channel and frame)."""
    if space == DIGITS:
        return features(images)
    if space == PIXELS:
        planes = images.flatten(1, 2) if images.ndim == 5 else images
        return torch.nn.functional.adaptive_avg_pool2d(planes.float().clamp(-1, 1), 4).flatten(1)
    raise ValueError(f"unknown metric space {space!r}: {DIGITS} or {PIXELS}")


def in_batches(fn: Callable[[torch.Tensor, Cond], torch.Tensor], ev: EvalSet,
               batch: int) -> torch.Tensor:
    """``fn(noise, labels)`` over the evaluation set in chunks of at most ``batch`` on its device, the results
    concatenated on the CPU. A chunk that runs out of accelerator memory is tried again at half the size (and
    the rest of the set goes at that size): the default batch suits small teachers, and a large one finds
    the batch it fits."""
    out, done, n = [], 0, ev.noise.shape[0]
    while done < n:
        x = ev.noise[done:done + batch].to(ev.device)
        y = move_cond(ev.rows(done, done + batch), ev.device)
        try:
            out.append(fn(x, y).cpu())
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        done += x.shape[0]
    return torch.cat(out)


def eval_set(teacher: CFGTeacher, n: int, seed: int = 0, steps: int = 128, cache_dir: str | Path | None = None,
             batch: int = 250, shape: tuple[int, ...] = SHAPE, classes: int = 10, space: str = DIGITS,
             device: torch.device | str = "cpu", condition: Callable[[torch.Tensor], Cond] | None = None) -> EvalSet:
    """Build (or read from the shipped references, a smaller set as a shipped set's first samples, or from
    ``cache_dir``) the evaluation set for ``teacher`` at its guidance scale: noise of ``shape``, labels 0 ..
    ``classes`` - 1 in turn (none when ``classes`` is 0), sampled on ``device`` (the teacher's); ``condition``:
    the condition of labels where it is not the labels themselves (``EvalSet.rows``).
    The file name holds the teacher's fingerprint, w, n, the seed and the solve. ``seed`` lies below
    ``TRAINING_SEED_BASE``: no training run draws this noise."""
    if not 0 <= seed < TRAINING_SEED_BASE:
        raise ValueError(f"an evaluation seed lies in [0, {TRAINING_SEED_BASE}) (training's seeds start there), "
                         f"got {seed}")
    tag = f"ref-{solve_fingerprint(teacher.denoiser)}-w{teacher.w:g}-n{{}}-s{seed}-heun{steps}.safetensors"  # {}: n
    cached = Path(cache_dir) / tag.format(n) if cache_dir else None
    stored = next((p for p in (SHIPPED_REFERENCES / tag.format(n), cached) if p is not None and p.is_file()),
                  None) or shipped_superset(tag, n)
    reference = None if stored is None else safetensors_io.load(stored)[0]["reference"]
    drawn = n if reference is None else reference.shape[0]  # a larger set's noise, cut to its first n
    noise = torch.randn((drawn, *shape), generator=torch.Generator().manual_seed(seed))[:n] * teacher.sigma_max
    labels = torch.arange(n) % classes if classes else None
    ev = EvalSet(noise, labels, torch.empty(0), steps, space=space, device=torch.device(device), condition=condition)
    if reference is not None:
        return dataclasses.replace(ev, reference=reference[:n])
    with torch.no_grad():
        reference = in_batches(lambda x, y: reference_solve(teacher, x, y, steps=steps), ev, batch)
    if cached is not None:
        safetensors_io.save_atomic({"reference": reference}, cached, {"kind": "reference", "steps": steps})
    return dataclasses.replace(ev, reference=reference)


def shipped_superset(tag: str, n: int) -> Path | None:
    """The smallest shipped reference set of more than ``n`` samples named as ``tag`` names a set (its sample
    count left as ``{}``): the first ``n`` samples of a set are the set of ``n`` (the same noise and labels,
    each sample solved on its own)."""
    head, tail = tag.split("{}")
    larger = [(int(count), path) for path in SHIPPED_REFERENCES.glob(tag.format("*"))
              if (count := path.name[len(head):-len(tail)]).isdigit() and int(count) > n]
    return min(larger)[1] if larger else None


def teacher_target(teacher: CFGTeacher, n: int, seed: int = 2, steps: int = 128,
                   cache_dir: str | Path | None = None, **eval_kw) -> torch.Tensor:
    """Features ``[n, D]`` (``metric_features`` in ``eval_kw``'s space) of the distillation target: ``n`` samples
    of the teacher at its guidance scale, each its reference solve (``steps`` Heun steps) from noise of
    ``seed`` -- another seed than the evaluation set's, so that the target is independent of the noise the rows
    are sampled from. The samples are ``eval_set``'s reference for that seed, and cached as it is."""
    ev = eval_set(teacher, n, seed, steps, cache_dir, **eval_kw)
    return metric_features(ev.reference.clamp(-1, 1), ev.space)


def builtin_samples(w: float, per_class: int = 10, steps: int = 64, seed: int = 0,
                    path: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` reference-solve samples (``steps`` Heun steps) of every class of a built-in teacher (the
    EDM one, or the one at ``path``) at guidance ``w``, class-major, in [-1, 1]; and their labels."""
    from distill_core.builtin import NUM_CLASSES, TEACHER_PATH, load_builtin_teacher

    teacher = CFGTeacher(load_builtin_teacher(path or TEACHER_PATH), w=w, uncond=torch.tensor([NUM_CLASSES]))
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    noise = torch.randn((labels.shape[0], *SHAPE), generator=torch.Generator().manual_seed(seed))
    return reference_solve(teacher, noise * teacher.sigma_max, labels, steps=steps).clamp(-1, 1), labels


def sample_in_batches(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ev: EvalSet,
                      batch: int = 250) -> tuple[torch.Tensor, float]:
    """Run ``fn(noise, labels) -> images`` over the evaluation set on its device (``in_batches``); returns the
    images (on the CPU) and seconds."""
    start = time.perf_counter()
    with torch.no_grad():
        images = in_batches(fn, ev, batch)
    return images, time.perf_counter() - start


def solver_row(label: str, nfe: int, teacher: CFGTeacher, ev: EvalSet, sigma_min: float = EDM_SIGMA_MIN) -> dict:
    """Evaluate a training-free solver (a ``solvers.solver_label``: ``name`` or ``name/flow``) at a budget of
    ``nfe`` network evaluations per image."""
    sigmas = solver_sigmas(label, nfe, sigma_min, teacher.sigma_max)
    solver = SOLVERS[parse_solver_label(label)[0]]
    counters = []  # one per batch: a one-step solver's batches all start at one sigma, which one counter merges

    def solve(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        counters.append(CountingDenoiser(teacher))
        return solver(counters[-1], x, sigmas.to(x.device), y)

    images, seconds = sample_in_batches(solve, ev)
    used = counters[-1].nfe  # a batch that ran to the end (one that ran out of memory may have stopped short)
    return evaluate(label, used, images, ev, seconds, network_evals=used * teacher.evaluations())


def student_rows(run, teacher: CFGTeacher, ev: EvalSet, nfes: list[int] | None = None, any_teacher: bool = False,
                 **extra) -> list[dict]:
    """Benchmark rows of a trained student (``train.run.StudentRun``), one per NFE it serves (those of
    ``nfes`` only, when given; ``network_evals`` counts CFG's two); ``extra`` goes into every row.
    ``any_teacher``: the student on ``teacher`` although it was distilled from another (``load_student``)."""
    from distill_core.sampling import sample
    from distill_core.student_files import borrowing

    cost = {"train_seconds": round(run.train_seconds, 1), "teacher_evaluations": run.teacher_evaluations,
            "trained_params": run.trained_params, **extra}
    rows = []
    with borrowing(run.path, teacher, any_teacher=any_teacher) as student:  # a LoRA: on the teacher's network
        per_step = teacher.evaluations() if student.card["guidance"]["mode"] == "cfg" else 1
        for n in student.nfe_choices:
            if nfes is not None and n not in nfes:
                continue
            images, seconds = sample_in_batches(lambda x, y, n=n: sample(student, x, y, steps=n), ev)
            rows.append(evaluate(student.card["method"], n, images, ev, seconds, network_evals=n * per_step,
                                 **cost))
    return rows


def solver_rows(teacher: CFGTeacher, ev: EvalSet, nfe: int, sigma_min: float, chosen: str | None = None
                ) -> list[dict]:
    """A row for each training-free solver the teacher is compared with at ``nfe`` evaluations
    (``solvers.solver_labels``: of those ``chosen``, spending exactly ``nfe``, on Karras's grid to ``sigma_min``
    and for a flow teacher also on the flow time grid), best PSNR first (the first row is the best solver at
    ``nfe``)."""
    labels = solver_labels(teacher.denoiser, nfe, chosen)
    return sorted((solver_row(label, nfe, teacher, ev, sigma_min) for label in labels), key=lambda r: -r["psnr_db"])


def teacher_row(teacher: CFGTeacher, ev: EvalSet) -> dict:
    """The teacher's reference solve itself as a row (no PSNR against itself, no timing: it may come from a
    cache): its distribution metrics are the baseline the few-step rows approach."""
    nfe = nfe_of("heun", ev.steps)
    return {"method": "teacher", "nfe": nfe, "network_evals": nfe * teacher.evaluations(),
            **sample_metrics(ev.reference, ev)}


def evaluate(method: str, nfe: int, images: torch.Tensor, ev: EvalSet, seconds: float, **extra) -> dict:
    """One benchmark row for ``images`` sampled from ``ev.noise`` in ``seconds``."""
    images = images.clamp(-1, 1)
    return {
        "method": method,
        "nfe": int(nfe),
        "psnr_db": round(psnr(images, ev.reference.clamp(-1, 1)), 3),
        "rmse": round(rmse(images, ev.reference.clamp(-1, 1)), 5),
        **sample_metrics(images, ev),
        "images_per_s": round(images.shape[0] / max(seconds, 1e-9), 2),
        **extra,
    }


def sample_metrics(images: torch.Tensor, ev: EvalSet, k: int = 3) -> dict:
    """The metrics of ``images`` as a set of samples of ``ev.labels``: ``fd`` to the data's statistics and
    ``class_acc``; with ``ev.target``, ``fd_teacher`` to the target's Gaussian fit and ``precision`` /
    ``recall`` against the target's k-NN balls (``coverage.precision_recall``)."""
    feats = metric_features(images, ev.space)
    metrics = {"fd": round(frechet_distance(*gaussian_fit(feats), *reference_stats()), 4)} if ev.space == DIGITS else {}
    if ev.target is not None:
        precision, recall = precision_recall(feats, ev.target, k)
        metrics.update(fd_teacher=round(feature_set_distance(feats, ev.target), 4),
                       precision=round(precision, 4), recall=round(recall, 4))
    if ev.space == DIGITS and ev.labels is not None:
        metrics["class_acc"] = round(class_accuracy(images, ev.labels), 4)
    return metrics


TABLE_KEYS = ("method", "nfe", "network_evals", "psnr_db", "fd", "class_acc", "images_per_s")


def format_table(rows: list[dict], keys: tuple[str, ...] = TABLE_KEYS) -> str:
    """A fixed-width text table of ``rows`` (missing keys shown as '-'); other scalar keys follow."""
    keys = tuple(keys) + tuple(
        k for r in rows for k in r if k not in keys and k != "rmse" and not isinstance(r[k], (dict, list))
    )
    keys = tuple(dict.fromkeys(keys))
    cells = [[str(k) for k in keys]] + [[_fmt(r.get(k, "-")) for k in keys] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(keys))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))) for row in cells]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def write_rows(rows: list[dict], path: str | Path) -> Path:
    """The rows as a JSON list at ``path``, written atomically."""
    return write_json(path, rows)


def benchmark_set(teacher: CFGTeacher, n: int, steps: int, cache_dir: str | Path | None = None,
                  device: torch.device | str = "cpu", **space) -> EvalSet:
    """A benchmark's evaluation set: noise and classes of seed 1 with their reference solve, and as the
    distribution target the teacher's own samples from the independent seed 2 (``teacher_target``); both
    solved on ``device`` (the teacher's), where the rows are sampled too. ``space``: the samples' shape, classes
    and metric space (``eval_set``'s keywords; default the built-in teachers')."""
    ev = eval_set(teacher, n, seed=1, steps=steps, cache_dir=cache_dir, device=device, **space)
    target = teacher_target(teacher, n, seed=2, steps=steps, cache_dir=cache_dir, device=device, **space)
    return dataclasses.replace(ev, target=target)


def report_rows(rows: list[dict], keys: tuple[str, ...], heading: str, started: float, out: str | Path | None
                ) -> None:
    """Print a benchmark's heading, its table and its wall time since ``started``; write the rows to ``out``."""
    print(heading)
    print(format_table(rows, keys))
    print(f"({time.time() - started:.0f} s)")
    if out:
        write_rows(rows, out)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
