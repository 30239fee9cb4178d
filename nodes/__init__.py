"""ComfyUI nodes over the engine (thin: declarations and ComfyUI plumbing, no maths). Importing this
package registers every node in ``spec.NODE_CLASS_MAPPINGS``; it imports without ComfyUI."""

from . import compare, distill, files, monitor, phased, sampling, teachers  # noqa: F401 (each module registers its nodes)
from .spec import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

monitor.register_route()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
