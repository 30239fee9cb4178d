"""Distillation methods: each is one module with a ``Method`` subclass registered by name
(``registry``); the trainer, student files, command line, nodes, panel and benchmarks find it there."""

from __future__ import annotations

from distill_core.methods.base import Method, MicroBatch, OptimSpec, StepLoss, TeacherSource
from distill_core.methods.registry import build_method, method_class, methods, register

__all__ = ["MicroBatch", "Method", "OptimSpec", "StepLoss", "TeacherSource", "build_method", "method_class",
           "methods", "register"]
