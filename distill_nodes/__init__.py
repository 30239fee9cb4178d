"""ComfyUI nodes over the engine (thin: declarations and ComfyUI plumbing, no maths). Importing this
package registers every node in ``spec.NODE_CLASS_MAPPINGS``, the training nodes generated from the
registered methods (``training``); it imports without ComfyUI."""

from . import compare, files, image_prompts, monitor, sampling, teachers, training  # noqa: F401 (each module registers its nodes)
from .spec import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

TRAINING_NODES = training.register_training_nodes()
monitor.register_routes(TRAINING_NODES)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "TRAINING_NODES"]
