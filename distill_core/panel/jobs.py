"""Distillations started from the panel: each is ``python -m distill_core distill`` in its own process,
writing a new run directory under the runs root (so the panel reads it like any other run).

Stopping a run that trains writes its stop request (``train.status.STOP``), which the trainer treats as
Ctrl-C: it finishes the iteration, writes a checkpoint and exits; ``python -m distill_core distill
--resume --config RUN/config.yaml`` continues. A file, not a signal: Stop works on Windows too, and on any
run under the root that trains, whoever started it. A process this panel started that does not train (still
loading the teacher, or writing the report of a saved student) has nothing to checkpoint and is ended.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

import yaml

import distill_core
from distill_core.config import DistillConfig
from distill_core.methods import auto
from distill_core.methods.registry import method_class
from distill_core.panel.runs import summarize
from distill_core.sources import TEACHERS
from distill_core.train.status import request_stop

#: A run name: a single path component, no leading dot.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: run settings that are paths: the panel's options may not set them (its runs stay inside the runs root)
PATH_SETTINGS = {"out", "teacher", "prompts", "images", "teacher_cache", "init_from"}
#: run settings that the start form's own fields set
FORM_SETTINGS = {"method", "steps", "iters", "batch"}
LOG = "log.txt"
#: the folder under the runs root whose teacher files (``train-teacher --out``) the start form offers
TEACHER_FOLDER = "teachers"


def teacher_choices(root: str | Path) -> list[str]:
    """The teachers a run the panel starts may distil: the built-in ones, then the digits teacher files directly
    in ``root/teachers`` (their cards say ``kind: teacher``; a link out of the folder is left out), as
    ``teachers/NAME.safetensors``."""
    from distill_core.safetensors_io import read_card

    folder = Path(root).resolve() / TEACHER_FOLDER
    files = []
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            inside = path.is_file() and path.resolve().parent == folder
            if inside and read_card(path).get("kind") == "teacher":
                files.append(f"{TEACHER_FOLDER}/{path.name}")
        except (OSError, ValueError):  # unreadable, or no engine card: not offered
            continue
    return [*TEACHERS, *files]


class Jobs:
    """The distillation processes this panel started, by run name."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.procs: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()

    def start(self, name: str, teacher: str, method: str, steps: int, iters: int, batch: int,
              options: str = "") -> Path:
        """Start distilling ``teacher`` (one of ``teacher_choices``) with ``method`` (a registered one, or "auto":
        the one ``auto.resolve`` chooses, whose line the run prints and reports) to ``steps`` evaluations (and
        what follows from them: SFD-v's range 2..steps) for ``iters`` iterations of ``batch`` into ``root/name``,
        with the method's settings in ``options`` (YAML; ``method_options`` gives the defaults; not the form's
        own fields, nor files or folders); sample grids every tenth of the run unless the options say otherwise.
        A teacher file goes into the run's config as its absolute path, so its student's file names it from
        anywhere. Raises ``ValueError`` for a bad or taken name or settings."""
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ValueError(f"refused: a run name is letters, digits, '.', '_' or '-' (got {name!r})")
        if teacher not in teacher_choices(self.root):
            raise ValueError(f"refused: the panel distils the built-in teachers {', '.join(TEACHERS)} and the teacher "
                             f"files in {TEACHER_FOLDER}/ under the runs root (got {teacher!r}); a teacher from a "
                             "diffusers folder runs from the command line")
        try:
            steps, iters, batch = int(steps), int(iters), int(batch)
        except (TypeError, ValueError):
            raise ValueError("refused: steps, iterations and batch are whole numbers") from None
        try:
            settings = yaml.safe_load(options or "") or {}
            chosen, derived, chose = auto.resolve(method, steps, teacher)
        except (yaml.YAMLError, ValueError) as e:
            raise ValueError(f"refused: {e}") from None
        if not isinstance(settings, dict):
            raise ValueError("refused: the method's options are a YAML mapping of settings to values")
        named = sorted(PATH_SETTINGS & set(settings))
        if named:
            raise ValueError(f"refused: the options cannot name files or folders ({', '.join(named)}): a run the "
                             "panel starts reads and writes only its own folder under the runs root")
        named = sorted(FORM_SETTINGS & set(settings))
        if named:
            raise ValueError(f"refused: the form's own fields set {', '.join(named)}; the options hold the method's "
                             "other settings")
        out = self.root / name
        try:
            cfg = DistillConfig(**{"sample_every": max(1, iters // 10), **settings, **derived,
                                   "teacher": teacher if teacher in TEACHERS else str(self.root.resolve() / teacher),
                                   "method": chosen, "steps": steps, "iters": iters, "batch": batch,
                                   "out": str(out)})
        except (TypeError, ValueError) as e:
            raise ValueError(f"refused: {e}") from None
        with self.lock:
            self.root.mkdir(parents=True, exist_ok=True)
            try:
                out.mkdir()
            except FileExistsError:
                raise ValueError(f"refused: a run named {name!r} exists already") from None
            config = cfg.to_yaml(out / "config.yaml")
            with open(out / LOG, "wb") as log:
                self.procs[name] = subprocess.Popen(
                    [*command_line(), "distill", "--config", str(config), "--no-progress",
                     *(["--method", "auto"] if chose else [])],  # the run prints and reports auto's choice
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
        return out

    def alive(self, name: str) -> bool:
        """Whether the process this panel started for ``name`` is still running (reaps it if not)."""
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def stop(self, name: str) -> str:
        """Ask the run ``name`` to stop (a stop request: checkpoint, then exit), whichever process trains it (this
        panel's, a command line's, a ComfyUI node's); end a process this panel started while it does not train.
        A message for the user."""
        if not name:
            return "choose the run to stop"
        if not isinstance(name, str) or not NAME.fullmatch(name):
            return f"refused: {name!r} is not a run name"
        run = self.root / name
        state = summarize(run).state if run.is_dir() else None
        if state == "stopping":
            return f"{name!r} is stopping: it saves a checkpoint after this iteration"
        if self.alive(name) and state != "running":
            self.procs[name].terminate()
            return (f"stopped {name!r}: it was not training (loading the teacher, or writing the report of its "
                    "saved student)")
        if state != "running":
            return f"{name!r} is not training"
        request_stop(run)
        return f"stopping {name!r}: it saves a checkpoint after this iteration (resume with --resume)"

    def exit_code(self, name: str) -> int | None:
        """The exit status of a finished process this panel started (``None`` while running or unknown)."""
        proc = self.procs.get(name)
        return None if proc is None else proc.poll()


def command_line() -> list[str]:
    """``python -m distill_core`` for a child process, importing this very package wherever it was loaded from
    (a ComfyUI custom node): its folder goes first on the child's ``sys.path`` from the command line, not from
    ``PYTHONPATH``, which an isolated Python ignores (ComfyUI's Windows portable build, with its ``._pth``
    file)."""
    package_parent = str(Path(distill_core.__file__).resolve().parents[1])
    boot = "import sys; sys.path.insert(0, sys.argv.pop(1)); from distill_core.cli import main; sys.exit(main())"
    return [sys.executable, "-c", boot, package_parent]


def start_form(method: str, steps: int, teacher: str) -> tuple[str | None, int | None, int | None, str]:
    """What the start form shows for ``method`` at ``steps`` steps of ``teacher``: the settings of the method
    it trains (``method_options``), the iterations and batch of auto's preset, and auto's line saying what it
    chose and why ("" for a method picked by name). ``None``: what the form shows stands."""
    try:
        chosen, derived, chose = auto.resolve(method, int(steps), teacher)
    except (TypeError, ValueError) as e:
        return None, None, None, f"refused: {e}"
    return method_options(chosen), derived.get("iters"), derived.get("batch"), chose or ""


def method_options(method: str) -> str:
    """The settings of ``method`` with their defaults, as the YAML the start form shows."""
    from dataclasses import asdict

    cls = method_class(method)
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cls.Config()).items()}
    return yaml.safe_dump(values, sort_keys=False)
