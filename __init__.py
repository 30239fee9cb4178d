"""ComfyUI entry point of comfyui-distill. Imports cleanly without ComfyUI installed.

ComfyUI imports this folder as a package but does not put it on ``sys.path``; the engine
(``distill_core``, next to this file) is imported by absolute name, so the folder is appended when the
engine is not installed (appended, not prepended: ComfyUI's own top-level modules keep priority)."""

import importlib.util
import os
import sys

if importlib.util.find_spec("distill_core") is None:
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))

from .distill_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
