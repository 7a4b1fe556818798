"""Helpers shared by the adapter end-to-end tests (X and Discord)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

from bot.generation import GenerationJob

# Hostile and odd input, sent through every platform: each must get a clear reply or be stored and
# processed safely. (name, prompt text after the bot's mention)
BAD_INPUT: list[tuple[str, str]] = [
    ("empty", ""),
    ("only mentions", "@alice @bob"),
    ("over-long", "a very long prompt " * 40),
    ("control characters", "a cat\x00\x07\x1b[31m in red\x7f"),
    ("zero-width", "a\u200bcat\u200d in\ufeff a\u2060 hat"),
    ("zero-width only", "\u200b\u200c\u200d\ufeff"),
    ("right-to-left override", "a \u202egnirts desrever\u202c cat"),
    ("emoji only", "🐱🎩✨"),
    ("other scripts", "猫が帽子をかぶっている Кошка в шляпе قطة"),
    ("html", "<script>alert('x')</script><b>a bold cat</b> &amp;"),
    ("sql", "a cat'); DROP TABLE requests; -- \" OR 1=1"),
]


class LetterGenerator:
    """A test Generator at the model boundary: each image is 64x64 with the prompt's first letter."""

    def __init__(self) -> None:
        self.jobs: list[GenerationJob] = []

    def generate(self, jobs: Sequence[GenerationJob]) -> list[list[Image.Image]]:
        self.jobs.extend(jobs)
        out = []
        for job in jobs:
            letter = next((c for c in job.prompt if c.isascii() and c.isalnum()), "?")
            images = []
            for k in range(job.n_images):
                im = Image.new("RGB", (64, 64), ((job.seed + 50 * k) % 256, 180, 220))
                ImageDraw.Draw(im).text((28, 26), letter, fill=(0, 0, 0))
                images.append(im)
            out.append(images)
        return out
