"""Counts that rate limits are decided from, read from the requests table itself.

Limits hold across restarts and processes because they are computed from what is stored: a user's
accepted requests in a window (index ``ix_requests_author``), a guild's or channel's
(``ix_requests_guild``, ``ix_requests_channel``), and the queue's depth (the partial index on
queued rows). Refused requests (status ``rejected``) do not count, so being refused does not extend
a limit. Concurrent intakes can overshoot a limit by the number of requests admitted at the same
instant; nothing else does.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence

from sqlalchemy import func, select

from storage.db import Database
from storage.models import Request
from storage.states import Status

R = Request.__table__

# What each kind of limit counts by: the key column, and any extra condition (the channel index is
# partial on guild_id IS NOT NULL: only guild channels are limited).
_KINDS = {
    "user": (R.c.author_id, ()),
    "guild": (R.c.guild_id, ()),
    "channel": (R.c.channel_id, (R.c.guild_id.is_not(None),)),
}


class LimitCounts:
    def __init__(self, db: Database) -> None:
        self.db = db

    def window(self, kind: str, platform: str, key: str, since: dt.datetime, limit: int
               ) -> tuple[int, dt.datetime | None]:
        """For one key of ``kind`` ("user", "guild" or "channel"): (count in the window, creation time
        of the request whose ageing-out frees a slot, when the count reaches ``limit``)."""
        col, extra = _KINDS[kind]
        cond = [R.c.platform == platform, col == key, *extra, R.c.created_at >= since,
                R.c.status != Status.REJECTED.value]
        with self.db.read.connect() as conn:
            n = conn.execute(select(func.count()).select_from(R).where(*cond)).scalar_one()
            oldest = None
            if n >= limit > 0:
                oldest = conn.execute(
                    select(R.c.created_at).where(*cond).order_by(R.c.created_at.desc()).offset(limit - 1).limit(1)
                ).scalar_one_or_none()
        return n, oldest

    def grouped(self, kind: str, platform: str, keys: Sequence[str], windows: Mapping[str, dt.datetime]
                ) -> dict[str, dict[str, int]]:
        """Counts for many keys at once (one query): ``{key: {window name: count}}`` for the
        ``kind`` ("user", "guild" or "channel") of ``platform``, one count per window start in
        ``windows``. Keys with nothing in any window are absent. Batch intake decides from these."""
        if not keys or not windows:
            return {}
        col, cond = _KINDS[kind]
        since = min(windows.values())
        counts = [func.count().filter(R.c.created_at >= start).label(f"n{i}") for i, start in enumerate(windows.values())]
        stmt = (select(col, *counts)
                .where(R.c.platform == platform, col.in_(sorted(set(keys))), *cond, R.c.created_at >= since,
                       R.c.status != Status.REJECTED.value)
                .group_by(col))
        with self.db.read.connect() as conn:
            rows = conn.execute(stmt).all()
        names = list(windows)
        return {row[0]: {name: row[i + 1] for i, name in enumerate(names)} for row in rows}

    def queued(self) -> int:
        with self.db.read.connect() as conn:
            return conn.execute(
                select(func.count()).select_from(R).where(R.c.status == Status.QUEUED.value)
            ).scalar_one()

    def posted_since(self, platform: str, since: dt.datetime) -> int:
        with self.db.read.connect() as conn:
            return conn.execute(
                select(func.count()).select_from(R).where(
                    R.c.platform == platform, R.c.status == Status.POSTED.value, R.c.finished_at >= since)
            ).scalar_one()


__all__ = ["LimitCounts"]
