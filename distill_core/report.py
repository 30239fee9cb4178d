"""Reports of a distillation run: an image grid as PNG (written with zlib, no imaging library),
``report.json`` (settings, timings and benchmark rows) and ``report.md`` (the same for people)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import torch

from distill_core.atomic import atomic_path, write_json, write_text
from distill_core.plot import line_plot
from distill_core.train.metrics import is_number


def to_uint8_grid(rows: list[torch.Tensor], pad: int = 1) -> torch.Tensor:
    """Tile image batches ``[N, C, H, W]`` in [-1, 1], one batch per row, into ``[H', W', C]`` uint8. Images
    of other than 1 or 3 channels (latents without a decoder) show their first three (or first) channels."""
    rows = [r[:, :3] if r.shape[1] >= 3 else r[:, :1] for r in rows]
    n = max(r.shape[0] for r in rows)
    c, h, w = rows[0].shape[1:]
    grid = torch.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, c), 255, dtype=torch.uint8)
    for i, row in enumerate(rows):
        pixels = ((row.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
        for j, image in enumerate(pixels):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y : y + h, x : x + w] = image
    return grid


def write_png(pixels: torch.Tensor, path: str | Path, scale: int = 1) -> Path:
    """Write ``[H, W, C]`` uint8 (C = 1 or 3) as an 8-bit PNG, each pixel repeated ``scale`` times."""
    if scale > 1:
        pixels = pixels.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    h, w, c = pixels.shape
    color_type = {1: 0, 3: 2}[c]
    raw = b"".join(b"\x00" + bytes(pixels[y].flatten().tolist()) for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)
    return Path(path)


def save_grid(rows: list[torch.Tensor], path: str | Path, scale: int = 3) -> Path:
    """A PNG with one row of images per batch in ``rows`` (same noise and classes across rows)."""
    return write_png(to_uint8_grid(rows), path, scale)


def write_report(out: str | Path, report: dict, row_labels: list[str] | None = None) -> tuple[Path, Path]:
    """``report.json`` and ``report.md`` in ``out`` from ``report`` (with a ``rows`` list)."""
    from distill_core.eval.benchmark import format_table

    out = Path(out)
    json_path = write_json(out / "report.json", report)
    lines = [f"# Distillation report: {report['method']} to {report['steps']} steps", ""]
    lines += [f"- {k}: {v}" for k, v in report.items() if k not in ("rows", "config", "method", "steps")]
    lines += [
        "",
        "## Against the teacher's reference solve",
        "",
        "```",
        format_table(report["rows"]),
        "```",
        "",
    ]
    if row_labels:
        lines += ["## grid.png", "", "Rows, top to bottom: " + "; ".join(row_labels) + ".", ""]
    lines += ["## Settings", "", "```yaml", *(f"{k}: {v}" for k, v in report["config"].items()), "```", ""]
    return json_path, write_text(out / "report.md", "\n".join(lines))


def update_order(key: str) -> tuple:
    """Sort key of a metrics loss key: the exported network's updates ("0", "1", ...) first, then other
    groups' ("critic:0") by group and index."""
    group, _, index = key.rpartition(":")
    return (group, int(index))


def update_names(keys: list[str]) -> dict[str, str]:
    """Legend names of metrics loss keys: the exported network's "student" (one update) or "step k" (one
    per student step, counted from 1), another network's by its group ("fake_score", or "fake_score 2")."""
    groups = [key.rpartition(":")[0] for key in keys]
    names = {}
    for key, group in zip(keys, groups):
        index = int(key.rpartition(":")[2])
        if groups.count(group) == 1:
            names[key] = group or "student"
        else:
            names[key] = f"{group} {index + 1}" if group else f"step {index + 1}"
    return names


def loss_curve(metrics: list[dict], width: int = 640, height: int = 320) -> torch.Tensor:
    """A plot of ``metrics.jsonl`` records as ``[H, W, 3]`` uint8: loss on a log axis against iteration,
    one line per update (per student step, and per other trained network), with axes and a legend."""
    series: dict[str, list[tuple[float, float]]] = {}
    for r in metrics:
        for key, value in r.get("loss", {}).items():
            if is_number(value):
                series.setdefault(key, []).append((r["iter"], value))
    keys = sorted(series, key=update_order)
    names = update_names(keys)
    return line_plot({names[k]: series[k] for k in keys}, "training loss", "iteration", "loss (log scale)",
                     log_y=True, width=width, height=height)


def latent_rgb(latents: torch.Tensor, factors: list[list[float]], bias: list[float] | None = None) -> torch.Tensor:
    """A cheap preview of latents ``[N, C, H, W]`` as images ``[N, 3, H, W]`` in about [-1, 1]: a
    per-pixel linear map with the model family's RGB factors (ComfyUI's ``latent_rgb_factors``)."""
    weight = torch.tensor(factors, dtype=torch.float32, device=latents.device)  # [C, 3]
    rgb = torch.einsum("nchw,cr->nrhw", latents.float(), weight)
    if bias is not None:
        rgb = rgb + torch.tensor(bias, device=latents.device)[None, :, None, None]
    return rgb


def spaced_frames(count: int, most: int) -> torch.Tensor:
    """The indices of at most ``most`` of ``count`` frames, evenly spaced from the first to the last."""
    return torch.linspace(0, count - 1, min(most, count)).round().long()


def frame_strip(clips: torch.Tensor, most: int = 4) -> torch.Tensor:
    """Clips ``[N, C, F, H, W]`` as images ``[N, C, H, k W]``: k <= ``most`` frames evenly spaced from first to
    last, side by side (how a grid of images shows a clip)."""
    frames = clips[:, :, spaced_frames(clips.shape[2], most)]
    return frames.permute(0, 1, 3, 2, 4).flatten(3)


def as_images(samples: torch.Tensor) -> torch.Tensor:
    """Samples as a grid shows them: images ``[N, C, H, W]`` as they are, clips ``[N, C, F, H, W]`` as strips of
    their frames (``frame_strip``)."""
    return frame_strip(samples) if samples.ndim == 5 else samples


#: the frame rate of the animations ``write_clip`` writes (Wan's 16 frames a second)
CLIP_FPS = 16


def write_clip(frames: torch.Tensor, path: str | Path, fps: int = CLIP_FPS) -> Path:
    """Write a clip's frames ``[F, H, W, 3]`` uint8 as an animated WEBP that loops, ``fps`` frames a second."""
    import io

    from PIL import Image

    images = [Image.fromarray(frame.numpy()) for frame in frames]
    data = io.BytesIO()
    images[0].save(data, format="WEBP", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0,
                   quality=90)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.getvalue())
    return Path(path)


def preview_pixels(images: torch.Tensor, latent_format=None, columns: int = 8) -> torch.Tensor:
    """``[H, W, 3]`` uint8 of a batch in model space: pixels in [-1, 1] as they are, latents through
    ``latent_format``'s RGB factors (or their first three channels); at most ``columns`` images in a row.
    Clips ``[N, C, T, H, W]`` show one row each: ``columns`` frames evenly spaced from first to last."""
    images = images.detach().cpu().float()
    if images.ndim == 5:
        frames = spaced_frames(images.shape[2], columns)
        rows = [as_rgb(clip[:, frames].transpose(0, 1), latent_format) for clip in images[:columns]]
    else:
        rows = [as_rgb(images[:columns], latent_format)]
    grid = to_uint8_grid(rows)
    return grid.expand(-1, -1, 3).contiguous() if grid.shape[-1] == 1 else grid


def as_rgb(images: torch.Tensor, latent_format=None) -> torch.Tensor:
    """Images ``[N, C, H, W]`` in model space as ``[N, 3 or 1, H, W]`` in about [-1, 1]: latents through
    ``latent_format``'s RGB factors, else their first three channels."""
    factors = getattr(latent_format, "latent_rgb_factors", None)
    if factors is not None and images.shape[1] == len(factors):
        return latent_rgb(images, factors, getattr(latent_format, "latent_rgb_factors_bias", None))
    return images if images.shape[1] in (1, 3) else images[:, :3]
