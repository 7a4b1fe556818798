"""The composition root: build the database, queue, platforms and model from settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from bot.config import Settings
from bot.generation import Generator
from bot.metrics import Metrics
from bot.platforms.admission import BatchCheck, Check
from bot.platforms.base import Platform
from bot.platforms.local import LocalPlatform
from bot.safety import ImageClassifier, PromptFilter, build_prompt_filter
from storage import db as dbmod
from storage.queue import Queue, QueuePolicy

_log = logging.getLogger(__name__)


@dataclass
class App:
    settings: Settings
    db: dbmod.Database
    queue: Queue
    platforms: dict[str, Platform] = field(default_factory=dict)
    # The [safety] prompt filter every intake uses (None: switched off).
    prompt_filter: PromptFilter | None = None
    # This process's Prometheus metrics (latencies, images, failures, refusals).
    metrics: Metrics = field(default_factory=Metrics)

    @property
    def local(self) -> LocalPlatform:
        return self.platforms["local"]  # type: ignore[return-value]

    @cached_property
    def generator(self) -> Generator:
        from bot.model import load_generator

        return load_generator(self.settings.model)

    @cached_property
    def classifier(self) -> ImageClassifier | None:
        """The NSFW image classifier ([safety] nsfw_model), or None when nsfw_enabled is false."""
        cfg = self.settings.safety
        if not cfg.nsfw_enabled:
            return None
        from inference.nsfw import NsfwClassifier

        return NsfwClassifier.load(cfg.nsfw_model or None, threads=self.settings.model.threads,
                                   provider=self.settings.model.provider)

    def close(self) -> None:
        self.db.dispose()

    def __enter__(self) -> App:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_app(settings: Settings, *, auto_upgrade: bool | None = None, check_schema: bool = True) -> App:
    """Connect to the database and check its schema. SQLite (the embedded default) is upgraded
    automatically; PostgreSQL, shared by many processes, is upgraded with `dallebot db upgrade`."""
    db = dbmod.connect(
        settings.database_url,
        busy_timeout=settings.database.sqlite_busy_timeout,
        pool_size=settings.database.pool_size,
    )
    if check_schema:
        dbmod.ensure_schema(db, auto_upgrade=db.is_sqlite if auto_upgrade is None else auto_upgrade)
    queue = Queue(db, QueuePolicy.from_config(settings.queue))
    metrics = Metrics()
    platforms: dict[str, Platform] = {}
    prompt_filter = build_prompt_filter(settings.safety)
    if settings.local.enabled:
        platforms["local"] = LocalPlatform(Path(settings.outbox_dir), prompt_filter=prompt_filter, metrics=metrics)
    if settings.x.enabled:
        from bot.platforms.x import XPlatform

        platforms["x"] = XPlatform(settings.x, queue, max_prompt_chars=settings.queue.max_prompt_chars,
                                   checks=_intake_checks(settings, queue, prompt_filter, metrics))
    if settings.discord.enabled:
        from bot.platforms.discord import DiscordPlatform

        platforms["discord"] = DiscordPlatform(settings.discord, queue, max_prompt_chars=settings.queue.max_prompt_chars,
                                               default_images=settings.queue.default_images,
                                               checks=_intake_checks(settings, queue, prompt_filter, metrics))
    if "discord" in platforms:
        platforms["discord"].platforms = platforms  # type: ignore[attr-defined]  # /dalle-mod reject refuses anywhere
    return App(settings=settings, db=db, queue=queue, platforms=platforms, prompt_filter=prompt_filter,
               metrics=metrics)


def _intake_checks(settings: Settings, queue: Queue, prompt_filter: PromptFilter | None,
                   metrics: Metrics) -> list[Check | BatchCheck]:
    """What the X and Discord intakes check before storing a request: the [safety] prompt filter,
    then the [limits] rate limits (each returns the refusal for the user, or None)."""
    from bot.ratelimit import RateLimiter
    from bot.safety import check_prompt
    from storage.limits import LimitCounts

    checks: list[Check | BatchCheck] = []
    if prompt_filter is not None:
        def filtered(event):  # type: ignore[no-untyped-def]
            refusal = check_prompt(prompt_filter, event.prompt_raw)
            if refusal is not None:
                metrics.refusals.labels(reason="prompt_filter").inc()
            return refusal

        checks.append(filtered)
    checks.append(RateLimiter(LimitCounts(queue.db), settings.limits, clock=queue.clock,
                              on_limited=lambda hit: metrics.refusals.labels(reason=hit.kind).inc()))
    return checks
