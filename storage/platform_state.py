"""Small pieces of shared state the platform adapters keep in the database (no migration needed).

Everything here lives in the existing ``cursors`` table (name, value, updated_at) and is changed with
compare-and-set updates (``UPDATE ... WHERE name = :n AND value = :old``), so it works the same on
SQLite and PostgreSQL and across processes:

* :class:`Lease` — "only one X poller across all processes": a named lease row holding its owner and
  expiry. The holder renews it on every poll; another process takes it over only once it expired.
* :class:`DailyCounter` — daily budgets (posts, refusal replies): ``"<UTC date>:<count>"``; a new day
  starts at zero.
* :func:`audit` — one row in the queue log for adapter events that are not state changes (a refusal
  posted or skipped, a position message that could not be edited).
* :func:`throughput` — requests generated per second, measured from the queue log, for ETAs.
* :func:`owed_refusals` — refused requests whose refusal reply has no outcome in the queue log yet
  (the process died between storing the request and replying): the X poller sends them late.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy import func, insert, select, update

from storage.db import Database
from storage.models import COUNTED_LOG, AuditEntry, Cursor, Request, utcnow
from storage.records import RequestRecord
from storage.states import Status

C = Cursor.__table__
A = AuditEntry.__table__
R = Request.__table__

#: Queue-log actions that settle a refused request's reply (sent, or decided not to be sent).
REFUSAL_OUTCOMES = ("refusal_posted", "refusal_skipped", "refusal_failed")

_CAS_TRIES = 20


def _insert_if_absent(db: Database, conn: sa.Connection, name: str, value: str, now: dt.datetime) -> bool:
    """Insert the row ``name`` unless it exists; True when this call inserted it."""
    if db.is_sqlite:
        from sqlalchemy.dialects.sqlite import insert as ins
    else:
        from sqlalchemy.dialects.postgresql import insert as ins
    stmt = ins(C).values(name=name, value=value, updated_at=now).on_conflict_do_nothing(index_elements=[C.c.name])
    return conn.execute(stmt.returning(C.c.name)).first() is not None


def _cas(conn: sa.Connection, name: str, old: str, new: str, now: dt.datetime) -> bool:
    stmt = update(C).where(C.c.name == name, C.c.value == old).values(value=new, updated_at=now)
    return conn.execute(stmt.returning(C.c.name)).first() is not None


@dataclass(frozen=True, slots=True)
class LeaseHolder:
    owner: str
    expires_at: dt.datetime


class Lease:
    """A named lease in the ``cursors`` table: at most one owner at a time, across processes."""

    def __init__(self, db: Database, name: str, *, clock: Callable[[], dt.datetime] = utcnow) -> None:
        self.db, self.name, self.clock = db, name, clock

    @staticmethod
    def _decode(value: str) -> LeaseHolder | None:
        try:
            raw = json.loads(value)
            return LeaseHolder(str(raw["owner"]), dt.datetime.fromisoformat(raw["expires_at"]))
        except (ValueError, KeyError, TypeError):
            return None  # unreadable: treat as free

    def acquire(self, owner: str, ttl: float) -> bool:
        """Take or renew the lease for ``ttl`` seconds; False while another owner holds it."""
        for _ in range(_CAS_TRIES):
            now = self.clock()
            value = json.dumps({"owner": owner, "expires_at": (now + dt.timedelta(seconds=ttl)).isoformat()})
            with self.db.write.begin() as conn:
                if _insert_if_absent(self.db, conn, self.name, value, now):
                    return True
                current = conn.execute(select(C.c.value).where(C.c.name == self.name)).scalar_one_or_none()
                if current is None:
                    continue  # released in between: try to insert again
                holder = self._decode(current)
                if holder is not None and holder.owner != owner and holder.expires_at > now:
                    return False
                if _cas(conn, self.name, current, value, now):
                    return True
        return False

    def release(self, owner: str) -> bool:
        """Give the lease up if ``owner`` holds it (so another process need not wait for expiry)."""
        with self.db.write.begin() as conn:
            current = conn.execute(select(C.c.value).where(C.c.name == self.name)).scalar_one_or_none()
            holder = None if current is None else self._decode(current)
            if holder is None or holder.owner != owner:
                return False
            expired = json.dumps({"owner": "", "expires_at": dt.datetime(1970, 1, 1).isoformat()})
            return _cas(conn, self.name, current, expired, self.clock())  # type: ignore[arg-type]

    def holder(self) -> LeaseHolder | None:
        with self.db.read.connect() as conn:
            current = conn.execute(select(C.c.value).where(C.c.name == self.name)).scalar_one_or_none()
        holder = None if current is None else self._decode(current)
        if holder is None or not holder.owner or holder.expires_at <= self.clock():
            return None
        return holder


class DailyCounter:
    """A per-UTC-day counter with a limit, shared by every process (a posting budget)."""

    def __init__(self, db: Database, name: str, *, clock: Callable[[], dt.datetime] = utcnow) -> None:
        self.db, self.name, self.clock = db, name, clock

    def _day(self) -> str:
        return self.clock().date().isoformat()

    @staticmethod
    def _count(value: str | None, day: str) -> int:
        if value is None:
            return 0
        stored_day, _, n = value.partition(":")
        return int(n) if stored_day == day and n.isdigit() else 0

    def used(self) -> int:
        with self.db.read.connect() as conn:
            value = conn.execute(select(C.c.value).where(C.c.name == self.name)).scalar_one_or_none()
        return self._count(value, self._day())

    def remaining(self, limit: int) -> int:
        return max(0, limit - self.used())

    def take(self, limit: int) -> bool:
        """Count one use if today's count is below ``limit``; False (nothing counted) otherwise."""
        if limit <= 0:
            return False
        for _ in range(_CAS_TRIES):
            now = self.clock()
            day = now.date().isoformat()
            with self.db.write.begin() as conn:
                if _insert_if_absent(self.db, conn, self.name, f"{day}:1", now):
                    return True
                current = conn.execute(select(C.c.value).where(C.c.name == self.name)).scalar_one_or_none()
                if current is None:
                    continue
                n = self._count(current, day)
                if n >= limit:
                    return False
                if _cas(conn, self.name, current, f"{day}:{n + 1}", now):
                    return True
        return False

    def give_back(self) -> None:
        """Undo one :meth:`take` of today (the use it counted did not happen)."""
        for _ in range(_CAS_TRIES):
            now = self.clock()
            day = now.date().isoformat()
            with self.db.write.begin() as conn:
                current = conn.execute(select(C.c.value).where(C.c.name == self.name)).scalar_one_or_none()
                n = self._count(current, day)
                if current is None or n == 0 or _cas(conn, self.name, current, f"{day}:{n - 1}", now):
                    return

    def seconds_to_reset(self) -> float:
        """Seconds until the next UTC midnight, when the budget starts again."""
        now = self.clock()
        tomorrow = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time())
        return max(1.0, (tomorrow - now).total_seconds())


def audit(db: Database, *, request_id: int | None, actor: str, action: str, reason: str | None = None,
          user_ref: str | None = None, clock: Callable[[], dt.datetime] = utcnow) -> None:
    """One queue-log row for an adapter event that changes no request status."""
    with db.write.begin() as conn:
        conn.execute(insert(A).values(request_id=request_id, user_ref=user_ref, actor=actor[:160], action=action[:32],
                                      from_status=None, to_status=None, reason=reason, created_at=clock()))


def throughput(db: Database, *, window: float = 3600.0, clock: Callable[[], dt.datetime] = utcnow) -> float:
    """Requests generated per second over the last ``window`` seconds (0.0 when none were)."""
    since = clock() - dt.timedelta(seconds=window)
    with db.read.connect() as conn:
        row = conn.execute(
            select(func.count(), func.min(A.c.created_at))
            .where(COUNTED_LOG, A.c.created_at >= since, A.c.action == "generated")
        ).one()
    n, first = row
    if not n:
        return 0.0
    # Over the span actually observed (a fresh worker is not averaged over a whole hour of idleness),
    # but never shorter than a minute, so one quick batch does not promise miracles.
    span = max(60.0, (clock() - first).total_seconds())
    return n / span


def owed_refusals(db: Database, platform: str, *, since: dt.datetime, before: dt.datetime,
                  limit: int = 20) -> list[RequestRecord]:
    """Requests of ``platform`` refused (status ``rejected``) between ``since`` and ``before``, at
    intake or later by a moderator (the time of the refusal counts, not the request's age), whose
    queue log has no refusal outcome: their reply is still owed. Oldest first."""
    settled = select(A.c.id).where(A.c.request_id == R.c.id, A.c.action.in_(REFUSAL_OUTCOMES)).exists()
    refused = select(A.c.request_id).where(
        COUNTED_LOG, A.c.created_at >= since, A.c.created_at < before, A.c.to_status == Status.REJECTED.value,
        A.c.action.in_(["received", "rejected"]))
    with db.read.connect() as conn:
        rows = conn.execute(
            select(R).where(R.c.id.in_(refused), R.c.platform == platform,
                            R.c.status == Status.REJECTED.value, ~settled)
            .order_by(R.c.id).limit(limit)
        ).all()
    return [RequestRecord.from_row(r) for r in rows]
