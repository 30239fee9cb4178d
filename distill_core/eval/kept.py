"""A benchmark's students, kept: a sweep that runs for hours loses nothing when it stops.

Each student's rows go to its run folder (``ROWS``, written atomically) with its settings and what they were
measured on (``evaluation``: the teacher's fingerprint, the sample count, ...). A later run of the benchmark
that asks for the same student on the same evaluation reads its rows instead of training it again, so a
sweep stopped part way, or widened (more methods, more values), trains only the students it lacks. A student
stopped part way (Ctrl-C, a killed job) goes on from its last checkpoint when the checkpoint's run has the
same settings; a resumed run is bit-exact, so its rows are those of a student trained in one go (its teacher
evaluations count the pools it solves again, and its peak memory is that of the part it ran).

Settings are the run's config up to ``BOOKKEEPING``, the fields that leave the student as it is; the student
file a run starts from counts by its bytes.

A benchmark's solver rows are kept the same way (``kept``, in its reference cache): they depend only on the
teacher and the evaluation, and a long sweep's solver rows take as long as a student.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from distill_core.atomic import write_json
from distill_core.config import DistillConfig

if TYPE_CHECKING:
    from distill_core.train.run import StudentRun

#: a student's rows in its run folder, with the settings and the evaluation they belong to
ROWS = "bench_rows.json"
#: config fields that leave a student as it is: its rows are kept, and its checkpoint resumed, across them
BOOKKEEPING = ("out", "checkpoint_every", "sample_every")
#: the checkpoint interval of benchmark students (iterations)
CHECKPOINT_EVERY = 50


def kept_rows(cfg: DistillConfig, evaluation: dict, rows_of: Callable[[bool], list[dict]]) -> list[dict]:
    """The rows of ``cfg``'s student on ``evaluation``: read from its run folder where they are kept with the
    same settings and evaluation, else ``rows_of(resume)`` (train, from the checkpoint when ``resume``, and
    evaluate), kept for the next run."""
    key = {"config": settings(cfg.to_dict()), "evaluation": evaluation}
    return kept(Path(cfg.out) / ROWS, key, lambda: rows_of(resumable(cfg)))


def kept(path: Path, key: dict, rows_of: Callable[[], list[dict]]) -> list[dict]:
    """The rows kept in ``path`` when they were measured for ``key``, else ``rows_of()``, kept there (atomically)
    for the next run."""
    key = json.loads(json.dumps(key, default=str))
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            print(f"{path.parent}: measured with the same settings before; its rows are read from {path.name}")
            return saved["rows"]
    rows = rows_of()
    write_json(path, {"key": key, "rows": rows})
    return rows


def resumable(cfg: DistillConfig) -> bool:
    """Whether ``cfg.out`` holds a checkpoint of a run with ``cfg``'s settings (up to ``BOOKKEEPING``); says so.
    Settings the trainer would let a resume change (more iterations, another lr) are other settings here: the
    student would not be the one a run in one go trains."""
    from distill_core.train.checkpoint import CHECKPOINTS, checkpoint_info, has_checkpoint
    from distill_core.train.resume import BEFORE_THE_KEY

    folder = Path(cfg.out) / CHECKPOINTS
    if not has_checkpoint(folder):
        return False
    try:
        info = checkpoint_info(folder)
    except ValueError:  # an unreadable checkpoint: the student trains anew
        return False
    if settings({**BEFORE_THE_KEY, **info["config"]}) != settings(cfg.to_dict()):
        return False
    print(f"{cfg.out}: going on from its checkpoint at iteration {info['iteration']}/{cfg.iters}")
    return True


def settings(config: dict) -> dict:
    """A run's config up to ``BOOKKEEPING``, as JSON reads it back (tuples as lists); the student file a run
    starts from (``init_from``) by its path and the hash of its bytes, so that a file trained again in place is
    another start."""
    kept = {k: v for k, v in config.items() if k not in BOOKKEEPING}
    if kept.get("init_from"):
        kept["init_from"] = {"path": str(kept["init_from"]), "sha256": file_hash(Path(kept["init_from"]))}
    return json.loads(json.dumps(kept, default=str))


def file_hash(path: Path) -> str | None:
    """The sha256 of a file's bytes (None for a missing file: its run will say so when it starts)."""
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def finished(run: StudentRun | None, cfg: DistillConfig) -> StudentRun:
    """``train_student``'s run, or an exit that says how to go on when it stopped at a checkpoint (``None``)."""
    if run is None:
        raise SystemExit(f"{cfg.out}: stopped at a checkpoint; the same command goes on from it")
    return run
