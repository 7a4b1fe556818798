"""The port between the worker and the model: turn claimed requests into images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image


@dataclass(frozen=True, slots=True)
class GenerationJob:
    prompt: str
    n_images: int
    seed: int


class Generator(Protocol):
    def generate(self, jobs: Sequence[GenerationJob]) -> list[list[Image.Image] | Exception]:
        """One entry per job, in order, from one batched run: ``job.n_images`` images, or the
        exception that makes this one job impossible (e.g. a prompt the model cannot read)."""
        ...
