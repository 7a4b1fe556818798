"""Engines and schema management for SQLite and PostgreSQL.

SQLite: WAL mode, a busy timeout, and every write transaction opened with ``BEGIN IMMEDIATE`` (so a
transaction never has to upgrade a read lock, which fails at once with SQLITE_BUSY in WAL mode). Reads
go through a second engine whose transactions are deferred, so they never wait for the write lock.
PostgreSQL: one engine for both; claims use ``FOR UPDATE SKIP LOCKED``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.exc import NoSuchModuleError

from storage.errors import DatabaseUnavailable, SchemaOutOfDate, StorageError

_log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def safe_url(url: str) -> str:
    """The URL with any password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


@dataclass
class Database:
    """The engines for one database.

    ``write``: transactions that write (SQLite: ``BEGIN IMMEDIATE``). ``single``: one statement that
    is a transaction by itself (PostgreSQL: autocommit, one round trip instead of BEGIN, statement,
    COMMIT; SQLite: same as ``write``). ``read``: reads (PostgreSQL: autocommit; SQLite: deferred).
    ``lease``: the workers' lease transitions (:meth:`run_prepared`); on PostgreSQL its own pool
    whose commits do not wait for the disk (``synchronous_commit = off``), see :func:`_lease_engine`;
    SQLite: same as ``write`` (already ``synchronous=NORMAL``, the same trade).
    """

    url: str
    write: Engine
    read: Engine
    single: Engine
    lease: Engine

    @property
    def dialect(self) -> str:
        return self.write.dialect.name

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    def dispose(self) -> None:
        self.write.dispose()
        self.read.dispose()
        self.lease.dispose()

    def run_prepared(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """PostgreSQL hot paths (a worker's claim and completion): one autocommit statement run by
        the driver itself, prepared on the server, rows as plain tuples. This skips SQLAlchemy's
        per-call work (about half of a worker's client CPU at batch 50); a lost connection is
        invalidated and surfaces as :class:`DatabaseUnavailable`, as everywhere else."""
        import psycopg

        with self.lease.connect() as conn:
            raw = conn.connection.driver_connection
            try:
                return raw.execute(sql, params, prepare=True).fetchall()  # type: ignore[union-attr]
            except psycopg.Error as exc:
                if not (raw.broken or raw.closed):  # type: ignore[union-attr]
                    raise
                conn.invalidate()
                raise _lost(self.url, exc) from None


def _sqlite_engine(url: sa.URL, busy_timeout: float, immediate: bool) -> Engine:
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": busy_timeout, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        # Let us issue BEGIN ourselves (the driver's implicit BEGIN is deferred and too late).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # type: ignore[no-untyped-def]
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def connect(url: str, *, busy_timeout: float = 10.0, pool_size: int = 5, check: bool = True) -> Database:
    """Build the engines for ``url`` and, with ``check``, make sure the database answers."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StorageError(
            f"database URL {url!r} is not a SQLAlchemy URL (e.g. sqlite:///path.db or "
            "postgresql+psycopg://user@host/dbname): fix [database] url or DALLEBOT_DATABASE_URL"
        ) from None
    try:
        if parsed.get_backend_name() == "sqlite":
            write = _sqlite_engine(parsed, busy_timeout, True)
            db = Database(url, write, _sqlite_engine(parsed, busy_timeout, False), write, write)
        elif parsed.get_backend_name() == "postgresql":
            if parsed.drivername == "postgresql":
                parsed = parsed.set(drivername="postgresql+psycopg")
            # No pre-ping (a round trip per transaction): a connection that died with the server is
            # invalidated on its first error, which surfaces as DatabaseUnavailable, and replaced.
            engine = sa.create_engine(parsed, pool_size=pool_size, max_overflow=pool_size)
            auto = engine.execution_options(isolation_level="AUTOCOMMIT")
            db = Database(url, engine, auto, auto, _lease_engine(parsed, pool_size))
        else:
            raise StorageError(
                f"database {safe_url(url)}: only SQLite and PostgreSQL are supported"
            )
    except NoSuchModuleError as exc:
        raise StorageError(f"database {safe_url(url)}: no driver for it ({exc})") from None
    for engine in {db.write, db.read, db.lease}:
        _map_outages(engine, url)
    if check:
        try:
            with db.read.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except (OperationalError, DatabaseUnavailable) as exc:
            db.dispose()
            if isinstance(exc, DatabaseUnavailable):
                first = str(exc).split(": ", 1)[-1]
            else:
                first = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc).splitlines()[0]
            raise DatabaseUnavailable(
                f"cannot reach the database {safe_url(url)}: {first}. "
                "Is the server running, and is [database] url / DALLEBOT_DATABASE_URL right?"
            ) from None
    return db


#: Session settings of the lease pool (PostgreSQL); see :func:`_lease_engine`.
LEASE_SETTINGS = ("synchronous_commit=off", "enable_sort=off", "enable_bitmapscan=off")


def _lease_engine(url: sa.URL, pool_size: int) -> Engine:
    """PostgreSQL connections for the workers' lease transitions (claim a batch, record its
    results), with two session settings (:data:`LEASE_SETTINGS`).

    The claim must walk ``ix_requests_claim`` in order and stop after the batch, whatever the
    planner's statistics say. When they are stale (a burst arrived since the last ANALYZE, exactly
    when throughput matters) the planner believes the queue holds a row or two and prefers to read
    every queued row through a bitmap and sort them: a cost that grows with the queue, on every claim
    (measured: 2.5 of 5.6 ms for a claim of 50 from 2,000 queued). Without sorts and bitmaps to choose
    from, the ordered index walk is the plan (tested).

    Asynchronous commit: the commit returns before its WAL reaches the disk.

    This is safe for these statements and only these, because a lease is recoverable state: if the
    server crashes and loses the last fraction of a second of such commits (never more, and never a
    torn or corrupt database), a lost claim leaves the request ``queued`` (another claim takes it),
    and a lost completion leaves it ``running`` under a lease that expires (it is generated again,
    from the same seed). Nothing is posted on the strength of a lost commit: delivery claims,
    ``posted``, intake and moderation commit synchronously, and a synchronous commit flushes all the
    WAL before it. It saves a disk flush per batch on the workers' hot path (about 10-15% of
    throughput with 4 workers here: docs/benchmarks.md)."""
    given = url.query.get("options", "")
    options = " ".join([*([given] if isinstance(given, str) else given), *(f"-c {o}" for o in LEASE_SETTINGS)]).strip()
    return sa.create_engine(url.update_query_dict({"options": options}), pool_size=min(pool_size, 2),
                            max_overflow=pool_size, isolation_level="AUTOCOMMIT")


def _map_outages(engine: Engine, url: str) -> None:
    """Lost or refused connections surface as :class:`DatabaseUnavailable` from every query, whoever
    runs it (SQLAlchemy still invalidates the dead pooled connections first)."""

    @event.listens_for(engine, "handle_error")
    def _on_error(ctx):  # type: ignore[no-untyped-def]
        if not isinstance(ctx.original_exception, Exception) or isinstance(ctx.original_exception, StorageError):
            return None
        connecting = ctx.connection is None
        if ctx.is_disconnect or (connecting and isinstance(ctx.sqlalchemy_exception, OperationalError)):
            return _lost(url, ctx.original_exception)
        return None


def _lost(url: str, exc: BaseException) -> DatabaseUnavailable:
    first = str(exc).strip().splitlines()
    return DatabaseUnavailable(f"lost the database {safe_url(url)}: {first[0] if first else type(exc).__name__}")


# ---- schema ---------------------------------------------------------------------------------

def alembic_config(db: Database):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", db.url.replace("%", "%%"))
    cfg.attributes["engine"] = db.write
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    return head


def current_revision(db: Database) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with db.read.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(db: Database, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(db), revision)


def downgrade(db: Database, revision: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(db), revision)


def ensure_schema(db: Database, *, auto_upgrade: bool) -> None:
    """Check that the schema is at the code's head revision; upgrade it if allowed."""
    current, head = current_revision(db), head_revision()
    if current == head:
        return
    if auto_upgrade:
        _log.info("upgrading database schema %s -> %s", current or "(empty)", head)
        upgrade(db)
        return
    raise SchemaOutOfDate(
        f"the database {safe_url(db.url)} is at schema {current or '(empty)'}, the code needs {head}: "
        "run `dallebot db upgrade`"
    )
