"""Moderator accounts, dashboard sessions, login throttling, operator switches and activity counters.

Accounts
    :class:`Moderators` stores one argon2id hash per account (argon2-cffi; memory-hard, salted, the
    parameters inside the PHC string, so they can be raised later and old hashes re-hashed on login).
    An unknown name is checked against a dummy hash, so it costs the same time as a wrong password.

Sessions
    The browser holds a random token; the table holds only its SHA-256 (a leaked table opens no
    session). Sessions end after ``idle`` without a request, after ``lifetime`` in any case, at logout,
    and when the account is removed (``ON DELETE CASCADE``).

Login throttling
    Every attempt is stored in ``login_attempts``. :func:`login_wait` is the pure policy: after
    ``free_failures`` failures in a row for one name (or ``ip_free_failures`` from one address), the
    next attempt must wait ``base * 2**k`` seconds (capped) after the last failure; the password is not
    even checked until then. :meth:`Moderators.begin_attempt` checks the policy and records the attempt
    as failed in one serialised transaction, before the (slow) password check; a right password then
    marks it ok. So guesses sent in parallel are counted like guesses in a row, and no more of their
    passwords are checked.

Switches
    :class:`Switches` are named booleans (``intake_paused``, ``generation_paused``); every change is
    written to the audit log with its actor. :func:`intake_paused` and :func:`generation_paused` are the
    reads intake and the worker make.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy import delete, func, insert, select, update

from storage.db import Database
from storage.errors import NotFound, StorageError
from storage.models import COUNTED_LOG, AuditEntry, LoginAttempt, Moderator, ModeratorSession, Request, Switch, utcnow
from storage.records import AuditRecord

M = Moderator.__table__
MS = ModeratorSession.__table__
LA = LoginAttempt.__table__
SW = Switch.__table__
A = AuditEntry.__table__
R = Request.__table__

NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MIN_PASSWORD_CHARS = 8

INTAKE_PAUSED = "intake_paused"
GENERATION_PAUSED = "generation_paused"
SWITCHES = (INTAKE_PAUSED, GENERATION_PAUSED)


class ModeratorExists(StorageError):
    pass


class BadCredentials(StorageError):
    """A name or password that cannot be stored (the message says which rule it breaks)."""


class PasswordHasher(Protocol):
    def hash(self, password: str) -> str: ...
    def verify(self, hash: str, password: str) -> bool: ...
    def check_needs_rehash(self, hash: str) -> bool: ...


def default_hasher() -> PasswordHasher:
    """argon2id with argon2-cffi's defaults (RFC 9106 low-memory profile: 64 MiB, 3 passes)."""
    from argon2 import PasswordHasher as Argon2

    return Argon2()


def _db(queue_or_db: Any) -> Database:
    return queue_or_db if isinstance(queue_or_db, Database) else queue_or_db.db


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class ModeratorRecord:
    id: int
    name: str
    created_at: dt.datetime
    last_login_at: dt.datetime | None

    @classmethod
    def from_row(cls, row: Any) -> ModeratorRecord:
        m = row._mapping
        return cls(m["id"], m["name"], m["created_at"], m["last_login_at"])

    @property
    def actor(self) -> str:
        """How this moderator appears in the audit log."""
        return f"moderator:{self.name}"


@dataclass(frozen=True, slots=True)
class SessionRecord:
    id: str  # token hash
    moderator: ModeratorRecord
    expires_at: dt.datetime
    flash: str | None


# ---- login throttling: the pure policy -------------------------------------------------------

@dataclass(frozen=True, slots=True)
class LoginPolicy:
    free_failures: int = 4  # the 5th wrong password in a row starts the slow-down
    ip_free_failures: int = 20
    base_seconds: float = 30.0
    max_seconds: float = 900.0
    window_seconds: float = 3600.0  # failures older than this are forgotten


def login_wait(failures: int, last_failure: dt.datetime | None, now: dt.datetime, *, free: int,
               base: float, cap: float) -> float:
    """Seconds to wait before the next attempt after ``failures`` consecutive failures, the last at
    ``last_failure``: 0 up to ``free`` failures, then ``base * 2**(failures - free - 1)``, capped."""
    if failures <= free or last_failure is None:
        return 0.0
    delay = min(cap, base * 2 ** (failures - free - 1))
    return max(0.0, delay - (now - last_failure).total_seconds())


# ---- accounts, sessions, attempts ---------------------------------------------------------------

class Moderators:
    def __init__(
        self,
        queue_or_db: Any,
        *,
        clock: Callable[[], dt.datetime] = utcnow,
        hasher: PasswordHasher | None = None,
        policy: LoginPolicy | None = None,
        session_idle: dt.timedelta = dt.timedelta(hours=2),
        session_lifetime: dt.timedelta = dt.timedelta(hours=12),
    ) -> None:
        self.db = _db(queue_or_db)
        self.clock = clock
        self.hasher = hasher or default_hasher()
        self.policy = policy or LoginPolicy()
        self.session_idle = session_idle
        self.session_lifetime = session_lifetime
        self._dummy_hash: str | None = None

    def _audit(self, conn: sa.Connection, actor: str, action: str, reason: str | None) -> None:
        conn.execute(insert(A).values(request_id=None, user_ref=None, actor=actor[:160], action=action,
                                      from_status=None, to_status=None, reason=reason, created_at=self.clock()))

    # accounts

    def add(self, name: str, password: str, *, actor: str) -> ModeratorRecord:
        if not NAME_RE.fullmatch(name):  # match(): "$" also matches before a final newline
            raise BadCredentials("a moderator name is 1-64 letters, digits, '.', '_' or '-'")
        if len(password) < MIN_PASSWORD_CHARS:
            raise BadCredentials(f"the password must have at least {MIN_PASSWORD_CHARS} characters")
        hashed = self.hasher.hash(password)
        now = self.clock()
        with self.db.write.begin() as conn:
            if conn.execute(select(M.c.id).where(M.c.name == name)).first() is not None:
                raise ModeratorExists(f"moderator {name!r} already exists (remove it first to reset the password)")
            row = conn.execute(insert(M).values(name=name, password_hash=hashed, created_at=now, updated_at=now)
                               .returning(*M.c)).one()
            self._audit(conn, actor, "moderator_added", name)
        return ModeratorRecord.from_row(row)

    def remove(self, name: str, *, actor: str) -> None:
        with self.db.write.begin() as conn:
            mid = conn.execute(select(M.c.id).where(M.c.name == name)).scalar_one_or_none()
            if mid is None:
                raise NotFound(f"no moderator named {name!r}")
            conn.execute(delete(MS).where(MS.c.moderator_id == mid))  # also cascades; explicit for clarity
            conn.execute(delete(M).where(M.c.id == mid))
            self._audit(conn, actor, "moderator_removed", name)

    def list(self) -> list[ModeratorRecord]:
        with self.db.read.connect() as conn:
            return [ModeratorRecord.from_row(r) for r in conn.execute(select(M).order_by(M.c.name))]

    # login

    def _consecutive_failures(self, conn: sa.Connection, column: sa.Column, value: str, now: dt.datetime,
                              limit: int) -> tuple[int, dt.datetime | None]:
        since = now - dt.timedelta(seconds=self.policy.window_seconds)
        rows = conn.execute(
            select(LA.c.ok, LA.c.created_at).where(column == value, LA.c.created_at >= since)
            .order_by(LA.c.id.desc()).limit(limit)
        ).all()
        n = 0
        for r in rows:
            if r.ok:
                break
            n += 1
        return n, (rows[0].created_at if rows and not rows[0].ok else None)

    def _wait(self, conn: sa.Connection, name: str, ip: str, now: dt.datetime) -> float:
        p = self.policy
        by_name = self._consecutive_failures(conn, LA.c.name, name[:64], now, p.free_failures + 32)
        by_ip = self._consecutive_failures(conn, LA.c.ip, ip[:64], now, p.ip_free_failures + 32)
        return max(
            login_wait(*by_name, now, free=p.free_failures, base=p.base_seconds, cap=p.max_seconds),
            login_wait(*by_ip, now, free=p.ip_free_failures, base=p.base_seconds, cap=p.max_seconds),
        )

    def login_wait(self, name: str, ip: str) -> float:
        """Seconds before ``name`` (from ``ip``) may try again; 0 means now. A read only: a login
        uses :meth:`begin_attempt`, which checks and counts in one step."""
        with self.db.read.connect() as conn:
            return self._wait(conn, name, ip, self.clock())

    def begin_attempt(self, name: str, ip: str) -> tuple[float, int | None]:
        """Check the throttling policy and, when ``name`` (from ``ip``) may try now, record the
        attempt as failed before the password is checked: ``(0, attempt_id)``, to hand to
        :meth:`authenticate`, which marks it ok for the right password. Otherwise ``(seconds to
        wait, None)`` and nothing is recorded.

        Check and record are one transaction that concurrent logins wait for (SQLite: ``BEGIN
        IMMEDIATE``; PostgreSQL: an exclusive lock on ``login_attempts``, which reads do not wait
        for), so attempts still being checked count as failures for the ones after them."""
        now = self.clock()
        with self.db.write.begin() as conn:
            if not self.db.is_sqlite:
                conn.execute(sa.text(f"LOCK TABLE {LA.name} IN EXCLUSIVE MODE"))
            wait = self._wait(conn, name, ip, now)
            if wait > 0:
                return wait, None
            attempt = conn.execute(insert(LA).values(name=name[:64], ip=ip[:64], ok=False, created_at=now)
                                   .returning(LA.c.id)).scalar_one()
        return 0.0, attempt

    def authenticate(self, name: str, password: str, *, ip: str, attempt: int | None = None) -> ModeratorRecord | None:
        """Check a password (same cost for unknown names). ``attempt`` is the id from
        :meth:`begin_attempt` (recorded as failed; marked ok here for the right password); without
        it the attempt is recorded here, and the caller must have checked :meth:`login_wait`."""
        from argon2.exceptions import InvalidHashError, VerificationError

        with self.db.read.connect() as conn:
            row = conn.execute(select(M).where(M.c.name == name[:64])).first()
        if row is None:
            if self._dummy_hash is None:
                self._dummy_hash = self.hasher.hash(secrets.token_hex(16))
            stored = self._dummy_hash
        else:
            stored = row.password_hash
        try:
            ok = self.hasher.verify(stored, password) and row is not None
        except (VerificationError, InvalidHashError):
            ok = False
        now = self.clock()
        with self.db.write.begin() as conn:
            if attempt is None:
                conn.execute(insert(LA).values(name=name[:64], ip=ip[:64], ok=ok, created_at=now))
            elif ok:
                conn.execute(update(LA).where(LA.c.id == attempt).values(ok=True))
            if not ok or row is None:
                return None
            values: dict[str, Any] = {"last_login_at": now}
            if self.hasher.check_needs_rehash(stored):
                values.update(password_hash=self.hasher.hash(password), updated_at=now)
            conn.execute(update(M).where(M.c.id == row.id).values(**values))
            self._audit(conn, f"moderator:{row.name}", "login", f"from {ip[:64]}")
        return ModeratorRecord(row.id, row.name, row.created_at, now)

    # sessions

    def create_session(self, moderator: ModeratorRecord, *, flash: str | None = None) -> str:
        """A new session for ``moderator``; returns the token for the cookie (shown only once)."""
        token = secrets.token_urlsafe(32)
        now = self.clock()
        with self.db.write.begin() as conn:
            # Forget expired sessions now and then: cheap, and keeps the table small.
            conn.execute(delete(MS).where(MS.c.expires_at < now))
            conn.execute(insert(MS).values(id=token_hash(token), moderator_id=moderator.id, created_at=now,
                                           last_seen_at=now, expires_at=now + self.session_lifetime, flash=flash))
        return token

    def session(self, token: str, *, touch: bool = True) -> SessionRecord | None:
        """The live session for ``token``, or None (unknown, expired or idle too long). ``touch``:
        this request is the moderator's doing, so the idle timer restarts; a page's background poll
        passes False, or an unattended open page would keep its session alive until ``lifetime``."""
        now = self.clock()
        sid = token_hash(token)
        with self.db.read.connect() as conn:
            row = conn.execute(
                select(MS.c.id, MS.c.expires_at, MS.c.last_seen_at, MS.c.flash, M.c.id.label("mid"), M.c.name,
                       M.c.created_at, M.c.last_login_at)
                .join(M, M.c.id == MS.c.moderator_id)
                .where(MS.c.id == sid)
            ).first()
        if row is None or row.expires_at <= now or row.last_seen_at + self.session_idle <= now:
            return None
        if touch and now - row.last_seen_at > dt.timedelta(seconds=60):  # one write a minute, not one per request
            with self.db.write.begin() as conn:
                conn.execute(update(MS).where(MS.c.id == sid).values(last_seen_at=now))
        mod = ModeratorRecord(row.mid, row.name, row.created_at, row.last_login_at)
        return SessionRecord(row.id, mod, row.expires_at, row.flash)

    def end_session(self, token: str, *, actor: str | None = None) -> None:
        with self.db.write.begin() as conn:
            n = conn.execute(delete(MS).where(MS.c.id == token_hash(token))).rowcount
            if n and actor:
                self._audit(conn, actor, "logout", None)

    def set_flash(self, session_id: str, message: str | None) -> None:
        with self.db.write.begin() as conn:
            conn.execute(update(MS).where(MS.c.id == session_id).values(flash=message))


# ---- switches -------------------------------------------------------------------------------------

class Switches:
    """Named operator switches; absent means off. ``Switches(queue).set(name, True, actor=...)``."""

    def __init__(self, queue_or_db: Any, *, clock: Callable[[], dt.datetime] | None = None) -> None:
        self.db = _db(queue_or_db)
        self.clock = clock or getattr(queue_or_db, "clock", utcnow)

    def get(self, name: str) -> bool:
        with self.db.read.connect() as conn:
            return bool(conn.execute(select(SW.c.value).where(SW.c.name == name)).scalar_one_or_none())

    def all(self) -> dict[str, bool]:
        with self.db.read.connect() as conn:
            stored = {r.name: bool(r.value) for r in conn.execute(select(SW.c.name, SW.c.value))}
        return {name: stored.get(name, False) for name in SWITCHES}

    def set(self, name: str, value: bool, *, actor: str, reason: str | None = None) -> bool:
        """Set a switch; returns whether it changed. A change is written to the audit log."""
        if name not in SWITCHES:
            raise ValueError(f"unknown switch {name!r}; expected one of {', '.join(SWITCHES)}")
        now = self.clock()
        with self.db.write.begin() as conn:
            if not self.db.is_sqlite:
                # Serialise setters (SQLite's BEGIN IMMEDIATE already does; reads never wait): two
                # moderators pausing at once both found no row and both inserted (a 500 for one), or
                # both changed it and both audited the change.
                conn.execute(sa.text(f"LOCK TABLE {SW.name} IN EXCLUSIVE MODE"))
            old = bool(conn.execute(select(SW.c.value).where(SW.c.name == name)).scalar_one_or_none())
            if old == value:
                return False
            if conn.execute(update(SW).where(SW.c.name == name)
                            .values(value=value, updated_by=actor[:160], updated_at=now)).rowcount == 0:
                conn.execute(insert(SW).values(name=name, value=value, updated_by=actor[:160], updated_at=now))
            what = name.removesuffix("_paused")
            conn.execute(insert(A).values(
                request_id=None, user_ref=None, actor=actor[:160], action="paused" if value else "resumed",
                from_status=None, to_status=None, reason=what + (f": {reason}" if reason else ""), created_at=now))
        return True


def intake_paused(queue_or_db: Any) -> bool:
    """Whether intake should refuse new requests (they are told to try again later)."""
    return Switches(queue_or_db).get(INTAKE_PAUSED)


def generation_paused(queue_or_db: Any) -> bool:
    """Whether workers should leave queued requests alone (they wait in the queue)."""
    return Switches(queue_or_db).get(GENERATION_PAUSED)


# ---- a user's history for the dashboard -----------------------------------------------------------------

def user_actions(queue_or_db: Any, user_ref: str, *, limit: int = 100) -> list[AuditRecord]:
    """The newest ``limit`` entries about the user themself (bans, unbans, notes; not the entries of
    their requests, which also name the user), oldest first."""
    db = _db(queue_or_db)
    with db.read.connect() as conn:
        rows = conn.execute(select(A).where(A.c.user_ref == user_ref, A.c.request_id.is_(None))
                            .order_by(A.c.id.desc()).limit(limit)).all()
    return [AuditRecord.from_row(r) for r in reversed(rows)]


def status_changes_since(queue_or_db: Any, request_id: int, since: dt.datetime, *,
                         exclude_actors: tuple[str, ...] = ()) -> AuditRecord | None:
    """The newest status change of a request after ``since`` by an actor whose name starts with
    none of ``exclude_actors``, or None. (A range of the request's own index entries.)"""
    db = _db(queue_or_db)
    q = select(A).where(A.c.request_id == request_id, A.c.created_at > since, A.c.to_status.is_not(None))
    for prefix in exclude_actors:
        q = q.where(sa.not_(A.c.actor.startswith(prefix, autoescape=True)))
    with db.read.connect() as conn:
        row = conn.execute(q.order_by(A.c.id.desc()).limit(1)).first()
    return AuditRecord.from_row(row) if row is not None else None


# ---- activity counters for the dashboard -------------------------------------------------------------

def activity(queue_or_db: Any, now: dt.datetime, *, rate_window: float = 60.0,
             recent_window: float = 3600.0) -> dict[str, float | int]:
    """Live counters: requests waiting (queued, running, held), images/s over ``rate_window`` seconds,
    and failures and refusals over ``recent_window`` seconds. Index range scans only."""
    db = _db(queue_or_db)
    rate_since = now - dt.timedelta(seconds=rate_window)
    recent_since = now - dt.timedelta(seconds=recent_window)
    with db.read.connect() as conn:
        active = ["queued", "running", "held_for_review"]  # small sets: ranges of ix_requests_status_id
        by_status = {s: n for s, n in conn.execute(
            select(R.c.status, func.count()).where(R.c.status.in_(active)).group_by(R.c.status))}
        images = conn.execute(
            select(func.coalesce(func.sum(R.c.n_images), 0)).select_from(A.join(R, R.c.id == A.c.request_id))
            .where(COUNTED_LOG, A.c.created_at >= rate_since,
                   sa.or_(A.c.action == "generated", sa.and_(A.c.action == "held", A.c.actor.like("worker:%"))))
        ).scalar_one()
        failures = conn.execute(
            select(func.count()).select_from(A)
            .where(COUNTED_LOG, A.c.created_at >= recent_since, A.c.action.in_(["failed", "dead", "retry"]))
        ).scalar_one()
        refusals = conn.execute(
            select(func.count()).select_from(A)
            .where(COUNTED_LOG, A.c.created_at >= recent_since, A.c.to_status == "rejected")
        ).scalar_one()
    return {
        "queued": by_status.get("queued", 0),
        "running": by_status.get("running", 0),
        "held": by_status.get("held_for_review", 0),
        "images_per_s": round(int(images) / rate_window, 3),
        "failures": int(failures),
        "refusals": int(refusals),
    }
