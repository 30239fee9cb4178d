"""Figures as images (``[H, W, 3]`` uint8, the layout of a ComfyUI IMAGE before batching), drawn with Pillow
(no plotting library): line plots with a title, axes with round tick values, axis labels and a legend;
image grids with a name beside each row; tables."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

#: line colours, in the order series are drawn
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127))
AXIS, GRID, TEXT = (90, 90, 90), (232, 232, 232), (30, 30, 30)


def nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """At most about ``count`` round values (spacing 1, 2 or 5 x 10^k) inside [lo, hi]."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def log_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Tick positions (log10 values) for a log axis over log10 values [lo, hi]: whole decades where the range
    spans at least one, else round values inside it."""
    if hi - lo >= 1:
        decades = list(range(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1))
        stride = math.ceil(len(decades) / count)
        return [float(d) for d in decades[::stride]]
    return [math.log10(v) for v in nice_ticks(10**lo, 10**hi, count) if v > 0]


def tick_label(value: float) -> str:
    """A tick value in at most three significant digits ("0.0032", "1e+04")."""
    return f"{value:.3g}"


def font(size: int) -> ImageFont.ImageFont:
    """Pillow's own font at ``size`` px (scalable where Pillow has FreeType, else its bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or without FreeType
        return ImageFont.load_default()


def line_plot(series: dict[str, list[tuple[float, float]]], title: str, x_label: str, y_label: str,
              log_y: bool = False, width: int = 640, height: int = 320) -> torch.Tensor:
    """Each named series of (x, y) points as a coloured line, y on a log10 axis with ``log_y`` (points with
    y <= 0 are left out there), with the legend in the top right corner of the plot area."""
    if log_y:
        series = {k: [(x, math.log10(y)) for x, y in s if y > 0] for k, s in series.items()}
    series = {k: s for k, s in series.items() if s}
    size = max(8, min(13, height // 22))
    face = font(size)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 5 * size + 2 * size, width - size, 2 * size, height - 3 * size
    draw.text((width // 2, size // 3), title, fill=TEXT, font=face, anchor="ma")
    draw.text(((left + right) // 2, height - size // 3), x_label, fill=TEXT, font=face, anchor="md")
    label = Image.new("RGB", (int(draw.textlength(y_label, font=face)) + 2, size + 4), "white")
    ImageDraw.Draw(label).text((1, 1), y_label, fill=TEXT, font=face)
    label = label.rotate(90, expand=True)
    image.paste(label, (1, max(0, (top + bottom - label.height) // 2)))
    if right - left < 4 or bottom - top < 4 or not series:
        draw.rectangle((left, top, max(left, right), max(top, bottom)), outline=AXIS)
        if not series:
            draw.text(((left + right) // 2, (top + bottom) // 2), "no values yet", fill=TEXT, font=face, anchor="mm")
        return torch.from_numpy(np.array(image, dtype=np.uint8))

    xs = [x for s in series.values() for x, _ in s]
    ys = [y for s in series.values() for _, y in s]
    x_lo, x_hi, y_lo, y_hi = min(xs), max(xs), min(ys), max(ys)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 0.5, x_hi + 0.5
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_lo) / (x_hi - x_lo) * (right - left),
                bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))

    for y in log_ticks(y_lo, y_hi) if log_y else nice_ticks(y_lo, y_hi):
        _, py = to_px(x_lo, y)
        draw.line((left, py, right, py), fill=GRID)
        draw.line((left - 3, py, left, py), fill=AXIS)
        draw.text((left - 5, py), tick_label(10**y if log_y else y), fill=TEXT, font=face, anchor="rm")
    for x in nice_ticks(x_lo, x_hi):
        px, _ = to_px(x, y_lo)
        draw.line((px, bottom, px, bottom + 3), fill=AXIS)
        draw.text((px, bottom + 4), tick_label(x), fill=TEXT, font=face, anchor="ma")
    draw.rectangle((left, top, right, bottom), outline=AXIS)

    for k, points in enumerate(series.values()):
        colour = COLOURS[k % len(COLOURS)]
        pixels = [to_px(x, y) for x, y in sorted(points)]
        if len(pixels) == 1:
            (px, py), = pixels
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
        else:
            draw.line(pixels, fill=colour, width=2 if height >= 200 else 1)

    names = list(series)
    legend_w = size * 2 + max(int(draw.textlength(n, font=face)) for n in names) + size
    x0, y0 = right - legend_w - size // 2, top + size // 2
    draw.rectangle((x0, y0, x0 + legend_w, y0 + len(names) * (size + 4) + 4), fill="white", outline=GRID)
    for k, name in enumerate(names):
        y = y0 + 4 + k * (size + 4) + size // 2
        draw.line((x0 + 4, y, x0 + 4 + size, y), fill=COLOURS[k % len(COLOURS)], width=3)
        draw.text((x0 + 8 + size, y), name, fill=TEXT, font=face, anchor="lm")
    return torch.from_numpy(np.array(image, dtype=np.uint8))


def labelled_grid(rows: list[tuple[str, torch.Tensor]], pad: int = 2, min_row_height: int = 48) -> torch.Tensor:
    """One row per (name, images) entry, images uint8 ``[N, h, w, 3]`` of one size, tiled left to right after
    a column with the row's name; images lower than ``min_row_height`` are enlarged by a whole factor
    (nearest neighbour)."""
    h, w = rows[0][1].shape[1:3]
    scale = max(1, -(-min_row_height // h))
    h, w = h * scale, w * scale
    size = max(9, min(14, h // 3))
    face = font(size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(measure.textlength(name, font=face)) for name, _ in rows) + 2 * size // 2 + pad
    n = max(images.shape[0] for _, images in rows)
    image = Image.new("RGB", (label_w + n * (w + pad) + pad, len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(image)
    for i, (name, images) in enumerate(rows):
        y = pad + i * (h + pad)
        draw.text((size // 2, y + h // 2), name, fill=TEXT, font=face, anchor="lm")
        big = images.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        for j, picture in enumerate(big):
            image.paste(Image.fromarray(picture.numpy()), (label_w + pad + j * (w + pad), y))
    return torch.from_numpy(np.array(image, dtype=np.uint8))


def table_image(cells: list[list[str]], size: int = 14) -> torch.Tensor:
    """``cells`` (a header line, then one line per row) as a table: left-aligned columns, the header
    underlined, light rules between rows."""
    face = font(size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [max(int(measure.textlength(line[k], font=face)) for line in cells) + 2 * size
              for k in range(len(cells[0]))]
    line_h = size + size // 2 + 2
    image = Image.new("RGB", (sum(widths) + size, len(cells) * line_h + size), "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(cells):
        y = size // 2 + i * line_h
        x = size // 2
        for text, width in zip(line, widths):
            draw.text((x, y + line_h // 2), text, fill=TEXT, font=face, anchor="lm")
            x += width
        rule = AXIS if i == 0 else GRID
        draw.line((size // 2, y + line_h, image.width - size // 2, y + line_h), fill=rule)
    return torch.from_numpy(np.array(image, dtype=np.uint8))
