"""The long steps that show no progress bar of their own (loading a pipeline's text encoders and network, encoding
its prompts and images, the report's reference solves and solvers), each announced in one line as it starts, by
the ``distill_core`` logger at INFO: the command line shows the lines on stderr unless told ``--no-progress``
(``show_stages``), ComfyUI in its console, a script wherever it sends its logging.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

LOG = logging.getLogger("distill_core")


class _Stderr(logging.Handler):
    """Each line to the ``sys.stderr`` of the moment it is written (a captured or redirected one included)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr, flush=True)


_HANDLER = _Stderr()


def show_stages(shown: bool) -> None:
    """The command line's stage lines on stderr (``shown``), or none; the logger's lines stay the command's alone."""
    LOG.propagate = False
    LOG.setLevel(logging.INFO if shown else logging.WARNING)
    if _HANDLER not in LOG.handlers:
        LOG.addHandler(_HANDLER)


def announce(step: str) -> None:
    """The line of a long step that begins now."""
    LOG.info(step)


def counted(n: int, thing: str) -> str:
    """``n`` things in words: "1 prompt", "3 prompts"."""
    return f"{n} {thing}{'' if n == 1 else 's'}"


def weights_size(folder: Path) -> str:
    """How much the safetensors weights in ``folder`` hold on disk, for a line that announces their loading
    ("9.6 GB")."""
    total = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return f"{total / 1e9:.1f} GB" if total >= 1e8 else f"{total / 1e6:.1f} MB"
