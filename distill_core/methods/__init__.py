"""Distillation methods, by name. A new method is one module implementing ``base.Method`` and one
entry here; the trainer, student files, CLI, nodes and benchmarks find it by name."""

from __future__ import annotations

from distill_core.config import DistillConfig
from distill_core.methods.base import Method, StepLoss, TeacherSource
from distill_core.methods.phased import Phased
from distill_core.methods.sfd import SFD

#: method name -> class constructed as ``cls(source: TeacherSource, cfg: DistillConfig)``
REGISTRY: dict[str, type] = {"sfd": SFD, "sfd-v": SFD, "phased": Phased}


def build_method(source: TeacherSource, cfg: DistillConfig) -> Method:
    if cfg.method not in REGISTRY:
        raise ValueError(f"unknown method {cfg.method!r}; available: {sorted(REGISTRY)}")
    return REGISTRY[cfg.method](source, cfg)


__all__ = ["REGISTRY", "Method", "StepLoss", "TeacherSource", "build_method"]
