"""Serving the panel: ``python -m distill_core panel`` (blocking), or ``launch_once`` inside a host
process such as ComfyUI (a background server, started once per process).

The server binds to 127.0.0.1 unless told otherwise; it makes no request to the network (analytics
off, system fonts instead of web fonts, no server-side rendering). It answers only requests whose Host
header names this machine (``localhost``, ``127.0.0.1``, ``::1``) or a name given with ``--allow-host``:
a web page elsewhere cannot reach it through a DNS name that resolves here (DNS rebinding). ``--auth
USER:PASSWORD`` adds a login; uploads are capped at 1 MB (the panel takes none). Requests to this machine
go past any proxy the environment names.
"""

from __future__ import annotations

import argparse
import inspect
import os
import signal
import threading
from pathlib import Path

from distill_core.options import whole_number

DEFAULT_ROOT = "runs"
DEFAULT_HOST = "127.0.0.1"
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")
#: this machine's names as ``NO_PROXY`` lists hosts (no brackets around an IPv6 address)
LOOPBACK = tuple(name for name in LOCAL_NAMES if not name.startswith("["))

_lock = threading.Lock()
_url: str | None = None


def serve_options(host: str = DEFAULT_HOST, allowed_hosts: tuple[str, ...] = (),
                  auth: tuple[str, str] | None = None) -> dict:
    """``Blocks.launch`` settings of the panel: bound to ``host``, answering only the Host names of this
    machine, ``host`` itself and ``allowed_hosts``, with an optional login and no uploads to speak of."""
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    from distill_core.panel.app import offline_theme

    names = [*LOCAL_NAMES, *allowed_hosts, *([] if host in ("0.0.0.0", "::") else [host])]
    return {
        "server_name": host,
        "app_kwargs": {"middleware": [Middleware(TrustedHostMiddleware, allowed_hosts=names)]},
        "auth": auth,
        "max_file_size": "1mb",
        "show_error": True,
        "ssr_mode": False,
        "theme": offline_theme(),
    }


def loopback_without_proxy() -> None:
    """Send requests to this machine past any proxy the environment names (``HTTP_PROXY``, ``ALL_PROXY``):
    Gradio's launch calls its own server over HTTP, which a proxy would receive and refuse. Adds the loopback
    names to ``NO_PROXY`` (and ``no_proxy``), keeping what they held."""
    for key in ("NO_PROXY", "no_proxy"):
        held = [name.strip() for name in os.environ.get(key, "").split(",") if name.strip()]
        os.environ[key] = ",".join([*held, *(name for name in LOOPBACK if name not in held)])


def _launch(runs_root: str | Path, host: str, port: int | None, block: bool, allowed_hosts: tuple[str, ...] = (),
            auth: tuple[str, str] | None = None) -> str:
    from distill_core.panel.app import build

    loopback_without_proxy()
    demo = build(runs_root)
    # Gradio's launch has called the server's startup route when it returns; its further check of the page gives
    # up at the first request that takes 3 s (a busy machine: a training run beside it), so it is left out
    quick = {"_frontend": False} if "_frontend" in inspect.signature(demo.launch).parameters else {}
    try:
        _, url, _ = demo.launch(server_port=port, prevent_thread_lock=not block, quiet=not block,
                                **quick, **serve_options(host, allowed_hosts, auth))
    except OSError:
        if port is None:
            raise
        raise ValueError(f"port {port} cannot be bound on {host} (another server holds it, or the system reserves "
                         "it): give another --port, or none for the first free one from 7860") from None
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
    p.add_argument("--port", type=whole_number(1, 65535, "a port from 1 to 65535 (or none: the first free from 7860)"),
                   help="port (default: the first free one from 7860)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests for this Host name (the machine's name on your network)")
    p.add_argument("--auth", metavar="USER:PASSWORD", help="ask for this login")


def run(args: argparse.Namespace) -> int:
    auth = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not (sep and user and password):
            raise ValueError("--auth takes USER:PASSWORD")
        auth = (user, password)
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    # Ctrl-C stops the server even where the shell started it with SIGINT ignored (``nohup ... &``)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _launch(args.runs, args.host, args.port, True, tuple(args.allow_host), auth)
    return 0
