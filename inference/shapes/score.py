"""Scoring an image against a shapes-world prompt, by the spec's rules (numpy only).

:func:`analyse` finds the background (nearest reference background colour) and the objects
(pixels far from the background, 8-connected components of at least 0.8% of the canvas), and
describes each object: nearest reference colour, best-fitting ideal shape, size class, centre.
:func:`score` checks every attribute the prompt states against the best assignment of detected
objects to the prompt's objects.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from .grammar import BACKGROUNDS, COLOURS, SHAPES, Scene, parse
from .render import RELATION_OFFSET, ideal_mask

MIN_COMPONENT_FRACTION = 0.008
FOREGROUND_DISTANCE = 50.0        # RGB distance from the background that makes a pixel an object's
# Size class boundaries: midway between the spec's ranges (small 18-25%, default 28-38%, big 45-55%).
SMALL_MAX, DEFAULT_MAX = 0.265, 0.415
MAX_ASSIGNED = 6                  # only the largest components are tried as matches for the prompt

ATTRIBUTES = ("background", "count", "colour", "shape", "size", "position", "relation")

_BG_NAMES = list(BACKGROUNDS)
_BG_REFS = np.array([BACKGROUNDS[k] for k in _BG_NAMES], dtype=np.float32)
_COLOUR_NAMES = list(COLOURS)
_COLOUR_REFS = np.array([COLOURS[k] for k in _COLOUR_NAMES], dtype=np.float32)


@dataclass(frozen=True, slots=True)
class Detected:
    colour: str
    shape: str
    size: str
    cx: float          # bounding-box centre, pixels
    cy: float
    bbox: tuple[int, int, int, int]   # x0, y0, x1, y1 (exclusive)
    area: int
    shape_fit: float   # IoU of the best ideal shape


@dataclass(frozen=True, slots=True)
class Analysis:
    n: int
    background: str
    objects: tuple[Detected, ...]   # largest first


@dataclass(slots=True)
class Score:
    """Which stated attributes hold. ``checks`` maps attribute -> bool for the attributes checked."""

    prompt: str
    scene: Scene
    checks: dict[str, bool] = field(default_factory=dict)
    analysis: Analysis | None = None

    @property
    def correct(self) -> bool:
        return all(self.checks.values())


def _label_components(mask: np.ndarray) -> np.ndarray:
    """8-connected labels of a bool mask by min-label propagation: int (H, W), -1 off the mask."""
    h, w = mask.shape
    big = h * w
    labels = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        p = np.pad(labels, 1, constant_values=big)
        neigh = np.minimum.reduce([p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                                   for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
        new = np.where(mask, neigh, big)
        if np.array_equal(new, labels):
            break
        labels = new
    return np.where(mask, labels, -1)


def size_class(side_fraction: float) -> str:
    if side_fraction < SMALL_MAX:
        return "small"
    return "default" if side_fraction < DEFAULT_MAX else "big"


def best_shape(component: np.ndarray) -> tuple[str, float]:
    """The ideal shape that, drawn in the component's bounding box, overlaps it best (IoU)."""
    h, w = component.shape
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        ideal = ideal_mask(shape, w, h)
        iou = float((ideal & component).sum() / max(1, (ideal | component).sum()))
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, best_iou


def _object_pixels(img: np.ndarray, comp: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An object's colour and its core: the component's pixels at least half-way from the background
    to that colour, so soft (blurred or anti-aliased) edges count by their midpoint."""
    px = img[comp]
    dist = np.sqrt(((px - bg) ** 2).sum(-1))
    colour = np.median(px[dist >= np.quantile(dist, 0.5)], axis=0)    # the component's inner half
    axis = colour - bg
    t = ((img - bg) @ axis) / max(float(axis @ axis), 1e-6)
    core = comp & (t >= 0.5)
    return colour, (core if core.any() else comp)


def analyse(image: np.ndarray) -> Analysis:
    """Background and objects of an (N, N, 3) uint8 image."""
    img = np.asarray(image, dtype=np.float32)[..., :3]
    n = img.shape[0]
    pix = img.reshape(-1, 3)
    refs = np.concatenate([_BG_REFS, _COLOUR_REFS])
    nearest = ((pix[:, None, :] - refs[None]) ** 2).sum(-1).argmin(1)
    counts = np.bincount(nearest, minlength=len(refs))[:len(_BG_REFS)]
    bg_index = int(counts.argmax())
    bg_pixels = pix[nearest == bg_index]
    bg_colour = np.median(bg_pixels, axis=0) if len(bg_pixels) else _BG_REFS[bg_index]
    fg = (np.sqrt(((img - bg_colour) ** 2).sum(-1)) > FOREGROUND_DISTANCE)
    labels = _label_components(fg)
    ids, sizes = np.unique(labels[labels >= 0], return_counts=True)
    min_area = MIN_COMPONENT_FRACTION * n * n
    objects = []
    for lab, area in sorted(zip(ids.tolist(), sizes.tolist()), key=lambda t: -t[1]):
        if area < min_area:
            continue
        comp = labels == lab
        colour_px, core = _object_pixels(img, comp, bg_colour)
        colour = _COLOUR_NAMES[int(((_COLOUR_REFS - colour_px) ** 2).sum(-1).argmin())]
        ys, xs = np.nonzero(core)
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
        shape, fit = best_shape(core[y0:y1, x0:x1])
        objects.append(Detected(colour, shape, size_class(max(x1 - x0, y1 - y0) / n),
                                (x0 + x1) / 2, (y0 + y1) / 2, (x0, y0, x1, y1), int(area), fit))
    return Analysis(n, _BG_NAMES[bg_index], tuple(objects))


def _position_holds(d: Detected, position: str, n: int) -> bool:
    x, y = d.cx / n, d.cy / n
    return {
        "left": x < 0.4, "right": x > 0.6, "top": y < 0.4, "bottom": y > 0.6,
        "center": 0.35 <= x <= 0.65 and 0.35 <= y <= 0.65,
    }[position]


def _relation_holds(a: Detected, b: Detected, relation: str, n: int) -> bool:
    d = RELATION_OFFSET * n
    return {
        "above": a.cy <= b.cy - d, "below": a.cy >= b.cy + d,
        "left_of": a.cx <= b.cx - d, "right_of": a.cx >= b.cx + d, "and": True,
    }[relation]


def _checks_for(scene: Scene, analysis: Analysis, assigned: tuple[Detected | None, ...]) -> dict[str, bool]:
    n = analysis.n
    specs = scene.objects
    found = [d is not None for d in assigned]
    checks = {
        "background": analysis.background == scene.background,
        "count": len(analysis.objects) == len(specs),
        "colour": all(d is not None and d.colour == s.colour for s, d in zip(specs, assigned)),
        "shape": all(d is not None and d.shape == s.shape for s, d in zip(specs, assigned)),
        "size": all(d is not None and d.size == s.size for s, d in zip(specs, assigned)),
    }
    if scene.position is not None:
        checks["position"] = all(found) and _position_holds(assigned[0], scene.position, n)
    if scene.relation is not None:
        checks["relation"] = all(found) and _relation_holds(assigned[0], assigned[1], scene.relation, n)
    return checks


def score_scene(prompt: str, scene: Scene, image: np.ndarray) -> Score:
    analysis = analyse(image)
    candidates = list(analysis.objects[:MAX_ASSIGNED])
    k = len(scene.objects)
    pool: list[Detected | None] = candidates + [None] * k
    best: dict[str, bool] | None = None
    for assigned in itertools.permutations(range(len(pool)), k):
        checks = _checks_for(scene, analysis, tuple(pool[i] for i in assigned))
        if best is None or sum(checks.values()) > sum(best.values()):
            best = checks
            if all(best.values()):
                break
    assert best is not None
    return Score(prompt, scene, best, analysis)


def score(prompt: str, image: np.ndarray) -> Score:
    """Score an image against a prompt inside the grammar (ValueError otherwise)."""
    scene = parse(prompt)
    if scene is None:
        raise ValueError(f"prompt is outside the shapes-world grammar: {prompt!r}")
    return score_scene(prompt, scene, image)
