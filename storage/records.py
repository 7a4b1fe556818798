"""Frozen domain records handed out by storage (SQLAlchemy rows never leave the package)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

from storage.states import Status


def _iso(t: dt.datetime | None) -> str | None:
    return None if t is None else t.isoformat(timespec="milliseconds") + "Z"


def parse_user_ref(ref: str) -> tuple[str, str]:
    """``"x:123"`` -> ``("x", "123")``; a bare id means the local platform."""
    platform, sep, uid = ref.partition(":")
    if not sep:
        return "local", ref
    return platform, uid


@dataclass(frozen=True, slots=True)
class NewRequest:
    """What an adapter hands to :meth:`storage.queue.Queue.enqueue`."""

    platform: str
    external_id: str
    author_id: str
    prompt_raw: str
    prompt: str
    author_name: str = ""
    channel_id: str | None = None
    guild_id: str | None = None
    n_images: int = 4
    seed: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    priority: int = 0


@dataclass(frozen=True, slots=True)
class Generated:
    """One request's generation result, recorded by :meth:`storage.queue.Queue.complete_many`:
    ``held_for_review`` when ``hold_reason`` is set, else ``generated``. ``seed`` is the seed
    actually used (kept for re-rolls and reproduction; None keeps the stored one)."""

    request_id: int
    image_paths: tuple[str, ...] | list[str]
    nsfw_scores: tuple[float, ...] | list[float] = ()
    hold_reason: str | None = None
    seed: int | None = None

    @property
    def status(self) -> Status:
        return Status.HELD if self.hold_reason else Status.GENERATED

    @property
    def action(self) -> str:
        """The queue-log action that records it."""
        return "held" if self.hold_reason else "generated"


@dataclass(frozen=True, slots=True)
class RequestRecord:
    id: int
    platform: str
    external_id: str
    channel_id: str | None
    guild_id: str | None
    author_id: str
    author_name: str
    prompt_raw: str
    prompt: str
    n_images: int
    seed: int | None
    options: dict[str, Any]
    status: Status
    priority: int
    slot: int
    attempts: int
    max_attempts: int
    run_at: dt.datetime
    lease_owner: str | None
    lease_token: str | None
    lease_expires_at: dt.datetime | None
    error: str | None
    image_paths: list[str]
    nsfw_scores: list[float]
    reply_id: str | None
    reply_url: str | None
    notify: bool
    created_at: dt.datetime
    updated_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None

    @classmethod
    def from_row(cls, row: Any) -> RequestRecord:
        m = row._mapping if hasattr(row, "_mapping") else row
        values = {name: m[name] for name in _REQUEST_FIELDS}
        values["status"] = Status(values["status"])
        values["options"] = dict(values["options"] or {})
        values["image_paths"] = list(values["image_paths"] or [])
        values["nsfw_scores"] = list(values["nsfw_scores"] or [])
        return cls(**values)

    @classmethod
    def from_tuple(cls, values: tuple[Any, ...]) -> RequestRecord:
        """From a row of :data:`REQUEST_FIELDS` in order, its JSON columns still as text (the
        driver-level hot path: see :meth:`storage.db.Database.run_prepared`)."""
        rec = list(values)
        rec[_STATUS] = Status(rec[_STATUS])
        rec[_OPTIONS] = _json(rec[_OPTIONS]) or {}
        rec[_IMAGES] = _json(rec[_IMAGES]) or []
        rec[_SCORES] = _json(rec[_SCORES]) or []
        return cls(*rec)

    @property
    def user_ref(self) -> str:
        return f"{self.platform}:{self.author_id}"

    def log_context(self) -> dict[str, Any]:
        return {"request_id": self.id, "platform": self.platform, "status": str(self.status)}

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "lease_token":
                continue  # a capability, not for display
            out[f.name] = _iso(v) if isinstance(v, dt.datetime) else (str(v) if isinstance(v, Status) else v)
        out["user"] = self.user_ref
        return out


@dataclass(frozen=True, slots=True)
class AuditRecord:
    id: int
    request_id: int | None
    user_ref: str | None
    actor: str
    action: str
    from_status: str | None
    to_status: str | None
    reason: str | None
    created_at: dt.datetime

    @classmethod
    def from_row(cls, row: Any) -> AuditRecord:
        m = row._mapping
        return cls(**{f.name: m[f.name] for f in dataclasses.fields(cls)})

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["created_at"] = _iso(self.created_at)
        return d


@dataclass(frozen=True, slots=True)
class UserRecord:
    platform: str
    platform_user_id: str
    name: str
    banned: bool
    ban_reason: str | None
    notes: str
    created_at: dt.datetime
    updated_at: dt.datetime

    @classmethod
    def from_row(cls, row: Any) -> UserRecord:
        m = row._mapping
        return cls(**{f.name: m[f.name] for f in dataclasses.fields(cls)})

    @property
    def ref(self) -> str:
        return f"{self.platform}:{self.platform_user_id}"

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["created_at"], d["updated_at"] = _iso(self.created_at), _iso(self.updated_at)
        d["ref"] = self.ref
        return d


@dataclass(frozen=True, slots=True)
class Claim:
    """A batch of requests leased to one worker. Every later update must present ``token``."""

    owner: str
    token: str
    expires_at: dt.datetime
    requests: tuple[RequestRecord, ...]
    # For delivery claims: ids that were already `posting` under an earlier (expired) lease, so the
    # deliverer must first check the platform for a reply it may already have posted.
    recovering: frozenset[int] = frozenset()
    # Of those, ids out of attempts: the platform is only asked for the reply (posted when it is
    # there, dead when not), nothing is posted any more.
    final: frozenset[int] = frozenset()

    @property
    def ids(self) -> list[int]:
        return [r.id for r in self.requests]

    def __len__(self) -> int:
        return len(self.requests)


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    request: RequestRecord
    created: bool  # False: the same (platform, external id) was already stored


_REQUEST_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RequestRecord))
#: The request columns in :class:`RequestRecord`'s order (:meth:`RequestRecord.from_tuple`).
REQUEST_FIELDS = _REQUEST_FIELDS
_STATUS, _OPTIONS, _IMAGES, _SCORES = (REQUEST_FIELDS.index(n) for n in ("status", "options", "image_paths", "nsfw_scores"))


def _json(text: str | None) -> Any:
    """A JSON column read as text; the empty list and object (most of them) without a parse."""
    if text is None:
        return None
    if text == "[]":
        return []
    if text == "{}":
        return {}
    return json.loads(text)
