"""Reports of a distillation run: an image grid as PNG (written with zlib, no imaging library),
``report.json`` (settings, timings and benchmark rows) and ``report.md`` (the same for people)."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import torch


def to_uint8_grid(rows: list[torch.Tensor], pad: int = 1) -> torch.Tensor:
    """Tile image batches ``[N, C, H, W]`` in [-1, 1], one batch per row, into ``[H', W', C]`` uint8."""
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


def save_grid(rows: list[torch.Tensor], path: str | Path, scale: int = 3) -> Path:
    """A PNG with one row of images per batch in ``rows`` (same noise and classes across rows)."""
    return write_png(to_uint8_grid(rows), path, scale)


def write_report(out: str | Path, report: dict, row_labels: list[str] | None = None) -> tuple[Path, Path]:
    """``report.json`` and ``report.md`` in ``out`` from ``report`` (with a ``rows`` list)."""
    from distill_core.eval.benchmark import format_table

    out = Path(out)
    json_path = out / "report.json"
    json_path.write_text(json.dumps(report, indent=1))
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
    md_path = out / "report.md"
    md_path.write_text("\n".join(lines))
    return json_path, md_path
