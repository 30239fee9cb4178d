"""**Distill monitor**: the Gradio panel (``distill_core.panel``) over this ComfyUI's training runs
(``output/distill_runs``), started once inside the ComfyUI process; the ``/distill/monitor`` route the web
extension's "open monitor" button calls to start it and learn its URL, and the ``/distill/training_nodes``
route that tells the web extension which nodes train."""

from __future__ import annotations

import asyncio

from distill_core.panel.launch import DEFAULT_HOST, launch_once

from . import host
from .spec import In, Out, node


def monitor_url(port: int = 0) -> str:
    """Start the panel over the runs folder (once per process) and return its URL."""
    runs = host.runs_folder()
    runs.mkdir(parents=True, exist_ok=True)
    return launch_once(runs, DEFAULT_HOST, port or None)


@node("DistillMonitor", "Distill monitor", "monitor",
      "Starts the Distill panel (live runs, loss curves, teacher-vs-student grids over training time) in this "
      "ComfyUI process, bound to 127.0.0.1, and returns its URL; later runs return the running panel's URL.",
      inputs=[In("port", "INT", "port of the panel (0: the first free one from 7860); only the first start uses it",
                 0, options={"min": 0, "max": 65535})],
      outputs=[Out("STRING", "url", "the panel's address: open it in a browser on this machine")],
      output_node=True)
class Monitor:
    def run(self, port: int, unique_id=None):
        url = monitor_url(port)
        return {"ui": {"text": [url]}, "result": (url,)}


def register_routes(training_nodes: list[str]) -> None:
    """On ComfyUI's server (nothing outside ComfyUI): ``GET /distill/monitor`` -> ``{"url": ...}``, and
    ``GET /distill/training_nodes`` -> the ids of the nodes that train (the web extension draws progress
    on them)."""
    server = host.prompt_server()
    if server is None:
        return
    from aiohttp import web  # ComfyUI's server is built on it

    @server.routes.get("/distill/training_nodes")
    async def training(request):
        return web.json_response(training_nodes)

    @server.routes.get("/distill/monitor")
    async def open_monitor(request):
        try:  # the first start takes seconds: off ComfyUI's event loop, which serves the progress of runs meanwhile
            url = await asyncio.get_running_loop().run_in_executor(None, monitor_url)
            return web.json_response({"url": url})
        except Exception as e:  # shown by the web extension next to the button
            return web.json_response({"error": f"{type(e).__name__}: {e}"}, status=500)
