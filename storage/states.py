"""The request state machine: every status and every allowed transition, in one place.

::

    received ──► queued ──► running ──► generated ──► posting ──► posted
       │           │  ▲        │  │         │  ▲         │
       │           │  └────────┘  │         │  └─────────┘ (transient delivery failure)
       │           │   (retry)    ▼         ▼
       │           │           held_for_review ◄── (NSFW flag or moderator hold)
       ▼           ▼              │
    rejected    cancelled      approve ► generated / queued;  reject ► rejected
                               running/posting out of attempts ► dead;  permanent error ► failed

Moderators may requeue failed, dead, cancelled and rejected requests. A delivery that may already
have been posted (a crash mid-post) and whose platform could not be asked stays ``posting``, unleased
until its retry, so that it is checked on the platform before it is posted again.
"""

from __future__ import annotations

import enum


class Status(enum.StrEnum):
    RECEIVED = "received"  # stored by intake, not yet accepted
    QUEUED = "queued"  # waiting for a worker
    RUNNING = "running"  # claimed by a worker (lease)
    GENERATED = "generated"  # images made and checked, waiting for delivery
    HELD = "held_for_review"  # waiting for a moderator (flagged image or prompt)
    POSTING = "posting"  # delivery in flight (intent recorded before the platform call)
    POSTED = "posted"  # reply delivered
    REJECTED = "rejected"  # refused (filter, ban, limits, moderator)
    FAILED = "failed"  # permanent error (e.g. the tweet was deleted)
    DEAD = "dead"  # out of attempts
    CANCELLED = "cancelled"  # withdrawn by the requester or a moderator


S = Status

TRANSITIONS: dict[Status, frozenset[Status]] = {
    S.RECEIVED: frozenset({S.QUEUED, S.REJECTED, S.HELD, S.CANCELLED}),
    S.QUEUED: frozenset({S.RUNNING, S.HELD, S.REJECTED, S.CANCELLED}),
    S.RUNNING: frozenset({S.GENERATED, S.HELD, S.QUEUED, S.FAILED, S.DEAD, S.CANCELLED}),
    S.GENERATED: frozenset({S.POSTING, S.HELD, S.REJECTED, S.CANCELLED}),
    S.HELD: frozenset({S.GENERATED, S.QUEUED, S.REJECTED, S.CANCELLED}),
    S.POSTING: frozenset({S.POSTED, S.GENERATED, S.FAILED, S.DEAD}),
    S.POSTED: frozenset(),
    S.REJECTED: frozenset({S.QUEUED}),
    S.FAILED: frozenset({S.QUEUED}),
    S.DEAD: frozenset({S.QUEUED}),
    S.CANCELLED: frozenset({S.QUEUED}),
}

# States in which a request still waits for something to happen.
ACTIVE: frozenset[Status] = frozenset({S.RECEIVED, S.QUEUED, S.RUNNING, S.GENERATED, S.HELD, S.POSTING})
TERMINAL: frozenset[Status] = frozenset(Status) - ACTIVE


def allowed(current: Status | str, target: Status | str) -> bool:
    return Status(target) in TRANSITIONS[Status(current)]


def sources_of(target: Status) -> frozenset[Status]:
    """Every status from which ``target`` may be reached."""
    return frozenset(s for s, targets in TRANSITIONS.items() if target in targets)
