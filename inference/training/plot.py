"""Loss-curve PNGs drawn with Pillow (no matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
    if len(y) < 2 * k or k < 2:
        return y
    kernel = np.ones(k) / k
    return np.convolve(np.pad(y, (k // 2, k - 1 - k // 2), mode="edge"), kernel, mode="valid")


def loss_curve(path: str | Path, series: dict[str, Sequence[tuple[int, float]]], title: str,
               log_y: bool = True, size: tuple[int, int] = (800, 480)) -> Path:
    """Plot named series of (step, value) points; smoothed lines, log y axis by default."""
    w, h = size
    left, right, top, bottom = 70, 20, 30, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    pts = {k: np.array(v, dtype=np.float64) for k, v in series.items() if len(v)}
    d.text((left, 8), title, fill=(0, 0, 0), font=font)
    if not pts:
        img.save(path)
        return Path(path)
    xs = np.concatenate([p[:, 0] for p in pts.values()])
    ys = np.concatenate([p[:, 1] for p in pts.values()])
    ys = ys[np.isfinite(ys) & ((ys > 0) if log_y else True)]
    tf = (lambda v: np.log10(np.maximum(v, 1e-12))) if log_y else (lambda v: v)
    x0, x1 = float(xs.min()), float(max(xs.max(), xs.min() + 1))
    y0, y1 = (float(tf(ys).min()), float(tf(ys).max())) if len(ys) else (0.0, 1.0)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (w - left - right),
                h - bottom - (tf(y) - y0) / (y1 - y0) * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    for i in range(5):
        fy = y0 + (y1 - y0) * i / 4
        yy = h - bottom - (fy - y0) / (y1 - y0) * (h - top - bottom)
        label = f"{10 ** fy:.3g}" if log_y else f"{fy:.3g}"
        d.line([left - 4, yy, left, yy], fill=(0, 0, 0))
        d.text((4, yy - 6), label, fill=(0, 0, 0), font=font)
        fx = x0 + (x1 - x0) * i / 4
        xx = left + (fx - x0) / (x1 - x0) * (w - left - right)
        d.text((xx - 10, h - bottom + 6), f"{int(fx)}", fill=(0, 0, 0), font=font)
    d.text((w // 2 - 15, h - 16), "step", fill=(0, 0, 0), font=font)
    for i, (name, p) in enumerate(pts.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        y = _smooth(p[:, 1], max(1, len(p) // 100))
        line = [px(x, v) for x, v in zip(p[:, 0], y) if np.isfinite(v) and (v > 0 or not log_y)]
        if len(line) > 1:
            d.line(line, fill=colour, width=2)
        elif line:
            d.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=colour)
        d.text((w - right - 160, top + 6 + 12 * i), name, fill=colour, font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
