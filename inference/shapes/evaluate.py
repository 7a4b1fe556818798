"""Evaluation of a text-to-image generator on prompts sampled from the shapes-world grammar.

A generator is any ``generate(prompts, seed) -> list of (N, N, 3) uint8 images``, one image per
prompt. :func:`evaluate` samples prompts (held-out pairs included), scores every image by the
spec's rules and aggregates per-attribute accuracy, the fully-correct rate and the score on prompts
that mention an unseen (held-out) colour-shape pair. :func:`contact_sheet` draws prompts and images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
import textwrap

import numpy as np

from .grammar import parse, sample_prompt
from .score import ATTRIBUTES, Score, score_scene

Generate = Callable[[list[str], int], Sequence[np.ndarray]]


def sample_prompts(n: int, seed: int, held_out: str = "include") -> list[str]:
    rng = np.random.default_rng(seed)
    return [sample_prompt(rng, held_out) for _ in range(n)]


@dataclass
class Report:
    scores: list[Score]
    images: list[np.ndarray] = field(repr=False)
    diversity: float | None = None     # fraction of prompts whose two seeds differ visibly

    def _rate(self, scores: list[Score]) -> float:
        return sum(s.correct for s in scores) / len(scores) if scores else float("nan")

    @property
    def fully_correct(self) -> float:
        return self._rate(self.scores)

    @property
    def unseen(self) -> list[Score]:
        return [s for s in self.scores if s.scene.has_unseen_pair]

    @property
    def unseen_fully_correct(self) -> float:
        return self._rate(self.unseen)

    @property
    def seen_fully_correct(self) -> float:
        return self._rate([s for s in self.scores if not s.scene.has_unseen_pair])

    def accuracy(self) -> dict[str, tuple[float, int]]:
        """attribute -> (accuracy, prompts where it was checked)."""
        out = {}
        for attr in ATTRIBUTES:
            vals = [s.checks[attr] for s in self.scores if attr in s.checks]
            out[attr] = (sum(vals) / len(vals) if vals else float("nan"), len(vals))
        return out

    def by_kind(self) -> dict[str, tuple[float, int]]:
        out = {}
        for kind in ("single", "pair", "count"):
            sub = [s for s in self.scores if s.scene.kind == kind]
            out[kind] = (self._rate(sub), len(sub))
        return out

    def failures(self, top: int = 6) -> list[dict]:
        """The most frequent sets of failed attributes, each with its share and example prompts."""
        groups: dict[tuple[str, ...], list[str]] = {}
        for s in self.scores:
            failed = tuple(a for a, ok in s.checks.items() if not ok)
            if failed:
                groups.setdefault(failed, []).append(s.prompt)
        ranked = sorted(groups.items(), key=lambda kv: -len(kv[1]))[:top]
        return [{"failed": list(k), "share": len(v) / len(self.scores), "examples": v[:3]} for k, v in ranked]

    def as_dict(self) -> dict:
        return {
            "prompts": len(self.scores),
            "fully_correct": self.fully_correct,
            "unseen_pairs_fully_correct": self.unseen_fully_correct,
            "unseen_pair_prompts": len(self.unseen),
            "seen_pairs_fully_correct": self.seen_fully_correct,
            "attributes": {k: v[0] for k, v in self.accuracy().items()},
            "by_kind": {k: v[0] for k, v in self.by_kind().items()},
            "diversity": self.diversity,
            "failures": self.failures(),
        }

    def format(self) -> str:
        lines = [f"prompts: {len(self.scores)}",
                 f"fully correct: {self.fully_correct:.1%}",
                 f"unseen pairs, fully correct: {self.unseen_fully_correct:.1%} ({len(self.unseen)} prompts)",
                 f"seen pairs, fully correct: {self.seen_fully_correct:.1%}",
                 "per attribute (accuracy over the prompts that state it):"]
        for attr, (acc, k) in self.accuracy().items():
            lines.append(f"  {attr:<10} {acc:7.1%}  ({k})")
        lines.append("by scene kind (fully correct): " + ", ".join(
            f"{k} {v:.1%} ({c})" for k, (v, c) in self.by_kind().items()))
        if self.diversity is not None:
            lines.append(f"diversity (two seeds visibly different): {self.diversity:.1%}")
        return "\n".join(lines)


def visibly_different(a: np.ndarray, b: np.ndarray) -> bool:
    """At least 2% of the pixels differ by more than 48 in some channel."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).max(-1) > 48
    return bool(diff.mean() >= 0.02)


def evaluate(generate: Generate, n: int = 300, seed: int = 0, batch: int = 16,
             diversity_prompts: int = 0, progress: bool = False) -> Report:
    """Score ``generate`` on ``n`` grammar prompts (seeded); optionally measure diversity on the first
    ``diversity_prompts`` prompts by generating them again with another seed."""
    prompts = sample_prompts(n, seed)
    images: list[np.ndarray] = []
    batches = range(0, n, batch)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="eval", unit="batch")
    for i in batches:
        images.extend(np.asarray(im) for im in generate(prompts[i:i + batch], seed * 1_000_003 + i))
    scores = []
    for prompt, image in zip(prompts, images):
        scene = parse(prompt)
        assert scene is not None
        scores.append(score_scene(prompt, scene, image))
    report = Report(scores, images)
    if diversity_prompts:
        sub = prompts[:diversity_prompts]
        again: list[np.ndarray] = []
        for i in range(0, len(sub), batch):
            again.extend(np.asarray(im) for im in generate(sub[i:i + batch], seed * 1_000_003 + i + 7_777))
        report.diversity = sum(visibly_different(a, b) for a, b in zip(images, again)) / len(sub)
    return report


def contact_sheet(report: Report, path: str | Path, cols: int = 8, tile: int = 128, limit: int = 64) -> Path:
    """A PNG grid: each tile is an image (upscaled), its prompt, and the failed attributes in red."""
    from PIL import Image, ImageDraw, ImageFont

    items = list(zip(report.scores, report.images))[:limit]
    rows = (len(items) + cols - 1) // cols
    text_h = 52
    sheet = Image.new("RGB", (cols * tile, max(1, rows) * (tile + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for k, (s, img) in enumerate(items):
        x, y = (k % cols) * tile, (k // cols) * (tile + text_h)
        sheet.paste(Image.fromarray(img).resize((tile, tile), Image.NEAREST), (x, y))
        lines = textwrap.wrap(s.prompt, width=tile // 6)[:3]
        for j, line in enumerate(lines):
            draw.text((x + 2, y + tile + 1 + 11 * j), line, fill=(0, 0, 0), font=font)
        failed = [a for a, ok in s.checks.items() if not ok]
        verdict = "ok" if not failed else "x " + ",".join(failed)
        draw.text((x + 2, y + tile + 1 + 11 * len(lines)), verdict[: tile // 6],
                  fill=(0, 140, 0) if not failed else (200, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def pipeline_generator(pipe, **overrides) -> Generate:
    """An :class:`inference.pipeline.Pipeline` as a generator: one image per prompt, the prompt at
    index i of a batch seeded ``seed + i``; ``overrides`` are sampling settings (None = manifest)."""

    def generate(prompts: list[str], seed: int) -> list[np.ndarray]:
        images = pipe.generate(prompts, n_images=1, seeds=[seed + i for i in range(len(prompts))], **overrides)
        return [np.asarray(group[0].convert("RGB")) for group in images]

    return generate


def renderer_generator(n: int = 64, jitter: int = 0) -> Generate:
    """The renderer itself as a generator: the evaluator's own calibration (near 100%)."""
    from .render import render

    def generate(prompts: list[str], seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        out = []
        for p in prompts:
            scene = parse(p)
            assert scene is not None
            out.append(render(scene, n, rng, jitter))
        return out

    return generate
