"""The composition root: build the database, queue, platforms and model from settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from bot.config import Settings
from bot.generation import Generator
from bot.platforms.base import Platform
from bot.platforms.local import LocalPlatform
from storage import db as dbmod
from storage.queue import Queue, QueuePolicy

_log = logging.getLogger(__name__)


@dataclass
class App:
    settings: Settings
    db: dbmod.Database
    queue: Queue
    platforms: dict[str, Platform] = field(default_factory=dict)

    @property
    def local(self) -> LocalPlatform:
        return self.platforms["local"]  # type: ignore[return-value]

    @cached_property
    def generator(self) -> Generator:
        from bot.model import load_generator

        return load_generator(self.settings.model)

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
    platforms: dict[str, Platform] = {}
    if settings.local.enabled:
        platforms["local"] = LocalPlatform(Path(settings.outbox_dir))
    return App(settings=settings, db=db, queue=queue, platforms=platforms)
