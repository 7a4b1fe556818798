"""The shapes-world caption grammar (docs: /work/shared/spec/shapes-world.md): parse and sample.

A prompt parses to a :class:`Scene`, the canonical description the renderer draws and the scorer
checks. Sampling produces prompts with every paraphrase the grammar allows (prefixes, "big"/"large",
"center"/"centre", "gray"/"grey", a stated or implied white background), and can leave out the
held-out colour-shape pairs (training) or keep them (evaluation).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
# Size classes: bounding-box side as a fraction of the canvas side.
SIZE_RANGES: dict[str, tuple[float, float]] = {
    "small": (0.18, 0.25),
    "default": (0.28, 0.38),
    "big": (0.45, 0.55),
}
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
RELATIONS: tuple[str, ...] = ("above", "below", "left_of", "right_of", "and")
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {("purple", "triangle"), ("orange", "star"), ("green", "square")}
)
PREFIXES: tuple[str, ...] = ("a picture of", "an image of", "a drawing of")

_POSITION_WORDS = {
    "on the left": "left", "on the right": "right", "at the top": "top", "at the bottom": "bottom",
    "in the center": "center", "in the centre": "center",
}
_RELATION_WORDS = {
    "above": "above", "below": "below", "to the left of": "left_of", "to the right of": "right_of",
    "and": "and",
}
_SIZE_WORDS = {"small": "small", "big": "big", "large": "big"}
_BACKGROUND_WORDS = {"white": "white", "black": "black", "gray": "gray", "grey": "gray"}

Kind = Literal["single", "pair", "count"]


@dataclass(frozen=True, slots=True)
class ObjectSpec:
    colour: str
    shape: str
    size: str = "default"   # "small" | "default" | "big"

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape) in HELD_OUT


@dataclass(frozen=True, slots=True)
class Scene:
    """A parsed prompt. ``objects`` has 1 (single), 2 (pair: A then B) or 2-3 (count) entries."""

    kind: Kind
    objects: tuple[ObjectSpec, ...]
    position: str | None = None      # single objects only: one of POSITIONS
    relation: str | None = None      # pairs only: one of RELATIONS
    background: str = "white"        # canonical: white | black | gray

    @property
    def has_unseen_pair(self) -> bool:
        return any(o.held_out for o in self.objects)


def normalise(prompt: str) -> str:
    """Lower-case, punctuation to spaces, single spaces, stripped."""
    return " ".join(re.sub(r"[^a-z ]+", " ", prompt.lower()).split())


def _alt(words) -> str:
    return "|".join(sorted((re.escape(w) for w in words), key=len, reverse=True))


_C = f"({_alt(COLOURS)})"
_S = f"({_alt(SHAPES)})"
_PREFIX = f"(?:(?:{_alt(PREFIXES)}) )?"
_BG = f"(?: on an? ({_alt(_BACKGROUND_WORDS)}) background)?"
_SINGLE = re.compile(
    f"^{_PREFIX}an? (?:({_alt(_SIZE_WORDS)}) )?{_C} {_S}(?: ({_alt(_POSITION_WORDS)}))?{_BG}$"
)
_PAIR = re.compile(
    f"^{_PREFIX}an? (?:(small) )?{_C} {_S} ({_alt(_RELATION_WORDS)}) an? (?:(small) )?{_C} {_S}{_BG}$"
)
_COUNT = re.compile(f"^{_PREFIX}(two|three) (?:(small) )?{_C} {_S} ?s{_BG}$")


def parse(prompt: str) -> Scene | None:
    """The scene a prompt describes, or None when the prompt is outside the grammar."""
    text = normalise(prompt)
    if m := _SINGLE.match(text):
        size, colour, shape, pos, bg = m.groups()
        return Scene("single", (ObjectSpec(colour, shape, _SIZE_WORDS.get(size, "default")),),
                     position=_POSITION_WORDS.get(pos), background=_BACKGROUND_WORDS.get(bg, "white"))
    if m := _PAIR.match(text):
        s1, c1, h1, rel, s2, c2, h2, bg = m.groups()
        return Scene("pair", (ObjectSpec(c1, h1, s1 or "default"), ObjectSpec(c2, h2, s2 or "default")),
                     relation=_RELATION_WORDS[rel], background=_BACKGROUND_WORDS.get(bg, "white"))
    if m := _COUNT.match(text):
        n, size, colour, shape, bg = m.groups()
        obj = ObjectSpec(colour, shape, size or "default")
        return Scene("count", (obj,) * (2 if n == "two" else 3),
                     background=_BACKGROUND_WORDS.get(bg, "white"))
    return None


# ----------------------------------------------------------------------------------------------
# Sampling


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _colour_shape(rng: np.random.Generator, held_out: str) -> tuple[str, str]:
    """A colour-shape pair: ``held_out`` is "exclude" (training), "include" or "only"."""
    while True:
        pair = (_pick(rng, list(COLOURS)), _pick(rng, SHAPES))
        unseen = pair in HELD_OUT
        if held_out == "include" or (unseen == (held_out == "only")):
            return pair


def sample_prompt(rng: np.random.Generator, held_out: str = "exclude") -> str:
    """A random prompt from the grammar with random paraphrases.

    ``held_out``: "exclude" never mentions a held-out pair (training data), "include" samples
    every pair uniformly (evaluation), "only" makes at least one object a held-out pair.
    """
    if held_out not in ("exclude", "include", "only"):
        raise ValueError(f"held_out must be exclude, include or only, not {held_out!r}")
    words: list[str] = []
    if rng.random() < 0.3:
        words.append(_pick(rng, PREFIXES))
    kind = _pick(rng, ("single", "single", "pair", "pair", "count"))
    if kind == "single":
        colour, shape = _colour_shape(rng, held_out)
        size = _pick(rng, (None, None, "small", "big", "large"))
        phrase = " ".join(w for w in (size, colour, shape) if w)
        words += [_article(phrase), phrase]
        if rng.random() < 0.6:
            words.append(_pick(rng, list(_POSITION_WORDS)))
    elif kind == "pair":
        while True:
            mode = "include" if held_out == "only" else held_out
            pairs = [_colour_shape(rng, mode), _colour_shape(rng, mode)]
            if held_out != "only" or any(p in HELD_OUT for p in pairs):
                break
        phrases = []
        for colour, shape in pairs:
            small = "small " if rng.random() < 0.3 else ""
            phrase = f"{small}{colour} {shape}"
            phrases.append(f"{_article(phrase)} {phrase}")
        words += [phrases[0], _pick(rng, list(_RELATION_WORDS)), phrases[1]]
    else:
        colour, shape = _colour_shape(rng, held_out)
        small = ["small"] if rng.random() < 0.3 else []
        words += [_pick(rng, ("two", "three")), *small, colour, shape + "s"]
    bg = _pick(rng, (None, None, None, "white", "black", "black", "gray", "grey"))
    if bg:
        words.append(f"on a {bg} background")
    return " ".join(words)


def all_words() -> list[str]:
    """Every word the grammar uses (for training a tokenizer)."""
    text = " ".join([*PREFIXES, *_POSITION_WORDS, *_RELATION_WORDS, *_SIZE_WORDS, *_BACKGROUND_WORDS,
                     *COLOURS, *SHAPES, *(s + "s" for s in SHAPES), "a an two three on background"])
    return sorted(set(text.split()))
