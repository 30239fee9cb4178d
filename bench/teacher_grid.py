"""The built-in teacher's many-step samples: a class-by-class grid, class accuracy and Frechet distance.

    python bench/teacher_grid.py [--guidance W] [--steps 64] [--per-class 10] [--out docs/teacher_heun64.png]

Samples ``per-class`` images of every digit with Heun on the Karras grid (the reference solve) at
guidance w, writes them as a grid (row = class), and prints the metric classifier's accuracy on
them and their Frechet distance to the test digits' statistics, next to the Frechet distance of as
many real training digits (the distance's small-sample bias: with few images it is far from 0).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill_core import builtin  # noqa: E402
from distill_core.data import load_mnist  # noqa: E402
from distill_core.eval.benchmark import builtin_samples  # noqa: E402
from distill_core.eval.frechet import class_accuracy, fd_to_reference  # noqa: E402
from distill_core.options import positive  # noqa: E402
from distill_core.report import save_grid  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--guidance", type=float, default=builtin.DEFAULT_GUIDANCE, help="CFG scale w of the teacher")
    p.add_argument("--steps", type=positive, default=64, help="Heun steps (2 steps - 1 evaluations)")
    p.add_argument("--per-class", type=positive, default=10, help="samples of every digit (one grid column each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DOCS / "teacher_heun64.png"), help="where to write the grid (PNG)")
    args = p.parse_args(argv)

    start = time.perf_counter()
    images, labels = builtin_samples(args.guidance, args.per_class, args.steps, args.seed)
    seconds = time.perf_counter() - start
    acc = class_accuracy(images, labels)
    real = load_mnist("train")[0][: images.shape[0]]
    print(f"w {args.guidance:g}, {args.steps} Heun steps, {images.shape[0]} images in {seconds:.0f}s: "
          f"class accuracy {acc:.3f}, FD {fd_to_reference(images):.3f} "
          f"(real digits, same number: {fd_to_reference(real):.3f})")
    print(save_grid(list(images.split(args.per_class)), args.out))
    return acc


if __name__ == "__main__":
    main()
