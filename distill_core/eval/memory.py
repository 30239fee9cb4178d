"""Peak memory of a piece of work, in MiB (2^20 bytes): of the process (``with_peak_memory``, for benchmarks),
and of the tensors the work allocates (``with_tensor_peak``, for the memory plan's checks).

On CUDA it is the allocator's peak, ``torch.cuda.max_memory_allocated`` with the peak reset before the
work: the tensors of the work and of anything else the process keeps on the GPU meanwhile. Without CUDA
it is the process's peak resident set size (VmHWM of /proc/self/status), reset before the work by writing
"5" to /proc/self/clear_refs (Linux >= 4.0): the whole process's memory, so it includes what was resident
before the work started (the teacher, an evaluation set). Where that reset is refused, the peak cannot be
told apart from the process's lifetime peak and none is reported.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")
MIB = 2**20
CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


def with_peak_memory(work: Callable[[], T]) -> tuple[T, float | None]:
    """``work()``'s result and its peak memory in MiB (None where it cannot be measured)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        result = work()
        return result, torch.cuda.max_memory_allocated() / MIB
    if not _reset_rss_peak():
        return work(), None
    result = work()
    return result, _rss_peak_kib() * 1024 / MIB


def with_tensor_peak(work: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """``work()``'s result and the peak of the tensor memory it allocates on ``device`` above what was allocated
    when it started, in MiB. On CUDA, from the allocator's statistics; on the CPU, from torch's profiler: each
    operator's own allocations net of its frees, and every free outside an operator, summed in time order
    (a transient inside one operator is not seen; slow, for short pieces of work)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = work()
        torch.cuda.synchronize(device)
        return result, (torch.cuda.max_memory_allocated(device) - start) / MIB
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = work()
    changes = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return result, peak / MIB


def _reset_rss_peak() -> bool:
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _rss_peak_kib() is not None


def _rss_peak_kib() -> int | None:
    found = re.search(r"^VmHWM:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE)
    return int(found.group(1)) if found else None
