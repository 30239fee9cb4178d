"""The one way the engine writes a file: to a temporary file in the same folder, flushed to disk, then
renamed over the target, so an interrupted or failed write (a kill, a full disk) leaves the previous
file whole and never a half-written one in its place."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ON_WINDOWS = os.name == "nt"
#: how long a rename waits out a reader holding its target open on Windows (the panel reads a run's files every
#: 2 s, each in a moment)
WINDOWS_RETRY_S = 2.0


def replace(source: str | Path, target: str | Path) -> None:
    """``os.replace``; on Windows retried for up to ``WINDOWS_RETRY_S``: there a file that another process holds
    open (the panel reading ``status.json``) cannot be replaced until it is closed, and the rename fails with
    ``PermissionError`` meanwhile."""
    deadline = time.monotonic() + WINDOWS_RETRY_S
    while True:
        try:
            os.replace(source, target)
            return
        except PermissionError:
            if not ON_WINDOWS or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write to; on a clean exit it is synced and renamed to ``path`` (readable by
    the owner's group and others, as an ordinary file would be), on an error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A temporary folder to write a folder of files into (a library's ``save_pretrained``); on a clean exit it
    takes the place of ``path`` (a previous folder there is moved aside first and removed after), on an error
    it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old") if path.exists() else None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            replace(path, old)
        replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, data, indent: int | None = 1) -> Path:
    return write_text(path, json.dumps(data, indent=indent))


def copy_file(source: str | Path, target: str | Path) -> Path:
    """Copy ``source`` over ``target`` atomically: a failed copy (a full disk) leaves ``target`` as it was."""
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return Path(target)
