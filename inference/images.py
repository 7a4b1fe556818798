"""Images for posting: pixels -> PIL, grids (2x2 for 4 images, 3x3 for 9) and upscaling."""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
from PIL import Image


def to_pil(pixels: np.ndarray) -> list[Image.Image]:
    """(B, S, S, 3) float in [0, 1] -> B RGB images (x 255, truncated, as dalle-mini does)."""
    u8 = (np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8)
    return [Image.fromarray(im, "RGB") for im in u8]


def grid_shape(n: int) -> tuple[int, int]:
    """(columns, rows) of the most square grid holding n images: 4 -> 2x2, 9 -> 3x3, 6 -> 3x2."""
    if n < 1:
        raise ValueError("a grid needs at least one image")
    cols = math.ceil(math.sqrt(n))
    return cols, math.ceil(n / cols)


def make_grid(images: Sequence[Image.Image], gap: int = 0, background: tuple[int, int, int] = (255, 255, 255)
              ) -> Image.Image:
    """Tile equally sized images row by row."""
    cols, rows = grid_shape(len(images))
    w, h = images[0].size
    out = Image.new("RGB", (cols * w + (cols - 1) * gap, rows * h + (rows - 1) * gap), background)
    for i, im in enumerate(images):
        if im.size != (w, h):
            raise ValueError("grid images must all have the same size")
        out.paste(im, ((i % cols) * (w + gap), (i // cols) * (h + gap)))
    return out


def upscale(image: Image.Image, size: int, resample: Image.Resampling = Image.Resampling.LANCZOS) -> Image.Image:
    """Scale so the longer side is ``size`` px (posting platforms show small images blurry).
    Small flat-colour images look best with ``Image.Resampling.NEAREST``."""
    w, h = image.size
    f = size / max(w, h)
    return image.resize((max(1, round(w * f)), max(1, round(h * f))), resample)


def png_bytes(image: Image.Image) -> bytes:
    """Deterministic PNG encoding (no timestamps or metadata): same pixels -> same bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()
