"""Methods by name. ``@register("name")`` on a ``Method`` subclass adds it; installed packages add theirs
through the ``distill_core.methods`` entry-point group, loaded on first lookup: an entry point
``name = package.module:Class`` registers the class under its name (one that names a module registers what
the module's ``@register`` decorators declare), so a researcher ships a method without forking. The command
line, the nodes, the panel and the benchmarks all read this one table."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "distill_core.methods"
#: the modules of the methods this package ships
BUILT_IN = ("distill_core.methods.sfd", "distill_core.methods.phased", "distill_core.methods.dmd2",
            "distill_core.methods.moments", "distill_core.methods.phased_dmd", "distill_core.methods.lcm",
            "distill_core.methods.reflow", "distill_core.methods.kd",
            "distill_core.methods.progressive", "distill_core.methods.sfddm")

_REGISTRY: dict[str, type] = {}
_loaded = False


def register(name: str):
    """Class decorator: ``cls`` is the method ``name`` (a name is taken once)."""

    def add(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a method named {name!r} is registered already ({_REGISTRY[name].__qualname__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILT_IN:
        importlib.import_module(module)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        if isinstance(obj, type):
            register(ep.name)(obj)


def methods() -> dict[str, type]:
    """Every registered method, by name, in registration order."""
    _load()
    return dict(_REGISTRY)


def method_class(name: str) -> type:
    _load()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def build_method(source, cfg):
    """The method of ``cfg.method`` on the teacher ``source``."""
    return method_class(cfg.method)(source, cfg)
