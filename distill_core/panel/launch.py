"""Serving the panel: ``python -m distill_core panel`` (blocking), or ``launch_once`` inside a host
process such as ComfyUI (a background server, started once per process).

The server binds to 127.0.0.1 unless told otherwise; it makes no request to the network (analytics
off, system fonts instead of web fonts, no server-side rendering).
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

DEFAULT_ROOT = "runs"
DEFAULT_HOST = "127.0.0.1"

_lock = threading.Lock()
_url: str | None = None


def _launch(runs_root: str | Path, host: str, port: int | None, block: bool) -> str:
    from distill_core.panel.app import build, offline_theme

    _, url, _ = build(runs_root).launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        quiet=not block,
        show_error=True,
        ssr_mode=False,
        theme=offline_theme(),
    )
    return url


def launch_once(runs_root: str | Path, host: str = DEFAULT_HOST, port: int | None = None) -> str:
    """Start the panel over ``runs_root`` in a background thread of this process and return its URL;
    later calls (any arguments) return the URL of the panel already running. ``port=None``: the first
    free port from 7860 on."""
    global _url
    with _lock:
        if _url is None:
            _url = _launch(runs_root, host, port, block=False)
        return _url


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", default=DEFAULT_ROOT, help=f"the runs root: one run per folder (default {DEFAULT_ROOT})")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=int, help="port (default: the first free one from 7860)")


def run(args: argparse.Namespace) -> int:
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    _launch(args.runs, args.host, args.port, block=True)
    return 0
