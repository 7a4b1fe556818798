"""The request queue on SQLite or PostgreSQL: intake, leased claims, fenced updates, moderation.

Ordering and fairness
    Requests are served by ``(priority, slot, id)``, smallest first. ``slot`` is a fair-share
    counter: when a user enqueues, the request gets ``max(user.next_slot, virtual time)`` where the
    virtual time is the smallest slot still queued (with an empty queue, the newest request's
    slot). One user's 50 requests therefore take slots
    s, s+1, ..., s+49, while another user's first request lands at the head of the line, right after
    the request being served now: users are interleaved round-robin, at O(log n) per claim.

Claims and leases
    :meth:`Queue.claim` moves up to ``limit`` queued requests to ``running`` in one statement, with
    a fresh lease token and an expiry (PostgreSQL: ``FOR UPDATE SKIP LOCKED`` in a materialised CTE;
    SQLite: the same statement under ``BEGIN IMMEDIATE``). Every later update by the worker carries
    ``WHERE id = :id AND status = :expected AND lease_token = :token``: a worker whose lease expired
    and was reclaimed updates nothing and gets :class:`LeaseLost`. :meth:`Queue.reclaim_expired`
    returns expired ``running`` requests to the queue with backoff (or ``dead`` when out of attempts).

Delivery
    :meth:`Queue.claim_deliveries` moves ``generated`` requests to ``posting`` (intent recorded before
    the platform is called) and also re-claims ``posting`` requests whose lease expired; those are
    flagged in :attr:`Claim.recovering` so the deliverer checks the platform before posting again.
    A recovery that could not ask the platform stays ``posting`` (no holder, its lease expiring at
    the retry time), so the retry is a recovery again (:meth:`delivery_failed`).

Every state change writes an audit row (the queue log) in the same transaction.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import random
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import func, insert, select, tuple_, update
from sqlalchemy.engine import Connection

from storage import states
from storage.db import Database
from storage.errors import IllegalTransition, LeaseLost, NotFound
from storage.models import AuditEntry, Cursor, Request, User, utcnow
from storage.records import (
    AuditRecord,
    Claim,
    EnqueueResult,
    Generated,
    NewRequest,
    REQUEST_FIELDS,
    RequestRecord,
    UserRecord,
    parse_user_ref,
)
from storage.states import Status

R = Request.__table__
U = User.__table__
A = AuditEntry.__table__
C = Cursor.__table__

S = Status


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    lease_seconds: float = 300.0
    max_attempts: int = 3
    retry_base_seconds: float = 10.0
    retry_max_seconds: float = 600.0

    @classmethod
    def from_config(cls, cfg: Any) -> QueuePolicy:
        return cls(cfg.lease_seconds, cfg.max_attempts, cfg.retry_base_seconds, cfg.retry_max_seconds)


def backoff_seconds(attempt: int, base: float, cap: float, jitter: float) -> float:
    """Exponential backoff for the ``attempt``-th failure (1-based), capped, plus ``jitter`` in [0, 1)
    times 20%. Pure: the caller supplies the random number."""
    delay = min(cap, base * (2 ** max(0, attempt - 1)))
    return delay * (1.0 + 0.2 * jitter)


class Queue:
    """All reads and writes of requests, users, the audit log and cursors."""

    def __init__(
        self,
        db: Database,
        policy: QueuePolicy | None = None,
        *,
        clock: Callable[[], dt.datetime] = utcnow,
        rng: random.Random | None = None,
    ) -> None:
        self.db = db
        self.policy = policy or QueuePolicy()
        self.clock = clock
        self.rng = rng or random.Random()

    # ---- plumbing -------------------------------------------------------------------------

    # A lost or refused connection surfaces as DatabaseUnavailable from any query: the engines map
    # it (storage.db._map_outages), so nothing here needs to.

    @contextlib.contextmanager
    def _write(self, *, single: bool = False) -> Iterator[Connection]:
        """A write transaction; ``single=True`` when it is one statement (autocommit on PostgreSQL)."""
        with (self.db.single if single else self.db.write).begin() as conn:
            yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.db.read.connect() as conn:
            yield conn

    def _audit(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
        if rows:
            now = self.clock()
            conn.execute(insert(A), [{"created_at": now, "user_ref": None, "reason": None, **r} for r in rows])

    def _update_audited(
        self,
        conn: Connection,
        stmt: sa.Update,
        *,
        actor: str,
        action: str,
        from_status: str,
        to_status: str,
        reason: Callable[[Any], Any] | None = None,
    ) -> list[RequestRecord]:
        """Run an UPDATE of requests and write one audit row per updated request; returns the
        updated records.

        On PostgreSQL this is one statement (the audit INSERT is a data-modifying CTE over the
        UPDATE's RETURNING), on SQLite two (no network round trips to save there).
        ``reason`` maps the updated rows (a CTE or a Row) to the reason expression or value.
        """
        now = self.clock()
        returning = list(R.c)
        if self.db.is_sqlite:
            rows = conn.execute(stmt.returning(*returning)).all()
            self._audit(conn, [
                {"request_id": r.id, "actor": actor, "action": action, "from_status": from_status,
                 "to_status": to_status, "reason": reason(r) if reason else None}
                for r in rows
            ])
        else:
            rows = conn.execute(self._audited_cte(stmt.returning(*returning), now, actor, action, from_status,
                                                  to_status, reason)).all()
        return [RequestRecord.from_row(r) for r in rows]

    @staticmethod
    def _audited_cte(stmt: Any, now: dt.datetime, actor: str, action: str, from_status: str, to_status: str,
                     reason: Callable[[Any], Any] | None) -> sa.Select:
        upd = stmt.cte("upd")
        cols = ["request_id", "actor", "action", "from_status", "to_status", "reason", "created_at"]
        src = select(
            upd.c.id,
            sa.literal(actor, sa.String),
            sa.literal(action, sa.String),
            sa.literal(from_status, sa.String),
            sa.literal(to_status, sa.String),
            _as_sql(reason(upd.c)) if reason else sa.null(),
            sa.literal(now, sa.DateTime),
        )
        ins = insert(A).from_select(cols, src).cte("ins")
        return select(upd).add_cte(ins)

    @staticmethod
    def _one(conn: Connection, request_id: int, *, lock: bool = False) -> RequestRecord:
        q = select(R).where(R.c.id == request_id)
        if lock:
            q = q.with_for_update()
        row = conn.execute(q).first()
        if row is None:
            raise NotFound(f"no request with id {request_id}")
        return RequestRecord.from_row(row)

    # ---- intake ---------------------------------------------------------------------------

    def enqueue(
        self,
        new: NewRequest,
        *,
        actor: str | None = None,
        status: Status = S.QUEUED,
        reason: str | None = None,
    ) -> EnqueueResult:
        """Store a request; idempotent on ``(platform, external_id)``.

        ``status`` is the intake's decision: ``queued`` (the default), ``rejected`` (filtered,
        rate-limited: ``reason`` says why) or ``held_for_review``. A banned user's request is stored
        as ``rejected`` whatever the intake decided. Returns the stored request and whether it is new.
        """
        return self.enqueue_many([(new, status, reason)], actor=actor)[0]

    def enqueue_many(self, items: Sequence[tuple[NewRequest, Status, str | None]], *,
                     actor: str | None = None) -> list[EnqueueResult]:
        """:meth:`enqueue` for a batch of ``(request, status, reason)`` in one transaction (on
        PostgreSQL one statement), in order: fair-share slots and ids come out as if each was
        enqueued after the one before it. An item whose ``(platform, external_id)`` is stored already,
        or came earlier in the same batch, gets the stored request back with ``created=False``."""
        for _new, status, _reason in items:
            if not states.allowed(S.RECEIVED, status):
                raise ValueError(f"intake cannot store a request as {status}")
        if not items:
            return []
        if not self.db.is_sqlite:
            return self._enqueue_pg(items, actor)
        now = self.clock()
        with self._write() as conn:
            return [self._enqueue_sqlite(conn, new, actor or f"intake:{new.platform}", status, reason, now)
                    for new, status, reason in items]

    def _enqueue_sqlite(self, conn: Connection, new: NewRequest, actor: str, status: Status, reason: str | None,
                        now: dt.datetime) -> EnqueueResult:
        stored = conn.execute(_SQLITE_STORED, {"platform": new.platform, "external_id": new.external_id}).first()
        if stored is not None:  # the same event delivered twice: the stored request wins
            return EnqueueResult(RequestRecord.from_row(stored), created=False)
        user = conn.execute(_SQLITE_USER, {"platform": new.platform, "author_id": new.author_id,
                                           "name": new.author_name, "now": now}).one()
        error = reason
        if user.banned and status != S.REJECTED:
            status, error = S.REJECTED, "user is banned"
        row = conn.execute(_SQLITE_INSERT, dict(
            platform=new.platform, external_id=new.external_id, channel_id=new.channel_id, guild_id=new.guild_id,
            author_id=new.author_id, author_name=new.author_name, prompt_raw=new.prompt_raw, prompt=new.prompt,
            n_images=new.n_images, seed=new.seed, options=dict(new.options), status=status.value,
            priority=new.priority, slot=user.next_slot - 1, attempts=0, max_attempts=self.policy.max_attempts,
            run_at=now, error=error, image_paths=[], nsfw_scores=[], notify=True, created_at=now, updated_at=now,
            finished_at=now if status in states.TERMINAL else None,
        )).one()
        conn.execute(_AUDIT_INSERT, {"request_id": row.id, "user_ref": f"{new.platform}:{new.author_id}",
                                     "actor": actor, "action": "received", "from_status": None,
                                     "to_status": status.value, "reason": error, "created_at": now})
        return EnqueueResult(RequestRecord.from_row(row), created=True)

    def _enqueue_pg(self, items: Sequence[tuple[NewRequest, Status, str | None]], actor: str | None
                    ) -> list[EnqueueResult]:
        """PostgreSQL: the whole batch (user upserts, request inserts, audit rows) in one statement."""
        columns: dict[str, list[Any]] = {name: [] for name, _type in _PG_INTAKE_COLUMNS}
        for new, status, reason in items:
            for name, value in (
                ("platform", new.platform), ("external_id", new.external_id), ("channel_id", new.channel_id),
                ("guild_id", new.guild_id), ("author_id", new.author_id), ("author_name", new.author_name),
                ("prompt_raw", new.prompt_raw), ("prompt", new.prompt), ("n_images", new.n_images),
                ("seed", new.seed), ("options", json.dumps(dict(new.options))), ("priority", new.priority),
                ("status", status.value), ("reason", reason), ("actor", actor or f"intake:{new.platform}"),
            ):
                columns[name].append(value)
        params = {**columns, "now": self.clock(), "max_attempts": self.policy.max_attempts,
                  "terminal": sorted(s.value for s in states.TERMINAL)}
        with self._write(single=True) as conn:
            created = {(row.platform, row.external_id): RequestRecord.from_row(row)
                       for row in conn.execute(_PG_ENQUEUE, params)}
            missing = {(new.platform, new.external_id) for new, _s, _r in items} - created.keys()
            stored: dict[tuple[str, str], RequestRecord] = {}
            if missing:  # delivered before (or twice in this batch): the stored request wins
                rows = conn.execute(select(R).where(tuple_(R.c.platform, R.c.external_id).in_(sorted(missing))))
                stored = {(row.platform, row.external_id): RequestRecord.from_row(row) for row in rows}
        out = []
        for new, _status, _reason in items:
            key = (new.platform, new.external_id)
            if key in created:
                out.append(EnqueueResult(created.pop(key), created=True))
                stored[key] = out[-1].request
            else:
                out.append(EnqueueResult(stored[key], created=False))
        return out

    # ---- worker: claim, renew, complete, fail ------------------------------------------------

    def claim(self, owner: str, limit: int) -> Claim:
        """Lease up to ``limit`` queued requests (fair order) to ``owner``."""
        now = self.clock()
        token = secrets.token_hex(16)
        expires = now + dt.timedelta(seconds=self.policy.lease_seconds)
        if not self.db.is_sqlite:  # the hot path of every worker
            rows = [RequestRecord.from_tuple(r) for r in self.db.run_prepared(_PG_CLAIM, dict(
                owner=owner, token=token, expires=expires, now=now, limit=limit, actor=f"worker:{owner}"))]
            recs = sorted(rows, key=lambda r: (r.priority, r.slot, r.id))
            return Claim(owner=owner, token=token, expires_at=expires, requests=tuple(recs))
        pick = (select(R.c.id).where(R.c.status == S.QUEUED.value, R.c.run_at <= now)
                .order_by(R.c.priority, R.c.slot, R.c.id).limit(limit))
        stmt = update(R).where(R.c.id.in_(pick.scalar_subquery())).values(
            status=S.RUNNING.value, attempts=R.c.attempts + 1, lease_owner=owner, lease_token=token,
            lease_expires_at=expires, started_at=now, updated_at=now)
        with self._write(single=True) as conn:
            rows = self._update_audited(conn, stmt, actor=f"worker:{owner}", action="claimed",
                                        from_status=S.QUEUED.value, to_status=S.RUNNING.value,
                                        reason=lambda r: f"attempt {r.attempts}")
        recs = sorted(rows, key=lambda r: (r.priority, r.slot, r.id))
        return Claim(owner=owner, token=token, expires_at=expires, requests=tuple(recs))

    def renew(self, claim: Claim) -> set[int]:
        """Extend the lease; returns the ids still owned (others were reclaimed or cancelled)."""
        now = self.clock()
        expires = now + dt.timedelta(seconds=self.policy.lease_seconds)
        with self._write(single=True) as conn:
            rows = conn.execute(
                update(R)
                .where(R.c.id.in_(claim.ids), R.c.lease_token == claim.token,
                       R.c.status.in_([S.RUNNING.value, S.POSTING.value]))
                .values(lease_expires_at=expires, updated_at=now)
                .returning(R.c.id)
            ).all()
        return {r.id for r in rows}

    def _fenced(
        self,
        conn: Connection,
        claim: Claim,
        request_id: int,
        expected: Status,
        target: Status,
        values: dict[str, Any],
        *,
        action: str,
        reason: str | None = None,
    ) -> RequestRecord:
        assert target == expected or states.allowed(expected, target), (expected, target)
        stmt = (
            update(R)
            .where(R.c.id == request_id, R.c.status == expected.value, R.c.lease_token == claim.token)
            .values(status=target.value, updated_at=self.clock(), **values)
        )
        rows = self._update_audited(conn, stmt, actor=f"worker:{claim.owner}", action=action,
                                    from_status=expected.value, to_status=target.value,
                                    reason=None if reason is None else (lambda _r: reason))
        if not rows:
            raise LeaseLost.for_request(request_id, expected)
        return rows[0]

    def complete(
        self,
        claim: Claim,
        request_id: int,
        image_paths: Sequence[str],
        nsfw_scores: Sequence[float] = (),
        *,
        hold_reason: str | None = None,
        seed: int | None = None,
    ) -> RequestRecord:
        """Record one request's images (see :meth:`complete_many`); raises :class:`LeaseLost` when
        this claim no longer owns the request."""
        if not self.complete_many(claim, [Generated(request_id, list(image_paths), list(nsfw_scores),
                                                    hold_reason, seed)]):
            raise LeaseLost.for_request(request_id, S.RUNNING)
        return self.get(request_id)

    def complete_many(self, claim: Claim, results: Sequence[Generated]) -> list[int]:
        """Record a batch's generation results in one transaction: each request becomes
        ``generated`` (or ``held_for_review`` with a hold reason), fenced by the claim's lease
        token, with one audit row each. Returns the ids recorded, in the order given; a request whose
        lease was lost is left alone and not returned. On PostgreSQL: one prepared statement."""
        if not results:
            return []
        now = self.clock()
        actor = f"worker:{claim.owner}"
        if not self.db.is_sqlite:
            done = {row[0] for row in self.db.run_prepared(_PG_COMPLETE, dict(
                ids=[g.request_id for g in results], paths=[json.dumps(list(g.image_paths)) for g in results],
                scores=[json.dumps(_scores(g)) for g in results],
                statuses=[g.status.value for g in results], actions=[g.action for g in results],
                holds=[g.hold_reason for g in results], seeds=[g.seed for g in results],
                now=now, token=claim.token, actor=actor))}
            return [g.request_id for g in results if g.request_id in done]
        with self._write() as conn:  # SQLite: the write lock is held, so owned stays owned
            owned = set(conn.execute(select(R.c.id).where(
                R.c.id.in_([g.request_id for g in results]), R.c.status == S.RUNNING.value,
                R.c.lease_token == claim.token)).scalars())
            todo = [g for g in results if g.request_id in owned]
            if todo:
                conn.execute(_SQLITE_COMPLETE, [
                    {"rid": g.request_id, "to": g.status.value, "paths": list(g.image_paths),
                     "scores": _scores(g), "new_seed": g.seed, "now": now} for g in todo])
                self._audit(conn, [
                    {"request_id": g.request_id, "actor": actor, "action": g.action,
                     "from_status": S.RUNNING.value, "to_status": g.status.value, "reason": g.hold_reason}
                    for g in todo])
        return [g.request_id for g in todo]

    def fail(self, claim: Claim, request_id: int, error: str, *, permanent: bool = False) -> RequestRecord:
        """A generation attempt failed: retry later with backoff, or ``dead``/``failed``."""
        with self._write() as conn:
            cur = self._one(conn, request_id)
            return self._retry_or_end(conn, claim, cur, S.RUNNING, error, permanent)

    def _retry_or_end(
        self, conn: Connection, claim: Claim, cur: RequestRecord, expected: Status, error: str,
        permanent: bool, retry_after: float | None = None, posted_unknown: bool = False,
    ) -> RequestRecord:
        now = self.clock()
        clear = dict(lease_owner=None, lease_token=None, lease_expires_at=None, error=error[:2000])
        if permanent:
            return self._fenced(conn, claim, cur.id, expected, S.FAILED, dict(clear, finished_at=now),
                                action="failed", reason=error)
        back = S.QUEUED if expected == S.RUNNING else S.GENERATED
        if posted_unknown and expected == S.POSTING:
            # Nobody knows whether the reply is out (the platform could not be asked after a crash
            # mid-post): the request stays `posting`, unleased, its lease "expiring" at the retry
            # time, so that the next claim is a recovery again and asks the platform before posting.
            back = S.POSTING

        def when(seconds: float) -> dict[str, Any]:
            at = now + dt.timedelta(seconds=seconds)
            return dict(lease_expires_at=at) if back == S.POSTING else dict(run_at=at)

        if retry_after is not None:
            # The platform said when to come back (rate limit, spent budget): waiting is not a
            # failure, so the attempt is given back and no number of such waits makes it dead.
            return self._fenced(conn, claim, cur.id, expected, back,
                                dict(clear, attempts=max(0, cur.attempts - 1), **when(retry_after)),
                                action="retry", reason=f"{error} (come back in {retry_after:.0f}s)")
        # Out of attempts, but the reply may be out: stay `posting` for one last look on the platform
        # (claim_deliveries makes the next claim a `last_check`), unless this was that look.
        last_look = back == S.POSTING and cur.id not in claim.final
        if cur.attempts >= cur.max_attempts and not last_look:
            return self._fenced(conn, claim, cur.id, expected, S.DEAD, dict(clear, finished_at=now),
                                action="dead", reason=f"out of attempts ({cur.attempts}): {error}")
        delay = backoff_seconds(cur.attempts, self.policy.retry_base_seconds, self.policy.retry_max_seconds,
                                self.rng.random())
        return self._fenced(conn, claim, cur.id, expected, back, dict(clear, **when(delay)),
                            action="retry", reason=f"{error} (retry in {delay:.0f}s)")

    def release(self, claim: Claim, reason: str = "worker shutting down") -> int:
        """Give unfinished claimed requests back without counting the attempt (graceful shutdown)."""
        now = self.clock()
        n = 0
        with self._write() as conn:
            for rid in claim.ids:
                row = conn.execute(
                    update(R)
                    .where(R.c.id == rid, R.c.lease_token == claim.token, R.c.status == S.RUNNING.value)
                    .values(status=S.QUEUED.value, attempts=R.c.attempts - 1, lease_owner=None,
                            lease_token=None, lease_expires_at=None, run_at=now, updated_at=now)
                    .returning(R.c.id)
                ).first()
                if row is not None:
                    n += 1
                    self._audit(conn, [{"request_id": rid, "actor": f"worker:{claim.owner}", "action": "released",
                                        "from_status": S.RUNNING.value, "to_status": S.QUEUED.value,
                                        "reason": reason}])
        return n

    def reclaim_expired(self, limit: int = 500) -> int:
        """Requeue (or mark dead) ``running`` requests whose lease has expired. Safe to run anywhere,
        any number of times at once."""
        now = self.clock()
        q = (
            select(R)
            .where(R.c.status == S.RUNNING.value, R.c.lease_expires_at < now)
            .order_by(R.c.lease_expires_at)
            .limit(limit)
        )
        if not self.db.is_sqlite:
            q = q.with_for_update(skip_locked=True)
        n = 0
        with self._write() as conn:
            for row in conn.execute(q).all():
                rec = RequestRecord.from_row(row)
                # Same rules as a failed attempt, fenced on the expired lease, logged as the reclaimer.
                stale = Claim(owner="reclaimer", token=rec.lease_token or "", expires_at=now, requests=(rec,))
                try:
                    self._retry_or_end(conn, stale, rec, S.RUNNING, f"lease of worker {rec.lease_owner} expired",
                                       permanent=False)
                    n += 1
                except LeaseLost:
                    pass
        return n

    # ---- delivery -------------------------------------------------------------------------

    def claim_deliveries(self, owner: str, limit: int, platforms: Sequence[str] | None = None) -> Claim:
        """Lease ``generated`` requests for posting (status ``posting``: the intent is recorded before
        the platform call) and re-lease ``posting`` requests whose lease expired (``recovering``)."""
        now = self.clock()
        token = secrets.token_hex(16)
        expires = now + dt.timedelta(seconds=self.policy.lease_seconds)
        cond = sa.or_(
            sa.and_(R.c.status == S.GENERATED.value, R.c.run_at <= now),
            sa.and_(R.c.status == S.POSTING.value, R.c.lease_expires_at < now),
        )
        if platforms is not None:
            cond = sa.and_(cond, R.c.platform.in_(list(platforms)))
        pick = (select(R.c.id, R.c.status, R.c.attempts, R.c.max_attempts).where(cond)
                .order_by(R.c.priority, R.c.id).limit(limit))
        if not self.db.is_sqlite:
            pick = pick.with_for_update(skip_locked=True)
        with self._write() as conn:
            picked = conn.execute(pick).all()
            # A delivery whose lease expired on its last attempt (the process posting it died, maybe
            # after the platform took the reply) gets one last look on the platform, nothing more:
            # posted if the reply is there, dead if not. One whose last look expired too (the process
            # crashes or hangs every time) ends as dead, instead of being re-claimed for ever.
            out = [p.id for p in picked if p.status == S.POSTING.value and p.attempts >= p.max_attempts]
            spent = [rid for rid in out if self._last_delivery_step(conn, rid) == "last_check"]
            final = frozenset(out) - set(spent)
            if spent:
                conn.execute(update(R).where(R.c.id.in_(spent)).values(
                    status=S.DEAD.value, lease_owner=None, lease_token=None, lease_expires_at=None,
                    error="out of attempts: the delivery lease expired again", finished_at=now, updated_at=now))
                self._audit(conn, [{"request_id": rid, "actor": f"worker:{owner}", "action": "dead",
                                    "from_status": S.POSTING.value, "to_status": S.DEAD.value,
                                    "reason": "out of attempts: the delivery lease expired again "
                                              "(the process posting it crashed or hung each time)"}
                                   for rid in spent])
                picked = [p for p in picked if p.id not in spent]
            recovering = frozenset(p.id for p in picked if p.status == S.POSTING.value)
            if not picked:
                return Claim(owner, token, expires, ())
            rows = conn.execute(
                update(R)
                .where(R.c.id.in_([p.id for p in picked]))
                .values(status=S.POSTING.value, attempts=R.c.attempts + 1, lease_owner=owner, lease_token=token,
                        lease_expires_at=expires, updated_at=now)
                .returning(*R.c)
            ).all()
            recs = tuple(sorted((RequestRecord.from_row(r) for r in rows), key=lambda r: r.id))
            self._audit(conn, [
                {"request_id": r.id, "actor": f"worker:{owner}",
                 "action": "last_check" if r.id in final else "recovering" if r.id in recovering else "posting",
                 "from_status": (S.POSTING if r.id in recovering else S.GENERATED).value,
                 "to_status": S.POSTING.value,
                 "reason": "out of attempts and the delivery lease expired: look for the reply on the platform, "
                           "post nothing" if r.id in final else
                           "earlier delivery lease expired: check the platform before posting" if r.id in recovering
                           else None}
                for r in recs
            ])
        return Claim(owner, token, expires, recs, recovering, final)

    @staticmethod
    def _last_delivery_step(conn: Connection, request_id: int) -> str | None:
        """The queue-log action of the request's latest delivery claim (or retry)."""
        return conn.execute(
            select(A.c.action).where(A.c.request_id == request_id,
                                     A.c.action.in_(["posting", "recovering", "last_check", "retry"]))
            .order_by(A.c.id.desc()).limit(1)).scalar_one_or_none()

    def mark_posted(self, claim: Claim, request_id: int, reply_id: str | None, reply_url: str | None = None) -> RequestRecord:
        now = self.clock()
        with self._write(single=True) as conn:
            return self._fenced(
                conn, claim, request_id, S.POSTING, S.POSTED,
                dict(reply_id=reply_id, reply_url=reply_url, finished_at=now, lease_owner=None,
                     lease_token=None, lease_expires_at=None, error=None),
                action="posted", reason=reply_id and f"reply {reply_id}",
            )

    def delivery_failed(
        self, claim: Claim, request_id: int, error: str, *, permanent: bool = False, retry_after: float | None = None,
        posted_unknown: bool = False,
    ) -> RequestRecord:
        """A delivery attempt failed: back to ``generated`` for a retry with backoff (or after
        ``retry_after``), or ``failed``/``dead``. ``posted_unknown``: the reply may be out already
        (a recovery could not ask the platform), so the retry is a recovery again (see
        :meth:`claim_deliveries`), still ``posting``."""
        with self._write() as conn:
            cur = self._one(conn, request_id)
            return self._retry_or_end(conn, claim, cur, S.POSTING, error, permanent, retry_after, posted_unknown)

    # ---- moderation -----------------------------------------------------------------------

    def _moderate(self, request_id: int, target: Status, actor: str, action: str, reason: str | None,
                  extra: Callable[[RequestRecord], dict[str, Any]] | None = None,
                  only_from: Status | None = None) -> RequestRecord:
        now = self.clock()
        with self._write() as conn:
            cur = self._one(conn, request_id, lock=not self.db.is_sqlite)
            verb = _MODERATION_VERBS.get(action, action)
            if only_from is not None and cur.status != only_from:   # checked again under the lock
                raise IllegalTransition(request_id, cur.status.value, target.value, verb,
                                        detail=f"and only requests {only_from.value.replace('_', ' ')} can be {action}")
            if not states.allowed(cur.status, target):
                raise IllegalTransition(request_id, cur.status.value, target.value, verb)
            values: dict[str, Any] = dict(status=target.value, updated_at=now)
            if target in states.TERMINAL:
                values["finished_at"] = now
            if cur.status in (S.RUNNING, S.POSTING):
                values.update(lease_owner=None, lease_token=None, lease_expires_at=None)
            if extra:
                values.update(extra(cur))
            row = conn.execute(
                update(R).where(R.c.id == request_id, R.c.status == cur.status.value).values(**values).returning(*R.c)
            ).first()
            if row is None:  # changed under us (PostgreSQL locks the row, so only SQLite readers race)
                raise IllegalTransition(request_id, "changed concurrently", target.value, action)
            self._audit(conn, [{"request_id": request_id, "actor": actor, "action": action,
                                "from_status": cur.status.value, "to_status": target.value, "reason": reason}])
            return RequestRecord.from_row(row)

    def approve(self, request_id: int, *, actor: str, reason: str | None = None) -> RequestRecord:
        """A held request goes on: to delivery if it has images, else to the generation queue."""
        rec = self.get(request_id)
        target = S.GENERATED if rec.image_paths else S.QUEUED
        if rec.status != S.HELD:
            raise IllegalTransition(request_id, rec.status.value, target.value, "approve",
                                    detail="and only requests held for review can be approved")
        return self._moderate(request_id, target, actor, "approved", reason,
                              lambda cur: {"run_at": self.clock()}, only_from=S.HELD)

    def reject(self, request_id: int, *, actor: str, reason: str | None = None) -> RequestRecord:
        return self._moderate(request_id, S.REJECTED, actor, "rejected", reason,
                              lambda cur: {"error": reason or "rejected by a moderator"})

    def hold(self, request_id: int, *, actor: str, reason: str | None = None) -> RequestRecord:
        return self._moderate(request_id, S.HELD, actor, "held", reason)

    def cancel(self, request_id: int, *, actor: str, reason: str | None = None) -> RequestRecord:
        return self._moderate(request_id, S.CANCELLED, actor, "cancelled", reason)

    def requeue(self, request_id: int, *, actor: str, reason: str | None = None) -> RequestRecord:
        """Give a finished-without-success request a fresh set of attempts."""
        return self._moderate(request_id, S.QUEUED, actor, "requeued", reason,
                              lambda cur: {"attempts": 0, "run_at": self.clock(), "error": None,
                                           "finished_at": None})

    def set_ban(self, user_ref: str, banned: bool, *, actor: str, reason: str | None = None) -> UserRecord:
        platform, uid = parse_user_ref(user_ref)
        now = self.clock()
        with self._write() as conn:
            ins = _upsert(self.db.dialect)(U).values(
                platform=platform, platform_user_id=uid, name="", banned=banned,
                ban_reason=reason if banned else None, notes="", next_slot=0, created_at=now, updated_at=now,
            )
            row = conn.execute(
                ins.on_conflict_do_update(
                    index_elements=[U.c.platform, U.c.platform_user_id],
                    set_={"banned": banned, "ban_reason": reason if banned else None, "updated_at": now},
                ).returning(*U.c)
            ).one()
            self._audit(conn, [{"request_id": None, "user_ref": f"{platform}:{uid}", "actor": actor,
                                "action": "banned" if banned else "unbanned", "from_status": None,
                                "to_status": None, "reason": reason}])
        return UserRecord.from_row(row)

    def set_user_notes(self, user_ref: str, notes: str, *, actor: str) -> UserRecord:
        platform, uid = parse_user_ref(user_ref)
        now = self.clock()
        with self._write() as conn:
            row = conn.execute(
                update(U).where(U.c.platform == platform, U.c.platform_user_id == uid)
                .values(notes=notes, updated_at=now).returning(*U.c)
            ).first()
            if row is None:
                raise NotFound(f"no user {platform}:{uid}")
            self._audit(conn, [{"request_id": None, "user_ref": f"{platform}:{uid}", "actor": actor,
                                "action": "noted", "from_status": None, "to_status": None, "reason": notes}])
        return UserRecord.from_row(row)

    # ---- queries --------------------------------------------------------------------------

    def get(self, request_id: int) -> RequestRecord:
        with self._read() as conn:
            return self._one(conn, request_id)

    def audit(self, request_id: int | None = None, *, user_ref: str | None = None, limit: int = 500) -> list[AuditRecord]:
        q = select(A).order_by(A.c.id).limit(limit)
        if request_id is not None:
            q = q.where(A.c.request_id == request_id)
        if user_ref is not None:
            q = q.where(A.c.user_ref == user_ref)
        with self._read() as conn:
            return [AuditRecord.from_row(r) for r in conn.execute(q)]

    def get_user(self, user_ref: str) -> UserRecord:
        platform, uid = parse_user_ref(user_ref)
        with self._read() as conn:
            row = conn.execute(select(U).where(U.c.platform == platform, U.c.platform_user_id == uid)).first()
        if row is None:
            raise NotFound(f"no user {platform}:{uid}")
        return UserRecord.from_row(row)

    def list(
        self,
        *,
        status: Sequence[str] | str | None = None,
        platform: str | None = None,
        user: str | None = None,
        text: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        before_id: int | None = None,
        limit: int = 50,
    ) -> list[RequestRecord]:
        """Newest first; page with ``before_id`` (the last id of the previous page)."""
        q = select(R).order_by(R.c.id.desc()).limit(limit)
        if status:
            wanted = [status] if isinstance(status, str) else list(status)
            q = q.where(R.c.status.in_([Status(s).value for s in wanted]))
        if platform:
            q = q.where(R.c.platform == platform)
        if user:
            p, uid = parse_user_ref(user) if ":" in user else (None, user)
            q = q.where(R.c.author_id == uid)
            if p:
                q = q.where(R.c.platform == p)
        if text:
            like = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            q = q.where(sa.or_(R.c.prompt_raw.ilike(like, escape="\\"), R.c.author_name.ilike(like, escape="\\")))
        if since:
            q = q.where(R.c.created_at >= since)
        if until:
            q = q.where(R.c.created_at < until)
        if before_id is not None:
            q = q.where(R.c.id < before_id)
        with self._read() as conn:
            return [RequestRecord.from_row(r) for r in conn.execute(q)]

    def stats(self) -> dict[str, int]:
        """Count of requests in every status (zeros included)."""
        counts = {s.value: 0 for s in Status}
        with self._read() as conn:
            for status, n in conn.execute(select(R.c.status, func.count()).group_by(R.c.status)):
                counts[status] = n
        return counts

    def position(self, request_id: int) -> int | None:
        """How many queued requests will be served before this one (0: next), or None when it is not
        waiting in the queue. One index range count."""
        with self._read() as conn:
            rec = conn.execute(select(R.c.status, R.c.priority, R.c.slot).where(R.c.id == request_id)).first()
            if rec is None:
                raise NotFound(f"no request with id {request_id}")
            if rec.status != S.QUEUED.value:
                return None
            return conn.execute(
                select(func.count()).select_from(R).where(
                    R.c.status == S.QUEUED.value,
                    tuple_(R.c.priority, R.c.slot, R.c.id) < tuple_(rec.priority, rec.slot, request_id),
                )
            ).scalar_one()

    def pending_work(self, platforms: Sequence[str] | None = None) -> dict[str, Any]:
        """What a draining worker still has to wait for: counts and the earliest retry time.
        ``platforms``: the ones the worker can deliver to (None: all); results for other platforms
        are left to the workers that have them."""
        now = self.clock()
        ours = R.c.platform.in_(list(platforms)) if platforms is not None else sa.true()
        with self._read() as conn:
            queued_now = conn.execute(select(func.count()).select_from(R).where(
                R.c.status == S.QUEUED.value, R.c.run_at <= now)).scalar_one()
            # a recovery waiting to ask the platform again is `posting` with no lease holder: its
            # retry time is its lease expiry (see :meth:`delivery_failed`)
            recheck = sa.and_(R.c.status == S.POSTING.value, R.c.lease_token.is_(None), ours)
            next_run = conn.execute(select(func.min(sa.case((recheck, R.c.lease_expires_at), else_=R.c.run_at))).where(
                sa.or_(R.c.status == S.QUEUED.value, sa.and_(R.c.status == S.GENERATED.value, ours),
                       recheck))).scalar_one()
            deliverable = conn.execute(select(func.count()).select_from(R).where(ours,
                sa.or_(sa.and_(R.c.status == S.GENERATED.value, R.c.run_at <= now),
                       sa.and_(R.c.status == S.POSTING.value, R.c.lease_expires_at < now)))).scalar_one()
            expired = conn.execute(select(func.count()).select_from(R).where(
                R.c.status == S.RUNNING.value, R.c.lease_expires_at < now)).scalar_one()
            elsewhere = 0 if platforms is None else conn.execute(select(func.count()).select_from(R).where(
                ~ours, R.c.status.in_([S.GENERATED.value, S.POSTING.value]))).scalar_one()
        return {"queued_now": queued_now, "next_run_at": next_run, "deliverable": deliverable,
                "expired_leases": expired, "elsewhere": elsewhere}

    # ---- cursors --------------------------------------------------------------------------

    def get_cursor(self, name: str) -> str | None:
        with self._read() as conn:
            return conn.execute(select(C.c.value).where(C.c.name == name)).scalar_one_or_none()

    def set_cursor(self, name: str, value: str) -> None:
        now = self.clock()
        with self._write(single=True) as conn:
            ins = _upsert(self.db.dialect)(C).values(name=name, value=value, updated_at=now)
            conn.execute(ins.on_conflict_do_update(index_elements=[C.c.name],
                                                   set_={"value": value, "updated_at": now}))


# A moderation's queue-log action -> the verb of its error message ("cannot reject request 5: ...").
_MODERATION_VERBS = {"approved": "approve", "rejected": "reject", "held": "hold", "cancelled": "cancel",
                     "requeued": "requeue"}


def _scores(g: Generated) -> list[float]:
    """The NSFW scores to store: all of them, or none when one is not a finite number (JSON, and so
    PostgreSQL's json type, has no NaN or Infinity; such a result is held, its reason says why)."""
    scores = [float(x) for x in g.nsfw_scores]
    return scores if all(math.isfinite(x) for x in scores) else []


def _as_sql(value: Any) -> Any:
    return sa.literal(value, sa.Text) if isinstance(value, str) else value


def _upsert(dialect: str):  # type: ignore[no-untyped-def]
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as ins
    else:
        from sqlalchemy.dialects.postgresql import insert as ins
    return ins


# The batch intake statement on PostgreSQL (:meth:`Queue._enqueue_pg`): the batch arrives as one array
# per column; the first of each (platform, external_id) not stored before is inserted; each user's
# row is upserted once, its next_slot moved past all of the batch's requests of that user.
_PG_INTAKE_COLUMNS = [
    ("platform", "text"), ("external_id", "text"), ("channel_id", "text"), ("guild_id", "text"),
    ("author_id", "text"), ("author_name", "text"), ("prompt_raw", "text"), ("prompt", "text"),
    ("n_images", "int"), ("seed", "bigint"), ("options", "text"), ("priority", "int"), ("status", "text"),
    ("reason", "text"), ("actor", "text"),
]
_PG_ENQUEUE = sa.text(
    "WITH input AS (SELECT * FROM unnest("
    + ", ".join(f"CAST(:{name} AS {typ}[])" for name, typ in _PG_INTAKE_COLUMNS)
    + ") WITH ORDINALITY AS t(" + ", ".join(name for name, _ in _PG_INTAKE_COLUMNS) + """, ord)),
fresh AS (
    SELECT DISTINCT ON (i.platform, i.external_id) i.* FROM input i
    WHERE NOT EXISTS (SELECT 1 FROM requests r WHERE r.platform = i.platform AND r.external_id = i.external_id)
    ORDER BY i.platform, i.external_id, i.ord
),
ranked AS (
    SELECT f.*, row_number() OVER w AS k, count(*) OVER w AS n
    FROM fresh f WINDOW w AS (PARTITION BY f.platform, f.author_id ORDER BY f.ord
                              ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
),
vt AS (
    SELECT coalesce((SELECT min(slot) FROM requests WHERE status = 'queued'),
                    (SELECT slot FROM requests ORDER BY id DESC LIMIT 1), 0) AS v
),
u AS (
    INSERT INTO users AS x (platform, platform_user_id, name, banned, notes, next_slot, created_at, updated_at)
    SELECT * FROM (
        SELECT DISTINCT ON (platform, author_id) platform, author_id, author_name, false, '',
               (SELECT v FROM vt) + n, CAST(:now AS timestamp), CAST(:now AS timestamp)
        FROM ranked ORDER BY platform, author_id, ord DESC
    ) latest
    ON CONFLICT (platform, platform_user_id) DO UPDATE SET
        name = CASE WHEN excluded.name <> '' THEN excluded.name ELSE x.name END,
        next_slot = greatest(x.next_slot, (SELECT v FROM vt)) + excluded.next_slot - (SELECT v FROM vt),
        updated_at = excluded.updated_at
    RETURNING x.platform, x.platform_user_id, x.banned, x.next_slot
),
decided AS (
    SELECT k.*, u.next_slot - k.n + k.k - 1 AS slot, (u.banned AND k.status <> 'rejected') AS banned_now
    FROM ranked k JOIN u ON u.platform = k.platform AND u.platform_user_id = k.author_id
),
r AS (
    INSERT INTO requests (platform, external_id, channel_id, guild_id, author_id, author_name, prompt_raw, prompt,
                          n_images, seed, options, status, priority, slot, attempts, max_attempts, run_at, error,
                          image_paths, nsfw_scores, notify, created_at, updated_at, finished_at)
    SELECT platform, external_id, channel_id, guild_id, author_id, author_name, prompt_raw, prompt,
           n_images, seed, CAST(options AS json), CASE WHEN banned_now THEN 'rejected' ELSE status END,
           priority, slot, 0, :max_attempts, CAST(:now AS timestamp),
           CASE WHEN banned_now THEN 'user is banned' ELSE reason END,
           CAST('[]' AS json), CAST('[]' AS json), true, CAST(:now AS timestamp), CAST(:now AS timestamp),
           CASE WHEN banned_now OR status = ANY(CAST(:terminal AS text[])) THEN CAST(:now AS timestamp) END
    FROM decided ORDER BY ord
    ON CONFLICT (platform, external_id) DO NOTHING
    RETURNING *
),
a AS (
    INSERT INTO audit_log (request_id, user_ref, actor, action, from_status, to_status, reason, created_at)
    SELECT r.id, r.platform || ':' || r.author_id, d.actor, 'received', NULL, r.status, r.error, r.created_at
    FROM r JOIN decided d ON d.platform = r.platform AND d.external_id = r.external_id
)
SELECT * FROM r""")


# SQLite intake (:meth:`Queue._enqueue_sqlite`), built once: under BEGIN IMMEDIATE, per request.
# The fair-share slot is the user's next slot, but never behind the head of the queue.
_SQLITE_STORED = select(R).where(R.c.platform == sa.bindparam("platform"),
                                 R.c.external_id == sa.bindparam("external_id"))
_SQLITE_USER = sa.text("""
WITH vt AS (SELECT coalesce((SELECT min(slot) FROM requests WHERE status = 'queued'),
                            (SELECT slot FROM requests ORDER BY id DESC LIMIT 1), 0) AS v)
INSERT INTO users (platform, platform_user_id, name, banned, notes, next_slot, created_at, updated_at)
VALUES (:platform, :author_id, :name, 0, '', (SELECT v FROM vt) + 1, :now, :now)
ON CONFLICT (platform, platform_user_id) DO UPDATE SET
    name = CASE WHEN excluded.name <> '' THEN excluded.name ELSE users.name END,
    next_slot = max(users.next_slot, (SELECT v FROM vt)) + 1,
    updated_at = excluded.updated_at
RETURNING banned, next_slot""").bindparams(sa.bindparam("now", type_=sa.DateTime()))
_SQLITE_INSERT = insert(R).returning(*R.c)
_AUDIT_INSERT = insert(A)


# A worker's claim on PostgreSQL (:meth:`Queue.claim`): the picked ids become one array (an init
# plan, FOR UPDATE SKIP LOCKED), so the UPDATE reaches them through the primary key; the audit rows
# are written by a CTE over the UPDATE's RETURNING. One round trip, a prepared statement, run by the
# driver (:meth:`storage.db.Database.run_prepared`); JSON columns come back as text.
_PG_RETURNING = ", ".join(f"{name}::text" if isinstance(R.c[name].type, sa.JSON) else name
                          for name in REQUEST_FIELDS)
_PG_CLAIM = f"""
WITH upd AS (
    UPDATE requests SET status = 'running', attempts = attempts + 1, lease_owner = %(owner)s,
        lease_token = %(token)s, lease_expires_at = %(expires)s, started_at = %(now)s, updated_at = %(now)s
    WHERE id = ANY(ARRAY(
        SELECT id FROM requests WHERE status = 'queued' AND run_at <= %(now)s
        ORDER BY priority, slot, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED))
    RETURNING {_PG_RETURNING}
), audit AS (
    INSERT INTO audit_log (request_id, actor, action, from_status, to_status, reason, created_at)
    SELECT id, %(actor)s, 'claimed', 'queued', 'running', 'attempt ' || attempts, %(now)s FROM upd
)
SELECT * FROM upd"""

# Generated results on SQLite (:meth:`Queue.complete_many`): one executemany under the write lock.
_SQLITE_COMPLETE = update(R).where(R.c.id == sa.bindparam("rid")).values(
    status=sa.bindparam("to"), image_paths=sa.bindparam("paths", type_=sa.JSON),
    nsfw_scores=sa.bindparam("scores", type_=sa.JSON),
    seed=func.coalesce(sa.bindparam("new_seed", type_=sa.BigInteger), R.c.seed),
    lease_owner=None, lease_token=None, lease_expires_at=None, error=None, updated_at=sa.bindparam("now"))

# Generated results on PostgreSQL (:meth:`Queue.complete_many`), fenced by the claim's lease token.
_PG_COMPLETE = """
WITH v AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(paths)s::text[], %(scores)s::text[], %(statuses)s::text[],
                         %(actions)s::text[], %(holds)s::text[], %(seeds)s::bigint[])
                  AS t(id, paths, scores, status, action, hold, seed)
), upd AS (
    UPDATE requests r SET image_paths = v.paths::json, nsfw_scores = v.scores::json,
        seed = coalesce(v.seed, r.seed), status = v.status,
        lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, error = NULL, updated_at = %(now)s
    FROM v WHERE r.id = v.id AND r.status = 'running' AND r.lease_token = %(token)s
    RETURNING r.id, v.status, v.action, v.hold
), audit AS (
    INSERT INTO audit_log (request_id, actor, action, from_status, to_status, reason, created_at)
    SELECT id, %(actor)s, action, 'running', status, hold, %(now)s FROM upd
)
SELECT id FROM upd"""
