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
    def generate(self, jobs: Sequence[GenerationJob]) -> list[list[Image.Image]]:
        """One list of ``job.n_images`` images per job, in order, from one batched run."""
        ...
