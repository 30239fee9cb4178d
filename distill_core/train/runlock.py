"""One run per folder: ``run.lock`` holds the process id of the run writing there. A second run on the
same folder is refused while that process lives; a lock left by a process that died (a kill, a crash)
is taken over with a message, and the temporary files its interrupted writes left are removed. Under
``accelerate launch`` only the main process (rank 0) locks: the others write nothing."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from distill_core.train.checkpoint import CHECKPOINTS

LOCK = "run.lock"
#: the run's folder of what it may read back instead of computing again (its report's reference solves, its
#: encoded prompts and images)
CACHE = "cache"
#: folders of a run where interrupted atomic writes may leave ``.<name>.<random>.tmp`` files
WRITTEN = (".", CHECKPOINTS, "samples", CACHE)


class RunBusy(RuntimeError):
    """Another live process is writing to the run's folder."""


#: Windows' OpenProcess right to read a process's exit code, the error of a process owned by someone else, and
#: the exit code of a process that has not exited
QUERY_LIMITED_INFORMATION, ACCESS_DENIED, STILL_ACTIVE = 0x1000, 5, 259


def pid_alive(pid: object) -> bool:
    """Whether a process with this id runs on this machine. On Windows it is asked with OpenProcess and
    GetExitCodeProcess: there ``os.kill(pid, 0)`` does not ask, it generates a Ctrl-C console event (signal 0 is
    CTRL_C_EVENT)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    if os.name == "nt":
        import ctypes

        return windows_pid_alive(pid, ctypes.WinDLL("kernel32", use_last_error=True), ctypes.get_last_error)
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):  # none, or not a process id at all
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def windows_pid_alive(pid: int, kernel32, last_error: Callable[[], int]) -> bool:
    """``pid_alive`` through Windows' ``kernel32`` (``last_error``: the calling thread's last error code)."""
    import ctypes

    handle = kernel32.OpenProcess(QUERY_LIMITED_INFORMATION, False, pid)
    if not handle:
        return last_error() == ACCESS_DENIED  # exists, owned by someone else
    try:
        code = ctypes.c_ulong()
        return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def _holder(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def main_process() -> bool:
    """Whether this process writes the run's files: the only one, or rank 0 under a multi-process launcher."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def run_lock(out: str | Path, report: Callable[[str], None] = print) -> Iterator[None]:
    """Hold ``out``'s lock for the block (re-entrant within one process)."""
    out = Path(out)
    if not main_process():
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder == os.getpid():  # this process holds it already (a run inside the main job)
                yield
                return
            if pid_alive(holder):
                raise RunBusy(f"{out} is in use by another run (process {holder}): wait for it to end, or "
                              "choose another output folder") from None
            report(f"taking over {out}: the run that held it (process {holder}) ended without releasing it")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    try:
        remove_leftovers(out)
        yield
    finally:
        if _holder(path) == os.getpid():
            path.unlink(missing_ok=True)


def remove_leftovers(out: Path) -> list[Path]:
    """Delete the temporary files that interrupted atomic writes left in the run's folders."""
    removed = []
    for folder in WRITTEN:
        for tmp in (out / folder).glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
