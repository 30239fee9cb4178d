"""Reading run directories into plain data for the panel, robustly and confined to the runs root.

A run is a directory directly under the root holding what the trainer and the main job write:
``status.json`` (``train.status``), ``metrics.jsonl``, ``config.yaml``, ``checkpoints/``,
``samples/iter_NNNNNN.png`` and, once evaluated, ``report.json`` and ``grid.png``. Any of them may be
missing, half-written (the trainer is appending in another process) or garbage: every reader returns
what it could parse plus a list of problems, and never raises on file contents.

Confinement: a run name from the browser must name a directory directly under the root after
resolving symbolic links and ``..``, and a file is read only if it resolves inside its run
directory; anything else raises ``OutsideRoot``.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from distill_core.train.checkpoint import CHECKPOINTS
from distill_core.train.metrics import Metrics, is_number, parse_metrics
from distill_core.train.runlock import pid_alive
from distill_core.train.status import STOP

#: Files whose presence makes a directory a run.
RUN_MARKERS = ("status.json", "metrics.jsonl", "config.yaml", CHECKPOINTS, "report.json")
GRID_NAME = re.compile(r"iter_(\d+)\.png")


class OutsideRoot(ValueError):
    """A name or path that does not resolve to a run (or a file of a run) under the runs root."""


def run_dir(root: str | Path, name: object) -> Path:
    """The directory of run ``name``: a directory directly under ``root`` once resolved."""
    base = Path(root).resolve()
    if not isinstance(name, str) or not name or name != name.strip() or "\x00" in name:
        raise OutsideRoot(f"refused: {name!r} is not a run name")
    path = (base / name).resolve()
    if path.parent != base or not path.is_dir():
        raise OutsideRoot(f"refused: {name!r} is not a run directory under the runs root")
    return path


def run_file(run: Path, relative: str) -> Path:
    """``run / relative``, refused unless it resolves inside ``run`` (a link out of it is refused)."""
    path = (run / relative).resolve()
    if not path.is_relative_to(run.resolve()):
        raise OutsideRoot(f"refused: {relative!r} leaves its run directory")
    return path


def list_runs(root: str | Path) -> list[str]:
    """Names of the runs under ``root``, sorted."""
    base = Path(root)
    if not base.is_dir():
        return []
    names = []
    for child in base.iterdir():
        try:
            path = run_dir(base, child.name)
        except OutsideRoot:  # a file, or a link out of the root
            continue
        if any((path / marker).exists() for marker in RUN_MARKERS):
            names.append(child.name)
    return sorted(names)


# ----------------------------------------------------------------- single files
def read_json(run: Path, relative: str) -> tuple[dict | None, str | None]:
    """The JSON object in ``run/relative``: ``(data, None)``, ``(None, None)`` when the file is
    absent, ``(None, problem)`` when it cannot be read as an object."""
    try:
        path = run_file(run, relative)
        if not path.is_file():
            return None, None
        data = json.loads(path.read_text())
    except OutsideRoot as e:
        return None, str(e)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return None, f"{relative}: malformed ({type(e).__name__})"
    if not isinstance(data, dict):
        return None, f"{relative}: malformed (not a JSON object)"
    return data, None


def read_config(run: Path) -> tuple[dict | None, str | None]:
    """The run's ``config.yaml`` as a dict, like ``read_json``."""
    try:
        path = run_file(run, "config.yaml")
        if not path.is_file():
            return None, None
        data = yaml.safe_load(path.read_text())
    except OutsideRoot as e:
        return None, str(e)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        return None, f"config.yaml: malformed ({type(e).__name__})"
    if not isinstance(data, dict):
        return None, "config.yaml: malformed (not a mapping)"
    try:
        json.dumps(data, allow_nan=False)  # what the panel shows it as: no cycles (recursive aliases), no NaN
    except (ValueError, TypeError):
        return None, "config.yaml: malformed (recursive aliases or values that are not plain data)"
    return data, None


def read_metrics(run: Path) -> tuple[Metrics, str | None]:
    """Every well-formed record of ``metrics.jsonl`` (``iter``, ``time``, ``lr``, and ``loss`` /
    ``grad_norm`` as {student step index: value}) and a problem note, if any."""
    metrics = Metrics()
    try:
        path = run_file(run, "metrics.jsonl")
        if not path.is_file():
            return metrics, None
        parsed = parse_metrics(path.read_bytes().decode("utf-8", errors="replace"))
    except OutsideRoot as e:
        return metrics, str(e)
    except OSError as e:
        return metrics, f"metrics.jsonl: unreadable ({type(e).__name__})"
    metrics = Metrics([_record(r) for r in parsed.records], parsed.malformed, parsed.partial)
    problem = None
    if metrics.malformed:
        shown = ", ".join(str(n) for n in metrics.malformed[:5]) + (", ..." if len(metrics.malformed) > 5 else "")
        problem = f"metrics.jsonl: {len(metrics.malformed)} malformed line(s) ({shown}) skipped"
    return metrics, problem


def _record(raw: dict) -> dict:
    """A metrics record as ``{iter, time, lr, loss, grad_norm}`` with finite numbers only."""
    return {
        "iter": int(raw["iter"]),
        "time": float(raw["time"]) if is_number(raw.get("time")) else None,
        "lr": float(raw["lr"]) if is_number(raw.get("lr")) else None,
        "loss": _per_step(raw.get("loss")),
        "grad_norm": _per_step(raw.get("grad_norm")),
    }





def _per_step(values: object) -> dict[str, float]:
    if not isinstance(values, dict):
        return {}
    return {str(k): float(v) for k, v in values.items() if is_number(v)}


def grids(run: Path) -> list[tuple[int, Path]]:
    """The sample grids written during training, ``(iteration, path)`` in order."""
    try:
        folder = run_file(run, "samples")
    except OutsideRoot:
        return []
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = GRID_NAME.fullmatch(path.name)
        if match and path.is_file() and path.resolve().is_relative_to(folder):
            found.append((int(match.group(1)), path))
    return sorted(found)


# ----------------------------------------------------------------- a run's summary
@dataclass
class RunSummary:
    """One row of the runs table. ``state``: running, stopping (running with a stop request pending),
    finished, interrupted, failed, stale (status says running but its process is gone: interrupted without a
    clean stop), or unknown (no status)."""

    name: str
    state: str
    method: str | None = None
    steps: str | None = None  # the student's NFE ("4"), or SFD-v's range ("2-5")
    iteration: int = 0
    total: int | None = None
    eta_s: float | None = None
    wall_s: float | None = None  # training seconds, summed over resumed runs
    error: str | None = None
    problems: list[str] = field(default_factory=list)


def summarize(run: Path, metrics: Metrics | None = None) -> RunSummary:
    """Status, method, steps, progress, ETA and wall time of the run in ``run``."""
    problems: list[str] = []
    if metrics is None:
        metrics, problem = read_metrics(run)
        problems += [problem] if problem else []
    status, problem = read_json(run, "status.json")
    problems += [problem] if problem else []
    config, problem = read_config(run)
    problems += [problem] if problem else []
    config = config or {}
    status = status or {}

    state = status.get("state") if isinstance(status.get("state"), str) else None
    if state == "running" and not pid_alive(status.get("pid")):
        state = "stale"
    if state == "running" and (run / STOP).is_file():
        state = "stopping"  # asked to stop: it ends after this iteration
    if state is None:
        report, _ = read_json(run, "report.json")
        state = "finished" if report is not None else "unknown"
    error = status.get("error") if isinstance(status.get("error"), str) else None

    method = config.get("method") if isinstance(config.get("method"), str) else None
    steps = _steps(config)
    total = next((v for v in (config.get("iters"), status.get("iters")) if is_number(v)), None)
    last = metrics.records[-1] if metrics.records else None
    iteration = last["iter"] if last else int(status["iteration"]) if is_number(status.get("iteration")) else 0
    wall = last["time"] if last else None
    eta = None
    if state == "running" and total and wall and iteration:
        eta = max(0.0, (int(total) - iteration) * wall / iteration)
    return RunSummary(
        run.name, state, method, steps, iteration, int(total) if total else None, eta, wall, error, problems
    )


def _steps(config: dict) -> str | None:
    """The student's step count as its method states it (SFD-v: its range)."""
    from distill_core.methods.registry import methods

    cls = methods().get(config.get("method")) if isinstance(config.get("method"), str) else None
    if cls is None:
        return str(config["steps"]) if is_number(config.get("steps")) else None
    return cls.steps_label(config)


def age(run: Path) -> float:
    """Seconds since the run last wrote its status or metrics (for picking the most recent run)."""
    stamps = [(run / f).stat().st_mtime for f in ("status.json", "metrics.jsonl") if (run / f).is_file()]
    return time.time() - max(stamps, default=run.stat().st_mtime)


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with TensorBoard's bias correction: weight 0 leaves the curve as it
    is, weight -> 1 flattens it."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i) if weight else v)
    return out
