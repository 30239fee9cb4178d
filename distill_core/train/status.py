"""``status.json``: what a run is doing, for readers in other processes (the panel).

The trainer writes it atomically when training starts (``running``, with the process id, so a reader
can tell a live run from one whose process died), and when it ends: ``finished``, ``interrupted``
(Ctrl-C or a stop request; the checkpoint is resumable) or ``failed`` (with the error).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from distill_core.atomic import write_json

STATUS = "status.json"
STATES = ("running", "finished", "interrupted", "failed")


def write_status(out: str | Path, state: str, **fields) -> Path:
    """Record ``state`` (one of ``STATES``) and ``fields`` (JSON values) in ``out/status.json``,
    stamped with this process's id and the time."""
    if state not in STATES:
        raise ValueError(f"unknown run state {state!r}; one of {list(STATES)}")
    path = Path(out) / STATUS
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"state": state, "pid": os.getpid(), "updated": time.time(), **fields})
    return path
