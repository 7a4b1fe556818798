"""Load the configured model bundle (or the shipped shapes-world model) as the worker's Generator."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from bot.config import ModelConfig
from bot.generation import GenerationJob, Generator
from inference.errors import BundleError, InferenceError, PromptError

_log = logging.getLogger(__name__)


class PipelineGenerator:
    """Runs a batch of jobs through :class:`inference.pipeline.Pipeline` decoder runs of at most
    ``max_images_per_run`` images each (``[model] max_images_per_run``; None or 0: the whole batch
    in one run). A job's images may span two runs: they come back whole and in order, the same
    images as in one run.

    A job whose prompt the model cannot read (empty after the model's own normalisation) gets a
    :class:`PromptError` in its place instead of images, one whose seed or image count the model
    refuses a :class:`JobError`; the others still generate.
    """

    def __init__(self, pipeline, max_images_per_run: int | None = None) -> None:  # type: ignore[no-untyped-def]
        self.pipeline = pipeline
        self.max_images_per_run = max_images_per_run

    def generate(self, jobs: Sequence[GenerationJob]) -> list[list[Image.Image] | Exception]:
        out: list[list[Image.Image] | Exception] = []
        good: list[int] = []
        for i, job in enumerate(jobs):
            try:
                self.pipeline.prepare([job.prompt])
                _check_job(job)
                good.append(i)
                out.append([])
            except (PromptError, JobError) as exc:
                out.append(exc)
        if good:
            images = self.pipeline.generate([jobs[i].prompt for i in good], n_images=[jobs[i].n_images for i in good],
                                            seeds=[jobs[i].seed for i in good],
                                            max_images_per_run=self.max_images_per_run)
            for i, imgs in zip(good, images, strict=True):
                out[i] = imgs
        return out


class JobError(InferenceError):
    """A job's own settings cannot be generated (checked per job: the pipeline refuses a whole batch)."""


def _check_job(job: GenerationJob) -> None:
    if isinstance(job.seed, bool) or not isinstance(job.seed, int) or not 0 <= job.seed < 2**63:
        raise JobError(f"seed {job.seed!r} cannot be used: seeds are whole numbers 0..2**63-1")
    if isinstance(job.n_images, bool) or not isinstance(job.n_images, int) or job.n_images < 1:
        raise JobError(f"{job.n_images!r} images cannot be made: the number of images must be 1 or more")


def bundle_path(cfg: ModelConfig) -> Path:
    if cfg.bundle:
        return Path(cfg.bundle).expanduser()
    from inference.shipped import SHAPES_BUNDLE

    return SHAPES_BUNDLE


def load_generator(cfg: ModelConfig) -> Generator:
    """Load the bundle named by ``[model] bundle`` (default: the shipped shapes-world model)."""
    from inference.pipeline import Pipeline

    path = bundle_path(cfg)
    if not (path / "manifest.json").exists():
        where = "[model] bundle" if cfg.bundle else "the shipped model (inference/shipped/shapes)"
        raise BundleError(f"no model bundle at {path} ({where}): make one with `dallebot export` "
                          "or `dallebot train shapes`, or fix [model] bundle")
    pipe = Pipeline.load(path, threads=cfg.threads, provider=cfg.provider)
    _log.info("model loaded from %s", path)
    return PipelineGenerator(pipe, max_images_per_run=cfg.max_images_per_run)
