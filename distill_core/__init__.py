"""comfyui-distill's engine: turn a many-step diffusion model into a few-step student.

Everything speaks one convention: a denoiser maps ``(x, sigma, cond) -> x0`` with sigma in the
variance-exploding sense of EDM / k-diffusion (``x = x0 + sigma * n``).
"""

__version__ = "0.1.0"
