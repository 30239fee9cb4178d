"""Command line: ``python -m distill_core <command>`` (also the ``distill-core`` console script).

Each command lives in the module that owns it; this file only wires subcommands to them.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from distill_core.stages import show_stages

#: subcommand -> (module with ``add_arguments(parser)`` and ``run(args)``, help text)
COMMANDS = {
    "distill": ("distill_core.main_job", "distil a teacher into a few-step student (the main job)"),
    "precompute": ("distill_core.main_job", "solve a run's teacher targets into --teacher-cache ahead of training "
                   "(the distill command's flags)"),
    "train-teacher": ("distill_core.train_builtin", "re-train the built-in reference teacher"),
    "finetune-teacher": ("distill_core.finetune_builtin", "fine-tune the built-in teacher to bold digits (a LoRA)"),
    "train-classifier": ("distill_core.train_builtin", "re-train the built-in metric classifier"),
    "compare": ("distill_core.compare", "students of any methods side by side with their teacher and the best "
                "solvers: a labelled grid and a table"),
    "sample": ("distill_core.sample_command", "images from a student file: a row per prompt or class, the same "
               "noise in every row"),
    "export-diffusers": ("distill_core.export_diffusers", "a text-to-image pipeline's student (SD1.x to SDXL, SD3, "
                         "Flux, Qwen-Image, ...) as diffusers files: a LoRA or the network, an Euler scheduler and "
                         "the sigmas to sample it with"),
    "run-workflow": ("distill_core.workflow", "run an API-format workflow of this pack's nodes without ComfyUI"),
    "ui-workflow": ("distill_core.workflow", "write the UI-format twin of an API-format workflow"),
    "reference-stats": ("distill_core.eval.frechet", "recompute the classifier-feature statistics of the test digits"),
    "panel": ("distill_core.panel.launch", "serve the monitoring panel over a runs root (Gradio, 127.0.0.1)"),
}


#: the exit status of a command stopped early (Ctrl-C, a stop request), as a shell gives it; a run so stopped
#: can be resumed
INTERRUPTED = 130
#: what bad input and the system's refusals raise: shown as one line (the traceback with --debug)
USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError, ImportError)
PATH_FIX = "give a path whose folder exists and that this user may read and write"
SPACE_FIX = "free some space and run it again: with --resume a run goes on from its last checkpoint"
#: the fix for what the system said, by errno; a path's other errors get PATH_FIX
OS_FIXES = {errno.EEXIST: "a file stands where a folder goes: give a folder's path", errno.ENOSPC: SPACE_FIX,
            errno.EDQUOT: SPACE_FIX}


def os_problem(e: BaseException) -> str | None:
    """The line for an error the system raised (``[Errno 13] Permission denied: 'x'``): the path where it names
    one, the system's words and the fix; ``None`` for the others, whose own message is the line."""
    if not isinstance(e, OSError) or len(e.args) != 2 or (e.filename is None and e.errno not in OS_FIXES):
        return None
    where = "" if e.filename is None else f"{e.filename}: "
    return f"{where}{e.strerror.lower()} ({OS_FIXES.get(e.errno, PATH_FIX)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distill_core", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        adder = getattr(mod, "add_arguments_" + name.replace("-", "_"), None) or mod.add_arguments
        runner = getattr(mod, "run_" + name.replace("-", "_"), None) or mod.run
        adder(p)
        p.set_defaults(_run=runner)
    args = parser.parse_args(argv)
    show_stages(not getattr(args, "no_progress", False))
    try:
        return int(args._run(args) or 0)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"error: {os_problem(e) or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C in training, or one while a command samples: files are written whole
        if args.debug:
            raise
        print("\nstopped (Ctrl-C)", file=sys.stderr)
        return INTERRUPTED
    finally:
        end_process_group()


def end_process_group() -> None:
    """Leave a multi-process launch's process group (``accelerate launch``): a process that exits inside one
    is aborted by the collective library."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
