"""Training data: rendered scenes with their captions (held-out pairs never appear).

The dataset is rendered once, in parallel where there are cores to spare, and both stages sample
batches from it: the VQ trains on its images, the transformer on (caption, codes of that image).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..shapes.grammar import parse, sample_prompt
from ..shapes.render import render

CHUNK = 2000
_log = logging.getLogger(__name__)


def render_batch(rng: np.random.Generator, batch: int, n: int, held_out: str = "exclude"
                 ) -> tuple[list[str], np.ndarray]:
    """``batch`` random prompts and one rendering of each: (prompts, uint8 (B, n, n, 3))."""
    prompts = [sample_prompt(rng, held_out) for _ in range(batch)]
    images = np.stack([render(parse(p), n, rng) for p in prompts])
    return prompts, images


def _chunk(args: tuple[int, int, int, int]) -> tuple[list[str], np.ndarray]:
    seed, index, count, n = args
    return render_batch(np.random.default_rng([seed, 1, index]), count, n)


@dataclass
class SceneDataset:
    prompts: list[str]
    images: np.ndarray      # uint8 (M, S, S, 3)

    def __len__(self) -> int:
        return len(self.prompts)


def build_dataset(count: int, n: int, seed: int, workers: int = 0) -> SceneDataset:
    """``count`` training scenes, deterministic for a seed whatever the number of workers."""
    jobs = [(seed, i, min(CHUNK, count - start), n) for i, start in enumerate(range(0, count, CHUNK))]
    workers = workers or max(1, min(16, (os.cpu_count() or 1) - 1))
    parts = None
    if workers > 1 and len(jobs) > 1:
        try:
            with ProcessPoolExecutor(workers) as pool:
                parts = list(pool.map(_chunk, jobs))
        except (OSError, RuntimeError) as e:   # no fork/semaphores in some sandboxes: render serially
            _log.warning("parallel rendering failed (%s); rendering in one process", e)
    if parts is None:
        parts = [_chunk(j) for j in jobs]
    return SceneDataset([p for ps, _ in parts for p in ps], np.concatenate([im for _, im in parts]))


def save_dataset(ds: SceneDataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, prompts=np.array(ds.prompts), images=ds.images)
    os.replace(tmp, path)


def load_dataset(path: Path) -> SceneDataset:
    with np.load(path) as z:
        return SceneDataset([str(p) for p in z["prompts"]], z["images"])


def step_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    """The generator for one training step: resuming at step k replays exactly the same batches."""
    return np.random.default_rng([seed, stream, step])
