"""The adapter interface: the intake half shared by every platform, and the lifecycle the service runs.

Intake
    An adapter turns a platform event (a mention, an interaction, a button click) into an
    :class:`IntakeEvent` and calls :func:`admit`. ``admit`` validates the prompt
    (:func:`bot.intake.validate_prompt`), honours the intake pause switch and any extra ``checks``
    (a daily budget, per-user limits), and stores the request: ``queued``, or ``rejected`` with the
    reason. Storing is idempotent on ``(platform, external_id)``, so a duplicated event is one request.
    The returned :class:`Admission` says whether the adapter owes the user a refusal: only when this
    call created the rejected request, so a duplicated event is never refused twice.

Delivery
    The worker calls :class:`bot.platforms.base.Platform`'s ``deliver``/``find_delivery``.

Lifecycle
    An adapter that takes events by itself implements :class:`IntakeSource`; ``dallebot serve``
    calls ``start()`` once on its event loop, then ``poll()`` every ``poll_interval`` seconds when
    that is set (X), and ``stop()`` at shutdown. The scheduler never knows which platform it serves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from sqlalchemy import select

from bot.intake import PromptRejected, normalize_prompt, validate_prompt
from bot.platforms import text as texts
from storage.models import Request
from storage.moderators import intake_paused
from storage.queue import Queue
from storage.records import NewRequest, RequestRecord
from storage.states import Status

#: Longest raw prompt kept in the database (the rest of a pasted novel is dropped before storing).
MAX_STORED_CHARS = 4000

#: A check run before storing: returns a refusal message (for people) or None to accept.
Check = Callable[["IntakeEvent"], str | None]


@dataclass(frozen=True, slots=True)
class IntakeEvent:
    """A platform event, platform-neutral: what :func:`admit` needs to store a request."""

    platform: str
    external_id: str
    author_id: str
    prompt_raw: str
    author_name: str = ""
    channel_id: str | None = None
    guild_id: str | None = None
    n_images: int = 4
    seed: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Admission:
    request: RequestRecord
    created: bool  # False: the same event was stored before (a duplicate)
    refusal: str | None  # for the user, when the request was refused

    @property
    def accepted(self) -> bool:
        return self.request.status != Status.REJECTED

    @property
    def owes_refusal(self) -> bool:
        """Post a refusal now: refused, and stored by this call (not a duplicate)."""
        return self.created and not self.accepted


def storable(text: str, limit: int = MAX_STORED_CHARS) -> str:
    """``text`` as both databases can store it: no NUL (PostgreSQL refuses it in text), no lone
    surrogates (not encodable as UTF-8), at most ``limit`` characters."""
    text = text[:limit].replace("\x00", "\ufffd")
    return text.encode("utf-8", "replace").decode("utf-8")


@runtime_checkable
class BatchCheck(Protocol):
    """A check that decides a whole batch at once (one query for all, e.g. rate limits):
    returns, in order, a refusal or None for each event."""

    def check_many(self, events: Sequence[IntakeEvent]) -> list[str | None]:
        ...


def admit(queue: Queue, event: IntakeEvent, *, max_chars: int, checks: Sequence[Check | BatchCheck] = (),
          actor: str | None = None, store_refusals: bool = True) -> Admission:
    """Validate and store ``event``; never raises for bad input (only for storage errors).

    ``store_refusals=False`` (the local platform, whose caller shows the message at once): a refused
    prompt raises :class:`PromptRejected` instead of being stored."""
    return admit_many(queue, [event], max_chars=max_chars, checks=checks, actor=actor,
                      store_refusals=store_refusals)[0]


def admit_many(queue: Queue, events: Sequence[IntakeEvent], *, max_chars: int,
               checks: Sequence[Check | BatchCheck] = (), actor: str | None = None,
               store_refusals: bool = True) -> list[Admission]:
    """:func:`admit` for a batch (a page of mentions), in order: one pause lookup, each batch
    check once over the events still accepted, and one transaction to store them all. The
    decisions are those of admitting the events one after another.

    Events stored before (a redelivery, an edited mention with the same root, mentions re-read after
    a rate limit or a crash) and repeats within the batch are found first and left out of the
    checks: they get the stored request back, so they count against no limit a second time."""
    if not events:
        return []
    stored = _stored_keys(queue, events)
    seen: set[tuple[str, str]] = set()
    repeat = [False] * len(events)
    for i, event in enumerate(events):
        key = (event.platform, event.external_id)
        repeat[i] = key in stored or key in seen
        seen.add(key)
    raws = [storable(event.prompt_raw) for event in events]
    refusals: list[str | None] = [None] * len(events)
    prompts = [""] * len(events)
    if intake_paused(queue):
        refusals = [None if again else texts.PAUSED for again in repeat]
    else:
        for i, raw in enumerate(raws):
            if repeat[i]:
                continue
            try:
                prompts[i] = validate_prompt(raw, max_chars=max_chars)
            except PromptRejected as exc:
                refusals[i] = str(exc)
    for check in checks:
        open_ = [i for i, refusal in enumerate(refusals) if refusal is None and not repeat[i]]
        if not open_:
            break
        if isinstance(check, BatchCheck):
            decided = check.check_many([events[i] for i in open_])
        else:
            decided = [check(events[i]) for i in open_]
        for i, refusal in zip(open_, decided, strict=True):
            refusals[i] = refusal
    if not store_refusals:
        for refusal in refusals:
            if refusal is not None:
                raise PromptRejected(refusal)
    items = []
    for event, raw, prompt, refusal in zip(events, raws, prompts, refusals, strict=True):
        new = NewRequest(
            platform=event.platform, external_id=event.external_id, author_id=event.author_id,
            author_name=storable(event.author_name, 256), prompt_raw=raw,
            prompt=prompt or normalize_prompt(raw)[:max_chars], channel_id=event.channel_id,
            guild_id=event.guild_id, n_images=event.n_images, seed=event.seed, options=dict(event.options),
        )
        items.append((new, Status.QUEUED if refusal is None else Status.REJECTED, refusal))
    out = []
    for result, refusal in zip(queue.enqueue_many(items, actor=actor), refusals, strict=True):
        rec = result.request
        if rec.status == Status.REJECTED and (refusal is None or not result.created):
            refusal = texts.refusal_text(rec.error)  # banned (decided by the queue), or the stored reason
        elif rec.status != Status.REJECTED:
            refusal = None
        out.append(Admission(rec, result.created, refusal))
    return out


def _stored_keys(queue: Queue, events: Sequence[IntakeEvent]) -> set[tuple[str, str]]:
    """The ``(platform, external_id)`` pairs of ``events`` already stored (one query per platform)."""
    wanted: dict[str, set[str]] = {}
    for event in events:
        wanted.setdefault(event.platform, set()).add(event.external_id)
    R = Request.__table__
    found: set[tuple[str, str]] = set()
    with queue.db.read.connect() as conn:
        for platform, ids in wanted.items():
            rows = conn.execute(select(R.c.external_id).where(R.c.platform == platform,
                                                                R.c.external_id.in_(sorted(ids))))
            found.update((platform, row.external_id) for row in rows)
    return found


@runtime_checkable
class IntakeSource(Protocol):
    """An adapter that receives events by itself (a poller, a gateway connection)."""

    name: str
    #: Seconds between ``poll()`` calls; None when the adapter is event-driven.
    poll_interval: float | None

    async def start(self, *, intake: bool) -> None:
        """Connect. ``intake=False``: only what delivery needs (a worker-only process)."""
        ...

    async def poll(self) -> int:
        """One round of intake; returns how many events it handled."""
        ...

    async def stop(self) -> None:
        ...
