"""The shapes world: the caption grammar, a procedural renderer and the spec's scorer.

Numpy and Pillow only (no torch), so evaluation runs with the serving dependencies.
See /work/shared/spec/shapes-world.md (copied in spirit into docs/model-card.md).
"""

from .grammar import HELD_OUT, ObjectSpec, Scene, parse, sample_prompt
from .render import render
from .score import Analysis, Detected, Score, analyse, score

__all__ = ["HELD_OUT", "Analysis", "Detected", "ObjectSpec", "Scene", "Score", "analyse", "parse",
           "render", "sample_prompt", "score"]
