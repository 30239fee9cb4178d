"""One declaration per node, turned into ComfyUI's classic node API (``INPUT_TYPES``, ``RETURN_TYPES``,
``RETURN_NAMES``, ``OUTPUT_TOOLTIPS``, ``FUNCTION``, ``CATEGORY``, ``DESCRIPTION``, ``OUTPUT_NODE``),
which every ComfyUI version loads. Node ids are stable and prefixed ``Distill``: saved workflows
store them. Every input and output carries a tooltip (a test checks)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

CATEGORY = "distill"
#: node id -> class, and node id -> menu name (what ``__init__.py`` exports to ComfyUI)
NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}


@dataclass(frozen=True)
class In:
    """A node input: a socket type ("MODEL", "INT", ...), a tuple of choices (a combo widget), or a
    function returning the choices when ComfyUI asks (file lists)."""

    name: str
    type: str | tuple[str, ...] | Callable[[], list[str]]
    tooltip: str
    default: object = None
    optional: bool = False
    options: dict = field(default_factory=dict)  # min, max, step, multiline, ...

    def declaration(self) -> tuple:
        opts = {"tooltip": self.tooltip, **self.options}
        if self.default is not None:
            opts["default"] = self.default
        kind = self.type() if callable(self.type) else self.type
        kind = list(kind) if isinstance(kind, tuple | list) else kind
        return (kind, opts)


@dataclass(frozen=True)
class Out:
    type: str
    name: str
    tooltip: str


def node(node_id: str, display: str, subcategory: str, description: str, inputs: list[In], outputs: list[Out],
         output_node: bool = False):
    """Class decorator: the class's ``run(**inputs)`` returns a tuple of ``outputs`` (or ComfyUI's
    ``{"ui": ..., "result": ...}``); the decorator adds the classic API and registers the node."""
    if not node_id.startswith("Distill"):
        raise ValueError(f"node ids start with 'Distill', got {node_id!r}")

    def register(cls: type) -> type:
        def input_types(_cls) -> dict:
            optional = {i.name: i.declaration() for i in inputs if i.optional}
            return {
                "required": {i.name: i.declaration() for i in inputs if not i.optional},
                **({"optional": optional} if optional else {}),
                "hidden": {"unique_id": "UNIQUE_ID"},
            }

        cls.INPUT_TYPES = classmethod(input_types)
        cls.INPUTS = tuple(inputs)
        cls.RETURN_TYPES = tuple(o.type for o in outputs)
        cls.RETURN_NAMES = tuple(o.name for o in outputs)
        cls.OUTPUT_TOOLTIPS = tuple(o.tooltip for o in outputs)
        cls.FUNCTION = "run"
        cls.CATEGORY = f"{CATEGORY}/{subcategory}"
        cls.DESCRIPTION = description
        cls.OUTPUT_NODE = output_node
        if node_id in NODE_CLASS_MAPPINGS:
            raise ValueError(f"node id {node_id!r} is declared twice")
        NODE_CLASS_MAPPINGS[node_id] = cls
        NODE_DISPLAY_NAME_MAPPINGS[node_id] = display
        return cls

    return register


def seed(tooltip: str = "noise seed") -> In:
    """A seed widget (ComfyUI adds its fixed / increment / randomize control)."""
    return In("seed", "INT", tooltip, 0, options={"min": 0, "max": 2**31 - 1, "control_after_generate": True})
