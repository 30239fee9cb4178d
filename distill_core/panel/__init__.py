"""The monitoring panel: a Gradio app over a runs root (``runs`` reads run directories, ``app`` is the
UI, ``jobs`` starts and stops distillations, ``launch`` serves it)."""

from distill_core.panel.launch import launch_once

__all__ = ["launch_once"]
