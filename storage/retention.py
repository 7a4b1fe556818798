"""Retention: what the service's hourly ``prune`` job removes.

* Images of finished requests (posted, rejected, failed, dead, cancelled) older than ``[data]
  image_retention_days`` (0 keeps them forever): the files go, the request's ``image_paths`` is
  emptied and the queue log says ``images_pruned``. Files are deleted before the row is updated, so
  a crash in between only leaves a row that the next run finishes (nothing is leaked on disk).
  Requests that may still need their images (generated, held for review, posting) are never touched.
* Dashboard login attempts older than a day (the throttle looks back minutes) and expired
  moderator sessions: neither is kept for review, and both would otherwise grow without bound.

The queue log itself is kept: it is what moderators review.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import delete, insert, select, update

from storage.db import Database
from storage.models import AuditEntry, LoginAttempt, ModeratorSession, Request, utcnow
from storage.states import Status

_log = logging.getLogger(__name__)

R = Request.__table__
A = AuditEntry.__table__
LA = LoginAttempt.__table__
MS = ModeratorSession.__table__

#: Finished requests: nothing will read their images again but a person browsing the log.
PRUNABLE = (Status.POSTED, Status.REJECTED, Status.FAILED, Status.DEAD, Status.CANCELLED)
LOGIN_ATTEMPTS_KEPT = dt.timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Pruned:
    requests: int = 0  # requests whose images were removed
    files: int = 0
    bytes: int = 0
    login_attempts: int = 0
    sessions: int = 0


def _remove(path: Path, images_dir: Path) -> int:
    """Delete one image file under ``images_dir`` (and its folder once empty); returns its size.
    Paths outside the images folder are never touched."""
    try:
        path = path.resolve()
        if not path.is_relative_to(images_dir):
            _log.warning("not pruning %s: outside the images folder %s", path, images_dir)
            return 0
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    folder = path.parent
    if folder != images_dir and folder.is_relative_to(images_dir) and not any(folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)
    return size


def prune(db: Database, images_dir: Path, *, image_retention_days: float, batch: int = 500,
          clock: Callable[[], dt.datetime] = utcnow) -> Pruned:
    """One pruning pass (at most ``batch`` requests' images)."""
    now = clock()
    images_dir = Path(images_dir).resolve()
    n_requests = n_files = n_bytes = 0
    if image_retention_days > 0:
        cutoff = now - dt.timedelta(days=image_retention_days)
        with db.read.connect() as conn:
            rows = conn.execute(
                select(R.c.id, R.c.image_paths, R.c.platform, R.c.author_id)
                .where(R.c.status.in_([s.value for s in PRUNABLE]), R.c.finished_at < cutoff,
                       sa.cast(R.c.image_paths, sa.Text) != "[]")
                .order_by(R.c.id).limit(batch)
            ).all()
        for row in rows:
            for p in row.image_paths or []:
                size = _remove(Path(p), images_dir)   # relative (older versions): from the working folder
                n_files += size > 0
                n_bytes += size
        if rows:
            ids = [row.id for row in rows]
            with db.write.begin() as conn:  # another worker's prune may have done some: log only ours
                mine = set(conn.execute(
                    # still finished: a request requeued meanwhile has new images, which it needs
                    update(R).where(R.c.id.in_(ids), sa.cast(R.c.image_paths, sa.Text) != "[]",
                                    R.c.status.in_([s.value for s in PRUNABLE]))
                    .values(image_paths=[], updated_at=now).returning(R.c.id)).scalars())
                if mine:
                    conn.execute(insert(A), [
                        {"request_id": row.id, "user_ref": f"{row.platform}:{row.author_id}",
                         "actor": "service:prune", "action": "images_pruned", "from_status": None,
                         "to_status": None, "reason": f"older than {image_retention_days:g} days",
                         "created_at": now} for row in rows if row.id in mine])
            n_requests = len(mine)
    with db.write.begin() as conn:
        attempts = conn.execute(delete(LA).where(LA.c.created_at < now - LOGIN_ATTEMPTS_KEPT)).rowcount
        sessions = conn.execute(delete(MS).where(MS.c.expires_at < now)).rowcount
    return Pruned(n_requests, n_files, n_bytes, attempts or 0, sessions or 0)
