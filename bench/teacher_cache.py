"""What the teacher cache saves: the main job's training without a cache, with a cold one and with a warm one,
and a learning curve's pattern (a run at half the budget, then the full run on the same cache).

    python bench/teacher_cache.py [--quick] [--iters N] [--batch B] [--out FILE.json]

Every run trains the main job's SFD student on the built-in teacher (training only: no evaluation). Each row:
``run``, ``iters``, ``train_seconds``, ``teacher_evaluations`` (the student card's: what its targets cost,
wherever they were solved), ``solves_written`` (cache entries the run added), and ``identical``: whether the
student file's tensors equal the uncached run's bit for bit (``None`` for the half-budget run, which trains
another student). ``--quick``: 24 iterations at batch 16.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill_core.config import DistillConfig  # noqa: E402
from distill_core.eval.benchmark import format_table, write_rows  # noqa: E402
from distill_core.options import positive  # noqa: E402
from distill_core.safetensors_io import load  # noqa: E402
from distill_core.sources import builtin_source  # noqa: E402
from distill_core.train.run import train_student  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="24 iterations at batch 16")
    p.add_argument("--iters", type=positive, help="iterations of the full run (default: the main job's)")
    p.add_argument("--batch", type=positive, help="batch (default: the main job's)")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    base = DistillConfig(checkpoint_every=0)
    if args.quick:
        base = base.replace(iters=24, batch=16)
    base = base.replace(iters=args.iters, batch=args.batch)

    work = Path(tempfile.mkdtemp(prefix="teacher_cache_bench_"))
    try:
        rows, plain = [], None
        for name, cache, iters in (("no cache", None, base.iters), ("cold cache", "cache", base.iters),
                                   ("warm cache", "cache", base.iters), ("half budget, fresh cache", "curve",
                                   base.iters // 2), ("full budget after it", "curve", base.iters)):
            folder = None if cache is None else work / cache
            before = len(list(folder.glob("*.safetensors"))) if folder and folder.is_dir() else 0
            cfg = base.replace(iters=iters, out=str(work / "runs" / name.replace(" ", "_").replace(",", "")),
                               teacher_cache=None if folder is None else str(folder))
            run = train_student(cfg, builtin_source(), progress=False)
            tensors, card = load(run.path)
            plain = plain or tensors
            rows.append({
                "run": name, "iters": iters, "train_seconds": round(run.train_seconds, 1),
                "teacher_evaluations": card["training"]["teacher_evaluations"],
                "solves_written": (len(list(folder.glob("*.safetensors"))) - before) if folder else 0,
                "identical": None if iters != base.iters else all(torch.equal(tensors[k], plain[k]) for k in plain),
            })
            print(f"{name}: {rows[-1]['train_seconds']} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(format_table(rows, keys=("run",)))
    if args.out:
        write_rows(rows, args.out)
    return rows


if __name__ == "__main__":
    main()
