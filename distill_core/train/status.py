"""``status.json``: what a run is doing, for readers in other processes (the panel).

The trainer writes it atomically when training starts (``running``, with the process id, so a reader
can tell a live run from one whose process died), and when it ends: ``finished``, ``interrupted``
(Ctrl-C or a stop request; the checkpoint is resumable) or ``failed`` (with the error).

Another process asks a run to stop by writing the file ``STOP`` into its folder (the panel's Stop, or
``touch RUN/STOP``): the trainer finishes the iteration, writes a checkpoint, removes the request and
returns, as on Ctrl-C. A file, not a signal: it works on every system and reaches every process of a run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from distill_core.atomic import write_json

STATUS = "status.json"
STATES = ("running", "finished", "interrupted", "failed")
#: the stop request another process writes into the run folder
STOP = "STOP"


def write_status(out: str | Path, state: str, **fields) -> Path:
    """Record ``state`` (one of ``STATES``) and ``fields`` (JSON values) in ``out/status.json``,
    stamped with this process's id and the time."""
    if state not in STATES:
        raise ValueError(f"unknown run state {state!r}; one of {list(STATES)}")
    path = Path(out) / STATUS
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"state": state, "pid": os.getpid(), "updated": time.time(), **fields})
    return path


def request_stop(out: str | Path) -> Path:
    """Ask the run training in ``out`` to stop after its iteration, with a checkpoint (``STOP``)."""
    path = Path(out) / STOP
    path.touch()
    return path
