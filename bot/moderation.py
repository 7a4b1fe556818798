"""Moderator actions: the one place that decides what approve, reject, requeue, cancel, ban mean.

The CLI, the dashboard and Discord's moderator commands all call these functions.
"""

from __future__ import annotations

from storage.queue import Queue
from storage.records import RequestRecord, UserRecord

ACTIONS = ("approve", "reject", "requeue", "cancel", "hold")


def act(queue: Queue, action: str, request_id: int, *, actor: str, reason: str | None = None) -> RequestRecord:
    """Apply a moderator ``action`` to a request; raises IllegalTransition or NotFound."""
    if action not in ACTIONS:
        raise ValueError(f"unknown moderator action {action!r}; expected one of {', '.join(ACTIONS)}")
    return getattr(queue, action)(request_id, actor=actor, reason=reason)


def ban(queue: Queue, user_ref: str, *, actor: str, reason: str | None = None) -> UserRecord:
    return queue.set_ban(user_ref, True, actor=actor, reason=reason)


def unban(queue: Queue, user_ref: str, *, actor: str, reason: str | None = None) -> UserRecord:
    return queue.set_ban(user_ref, False, actor=actor, reason=reason)
