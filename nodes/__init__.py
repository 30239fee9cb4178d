"""ComfyUI nodes over the engine (thin: no maths here). The node pack lands with the node issue."""

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
