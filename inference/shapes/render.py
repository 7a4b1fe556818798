"""Procedural renderer of the shapes world: a :class:`~.grammar.Scene` -> an RGB uint8 image.

Seeded (pass a ``numpy.random.Generator``), exact to the spec's colours, size classes, placement
regions and relations. Shapes are rasterised by :func:`ideal_mask`, the same function the scorer
fits to detected objects, so the renderer's own images score (almost) perfectly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .grammar import BACKGROUNDS, COLOURS, SIZE_RANGES, ObjectSpec, Scene

# Placement keeps this fraction of N away from every region and relation threshold, so a scene is
# unambiguous; objects keep at least GAP_FRACTION * N (>= 2 px) apart so they never touch.
MARGIN_FRACTION = 0.02
GAP_FRACTION = 0.04
RELATION_OFFSET = 0.2

_SUPER = 4            # supersampling per axis when rasterising
_COVERAGE = 3 / 16    # a pixel is on when at least this fraction of its subsamples is inside


def _star_polygon() -> np.ndarray:
    """Five-pointed star, one point up, inner radius half the outer, fitted to the unit square."""
    pts = []
    for i in range(10):
        r = 1.0 if i % 2 == 0 else 0.5
        a = -math.pi / 2 + i * math.pi / 5
        pts.append((r * math.cos(a), r * math.sin(a)))
    p = np.array(pts)
    p -= p.min(axis=0)
    return p / p.max(axis=0)


_STAR = _star_polygon()


def _inside_polygon(u: np.ndarray, v: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule for points (u, v) and a closed polygon (K, 2)."""
    inside = np.zeros(u.shape, dtype=bool)
    x2, y2 = poly[-1]
    for x1, y1 in poly:
        crosses = (y1 > v) != (y2 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (u < x_at)
        x2, y2 = x1, y1
    return inside


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Points in unit-square coordinates (u right, v down) inside the ideal shape."""
    if shape == "square":
        return np.ones(u.shape, dtype=bool)
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "triangle":
        return v >= 2 * np.abs(u - 0.5)
    if shape == "star":
        return _inside_polygon(u, v, _STAR)
    raise ValueError(f"unknown shape {shape!r}")


_MASK_CACHE: dict[tuple[str, int, int], np.ndarray] = {}


def ideal_mask(shape: str, w: int, h: int) -> np.ndarray:
    """The ideal filled shape drawn in a w x h box: bool (h, w)."""
    key = (shape, w, h)
    if key not in _MASK_CACHE:
        u = (np.arange(w * _SUPER) + 0.5) / (w * _SUPER)
        v = (np.arange(h * _SUPER) + 0.5) / (h * _SUPER)
        uu, vv = np.meshgrid(u, v)
        cover = _inside(shape, uu, vv).reshape(h, _SUPER, w, _SUPER).mean(axis=(1, 3))
        _MASK_CACHE[key] = cover >= _COVERAGE - 1e-9
    return _MASK_CACHE[key]


@dataclass(frozen=True, slots=True)
class Placed:
    """An object on the canvas: integer bounding box (x0, y0) with side ``side``."""

    spec: ObjectSpec
    x0: int
    y0: int
    side: int

    @property
    def cx(self) -> float:
        return self.x0 + self.side / 2

    @property
    def cy(self) -> float:
        return self.y0 + self.side / 2


def side_range(size: str, n: int) -> tuple[int, int]:
    lo, hi = SIZE_RANGES[size]
    return math.ceil(lo * n - 1e-9), math.floor(hi * n + 1e-9)


def _position_ok(p: Placed, position: str | None, n: int) -> bool:
    m = MARGIN_FRACTION * n
    if position is None:
        return True
    if position == "left":
        return p.cx < 0.4 * n - m
    if position == "right":
        return p.cx > 0.6 * n + m
    if position == "top":
        return p.cy < 0.4 * n - m
    if position == "bottom":
        return p.cy > 0.6 * n + m
    if position == "center":
        lo, hi = 0.35 * n + m, 0.65 * n - m
        return lo <= p.cx <= hi and lo <= p.cy <= hi
    raise ValueError(f"unknown position {position!r}")


def _relation_ok(a: Placed, b: Placed, relation: str | None, n: int) -> bool:
    d = (RELATION_OFFSET + MARGIN_FRACTION) * n
    if relation in (None, "and"):
        return True
    if relation == "above":
        return a.cy <= b.cy - d
    if relation == "below":
        return a.cy >= b.cy + d
    if relation == "left_of":
        return a.cx <= b.cx - d
    if relation == "right_of":
        return a.cx >= b.cx + d
    raise ValueError(f"unknown relation {relation!r}")


def _apart(a: Placed, b: Placed, gap: int) -> bool:
    return (a.x0 + a.side + gap <= b.x0 or b.x0 + b.side + gap <= a.x0
            or a.y0 + a.side + gap <= b.y0 or b.y0 + b.side + gap <= a.y0)


def layout(scene: Scene, n: int, rng: np.random.Generator) -> list[Placed]:
    """Sizes and positions for the scene's objects on an n x n canvas (rejection sampling)."""
    gap = max(2, round(GAP_FRACTION * n))
    for _ in range(1000):
        placed: list[Placed] = []
        for spec in scene.objects:
            lo, hi = side_range(spec.size, n)
            side = int(rng.integers(lo, hi + 1))
            for _ in range(200):
                p = Placed(spec, int(rng.integers(0, n - side + 1)), int(rng.integers(0, n - side + 1)), side)
                if _position_ok(p, scene.position, n) and all(_apart(p, q, gap) for q in placed) and (
                        not placed or _relation_ok(placed[0], p, scene.relation, n)):
                    placed.append(p)
                    break
            else:
                break
        if len(placed) == len(scene.objects):
            return placed
    raise RuntimeError(f"could not lay out {scene} on a {n}x{n} canvas")


def paint(placed: list[Placed], background: str, n: int, rng: np.random.Generator | None = None,
          jitter: int = 0) -> np.ndarray:
    """Draw placed objects: (n, n, 3) uint8. ``jitter`` <= 15 varies each object's colour channels."""
    if not 0 <= jitter <= 15:
        raise ValueError("jitter must be within 0..15 (the spec's tolerance)")
    img = np.empty((n, n, 3), dtype=np.uint8)
    img[:] = BACKGROUNDS[background]
    for p in placed:
        colour = np.array(COLOURS[p.spec.colour], dtype=np.int64)
        if jitter and rng is not None:
            colour = colour + rng.integers(-jitter, jitter + 1, size=3)
        mask = ideal_mask(p.spec.shape, p.side, p.side)
        region = img[p.y0:p.y0 + p.side, p.x0:p.x0 + p.side]
        region[mask] = np.clip(colour, 0, 255).astype(np.uint8)
    return img


def render(scene: Scene, n: int = 64, rng: np.random.Generator | None = None, jitter: int = 0) -> np.ndarray:
    """A random image of ``scene`` on an n x n canvas: (n, n, 3) uint8."""
    rng = rng if rng is not None else np.random.default_rng()
    return paint(layout(scene, n, rng), scene.background, n, rng, jitter)
