"""``metrics.jsonl``: one JSON record per line, appended by the trainer, read by the trainer (on resume),
the panel and the nodes' loss curves. The reader is tolerant: a kill or a full disk can leave the last
line half-written, and another process may be mid-line; such lines and any that are not records of an
iteration are skipped and reported, never fatal."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

METRICS = "metrics.jsonl"


@dataclass
class Metrics:
    """The records of ``metrics.jsonl``; ``malformed``: 1-based numbers of lines that are not records of an
    iteration; ``partial``: the last line has no newline yet (being written, or cut short)."""

    records: list[dict] = field(default_factory=list)
    malformed: list[int] = field(default_factory=list)
    partial: bool = False


def is_number(x: object) -> bool:
    """A finite int or float (JSON's NaN and Infinity are not)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def parse_metrics(text: str) -> Metrics:
    metrics = Metrics()
    lines = text.split("\n")
    if lines[-1]:
        metrics.partial = True
    for number, line in enumerate(lines[:-1], start=1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and is_number(record.get("iter")):
            metrics.records.append(record)
        elif line.strip():
            metrics.malformed.append(number)
    return metrics


def read_metrics(path: str | Path) -> Metrics:
    """The records of the metrics file at ``path`` (none when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return Metrics()
    return parse_metrics(path.read_bytes().decode("utf-8", errors="replace"))
