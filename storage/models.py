"""SQLAlchemy 2 models: requests, users, the audit log (the queue log) and platform cursors.

Times are naive UTC datetimes everywhere (SQLite has no time zones); :func:`utcnow` makes them.
The Alembic migrations in ``migrations/`` must describe exactly these tables: a test compares them.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Autoincrementing 64-bit ids on PostgreSQL, INTEGER PRIMARY KEY (rowid) on SQLite.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Request(Base):
    """One image request: a mention, an interaction, or a local prompt."""

    __tablename__ = "requests"
    __table_args__ = (
        UniqueConstraint("platform", "external_id"),
        # The claim walks this index in order; partial, so finished rows cost nothing.
        Index(
            "ix_requests_claim",
            "priority",
            "slot",
            "id",
            postgresql_where=text("status = 'queued'"),
            sqlite_where=text("status = 'queued'"),
        ),
        Index("ix_requests_author", "platform", "author_id", "created_at"),
        # Discord guild/channel rate limits; partial, so other platforms' rows cost nothing here.
        Index("ix_requests_guild", "platform", "guild_id", "created_at",
              postgresql_where=text("guild_id IS NOT NULL"), sqlite_where=text("guild_id IS NOT NULL")),
        Index("ix_requests_channel", "platform", "channel_id", "created_at",
              postgresql_where=text("guild_id IS NOT NULL"), sqlite_where=text("guild_id IS NOT NULL")),
        # The dashboard's time ranges. BRIN on PostgreSQL (rows arrive in creation order; no B-tree
        # entry per state change: migration 0006); a B-tree on SQLite.
        Index("ix_requests_created", "created_at", postgresql_using="brin"),
        # min(slot) of the queue, read by every enqueue (fair-share order)
        Index(
            "ix_requests_queued_slot",
            "slot",
            postgresql_where=text("status = 'queued'"),
            sqlite_where=text("status = 'queued'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    platform: Mapped[str] = mapped_column(String(16))
    external_id: Mapped[str] = mapped_column(String(128))
    channel_id: Mapped[str | None] = mapped_column(String(128))
    guild_id: Mapped[str | None] = mapped_column(String(128))
    author_id: Mapped[str] = mapped_column(String(128))
    author_name: Mapped[str] = mapped_column(String(256), default="")
    prompt_raw: Mapped[str] = mapped_column(Text)
    prompt: Mapped[str] = mapped_column(Text)  # normalised
    n_images: Mapped[int] = mapped_column(Integer, default=4)
    seed: Mapped[int | None] = mapped_column(BigInteger)
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(20))
    priority: Mapped[int] = mapped_column(Integer, default=0)  # smaller is served first
    slot: Mapped[int] = mapped_column(BigInteger, default=0)  # fair-share order (see storage.queue)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    run_at: Mapped[dt.datetime] = mapped_column(DateTime)  # not before (retry backoff)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_token: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    error: Mapped[str | None] = mapped_column(Text)
    image_paths: Mapped[list[str]] = mapped_column(JSON, default=list)
    nsfw_scores: Mapped[list[float]] = mapped_column(JSON, default=list)
    reply_id: Mapped[str | None] = mapped_column(String(128))
    reply_url: Mapped[str | None] = mapped_column(Text)
    notify: Mapped[bool] = mapped_column(Boolean, default=True)  # a reply (or refusal) is owed
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)


class User(Base):
    """A requester on one platform: ban state, moderator notes, fair-share counter."""

    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("platform", "platform_user_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    platform: Mapped[str] = mapped_column(String(16))
    platform_user_id: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(256), default="")
    banned: Mapped[bool] = mapped_column(Boolean, default=False)
    ban_reason: Mapped[str | None] = mapped_column(Text)
    notes: Mapped[str] = mapped_column(Text, default="")
    next_slot: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime)


#: Queue-log entries that time-window counts read: all but the workers' lease entries ("claimed",
#: "posting"), which ix_audit_log_created leaves out. A query on that index states COUNTED_LOG.
_COUNTED_LOG_SQL = "action NOT IN ('claimed', 'posting')"


class AuditEntry(Base):
    """The queue log: every state change and moderator action, with actor, reason and time."""

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_log_request", "request_id", "id"),
        # Time-window counts (dashboard counters, throughput); lease entries are never counted (0005).
        Index("ix_audit_log_created", "created_at",
              postgresql_where=text(_COUNTED_LOG_SQL), sqlite_where=text(_COUNTED_LOG_SQL)),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # No foreign key: the log is append-only, written in the same statement as the change it records,
    # and requests are never deleted (migration 0004 says why the check went).
    request_id: Mapped[int | None] = mapped_column(BigId)
    user_ref: Mapped[str | None] = mapped_column(String(160))  # "platform:id" for user actions
    actor: Mapped[str] = mapped_column(String(160))  # "worker:<id>", "moderator:<name>", "intake:x", ...
    action: Mapped[str] = mapped_column(String(32))
    from_status: Mapped[str | None] = mapped_column(String(20))
    to_status: Mapped[str | None] = mapped_column(String(20))
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)


COUNTED_LOG = text(f"audit_log.{_COUNTED_LOG_SQL}")  # literal: planners match it to the index predicate


class Cursor(Base):
    """Per-platform progress markers, e.g. the last seen mention id on X."""

    __tablename__ = "cursors"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime)


# ---- moderator dashboard (issue 7): accounts, sessions, login attempts, switches ----------------

# The queue log filtered by status, newest first (the dashboard's commonest query): one index range.
Index("ix_requests_status_id", Request.__table__.c.status, Request.__table__.c.id)


class Moderator(Base):
    """A dashboard account. ``password_hash`` is an argon2id hash (argon2-cffi's PHC string)."""

    __tablename__ = "moderators"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime)
    last_login_at: Mapped[dt.datetime | None] = mapped_column(DateTime)


class ModeratorSession(Base):
    """A logged-in browser. ``id`` is the SHA-256 of the cookie's random token (the token itself is
    never stored), so a leaked table does not hand out sessions; deleting a row logs it out."""

    __tablename__ = "moderator_sessions"
    __table_args__ = (Index("ix_moderator_sessions_moderator", "moderator_id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    moderator_id: Mapped[int] = mapped_column(ForeignKey("moderators.id", ondelete="CASCADE"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    last_seen_at: Mapped[dt.datetime] = mapped_column(DateTime)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime)
    flash: Mapped[str | None] = mapped_column(Text)  # one message shown on the next page


class LoginAttempt(Base):
    """Every dashboard login attempt, for throttling by name and by client address."""

    __tablename__ = "login_attempts"
    __table_args__ = (
        Index("ix_login_attempts_name", "name", "id"),
        Index("ix_login_attempts_ip", "ip", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    ip: Mapped[str] = mapped_column(String(64))
    ok: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)


class Switch(Base):
    """Operator switches such as ``intake_paused`` and ``generation_paused`` (absent means off)."""

    __tablename__ = "switches"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[bool] = mapped_column(Boolean)
    updated_by: Mapped[str] = mapped_column(String(160))
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime)
