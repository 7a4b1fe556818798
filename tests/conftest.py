"""Shared fixtures: real databases (a SQLite file and the PostgreSQL server on 127.0.0.1:5432).

Each PostgreSQL test gets its own schema (via the connection's search_path), so tests are isolated
and the database `test` is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from storage import db as dbmod
from storage.queue import Queue, QueuePolicy

PG_SERVER = os.environ.get("DALLEBOT_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def pg_dsn() -> str:
    return PG_SERVER.replace("postgresql+psycopg://", "postgresql://")


@contextlib.contextmanager
def pg_schema() -> Iterator[str]:
    """A URL on the real PostgreSQL server whose tables live in a fresh schema, dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in PG_SERVER else "?"
    try:
        yield f"{PG_SERVER}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(pg_dsn(), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def pg_schema_url() -> Iterator[str]:
    with pg_schema() as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'queue.sqlite3'}"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test on a real SQLite file and on the real PostgreSQL server."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_schema_url")


@pytest.fixture
def database(db_url: str) -> Iterator[dbmod.Database]:
    db = dbmod.connect(db_url)
    dbmod.upgrade(db)
    yield db
    db.dispose()


class FakeClock:
    """A settable UTC clock for the queue (lease expiry and backoff without sleeping)."""

    def __init__(self) -> None:
        import datetime as dt

        self.now = dt.datetime(2026, 1, 1, 12, 0, 0)

    def __call__(self):  # type: ignore[no-untyped-def]
        return self.now

    def advance(self, seconds: float) -> None:
        import datetime as dt

        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _test_queue(db: dbmod.Database, clock: FakeClock) -> Queue:
    import random

    return Queue(db, QueuePolicy(lease_seconds=60, max_attempts=3, retry_base_seconds=10, retry_max_seconds=600),
                 clock=clock, rng=random.Random(0))


@pytest.fixture
def queue(database: dbmod.Database, clock: FakeClock) -> Queue:
    return _test_queue(database, clock)


@pytest.fixture
def twin_queue(db_url: str, tmp_path: Path, clock: FakeClock) -> Iterator[Queue]:
    """A second, empty queue on the same kind of database as ``queue`` (to compare two ways of
    doing the same thing)."""
    with contextlib.ExitStack() as stack:
        url = f"sqlite:///{tmp_path / 'twin.sqlite3'}" if db_url.startswith("sqlite") else stack.enter_context(pg_schema())
        db = dbmod.connect(url)
        dbmod.upgrade(db)
        yield _test_queue(db, clock)
        db.dispose()
