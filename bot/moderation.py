"""Moderator actions: the one place that decides what approve, reject, requeue, cancel, ban mean.

The CLI, the dashboard and Discord's moderator commands all call these functions.

A rejection owes the requester a refusal. When the caller passes its ``platforms``, :func:`act` sends
it at once through the request's platform (if that platform has ``deliver_refusal``) and records
``refusal_posted`` or ``refusal_failed`` in the queue log; the rejection stands either way. A
temporary failure records nothing: the refusal stays owed, and the platform's poller sends it later
(X: :func:`storage.platform_state.owed_refusals`), as it does for rejections made without
``platforms`` (the CLI).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from bot.platforms.base import DeliveryError
from storage.platform_state import audit
from storage.queue import Queue
from storage.records import RequestRecord, UserRecord

_log = logging.getLogger(__name__)

#: What the requester is told when a moderator rejects a request without giving a reason.
DEFAULT_REFUSAL = "Sorry, a moderator decided not to post this one."

ACTIONS = ("approve", "reject", "requeue", "cancel", "hold")


def act(queue: Queue, action: str, request_id: int, *, actor: str, reason: str | None = None,
        platforms: Mapping[str, Any] | None = None) -> RequestRecord:
    """Apply a moderator ``action`` to a request; raises IllegalTransition or NotFound.
    With ``platforms``, a rejection also sends the requester its refusal (see the module docstring)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown moderator action {action!r}; expected one of {', '.join(ACTIONS)}")
    rec: RequestRecord = getattr(queue, action)(request_id, actor=actor, reason=reason)
    if action == "reject" and platforms is not None:
        send_refusal(queue, rec, platforms, actor=actor, message=reason or DEFAULT_REFUSAL)
    return rec


def send_refusal(queue: Queue, rec: RequestRecord, platforms: Mapping[str, Any], *, actor: str,
                 message: str = DEFAULT_REFUSAL) -> bool:
    """Deliver ``message`` for a rejected request through its platform; True when it was sent."""
    platform = platforms.get(rec.platform)
    deliver = getattr(platform, "deliver_refusal", None)
    if deliver is None:
        return False
    try:
        delivery = deliver(rec, message)
    except DeliveryError as exc:
        if not exc.permanent:  # X failing for a while: nothing recorded, so the refusal stays owed
            _log.warning("refusal for request %s not sent yet (%s); it stays owed", rec.id, exc,
                         extra={"request_id": rec.id})
            return False
        _log.warning("refusal for request %s failed: %s", rec.id, exc, extra={"request_id": rec.id})
        audit(queue.db, request_id=rec.id, actor=actor, action="refusal_failed", reason=str(exc)[:500],
              user_ref=rec.user_ref, clock=queue.clock)
        return False
    except Exception as exc:  # the rejection stands; the log says the refusal did not go out
        _log.warning("refusal for request %s failed: %s", rec.id, exc, extra={"request_id": rec.id})
        audit(queue.db, request_id=rec.id, actor=actor, action="refusal_failed", reason=str(exc)[:500],
              user_ref=rec.user_ref, clock=queue.clock)
        return False
    audit(queue.db, request_id=rec.id, actor=actor, action="refusal_posted", reason=delivery.reply_id,
          user_ref=rec.user_ref, clock=queue.clock)
    return True


def ban(queue: Queue, user_ref: str, *, actor: str, reason: str | None = None) -> UserRecord:
    return queue.set_ban(user_ref, True, actor=actor, reason=reason)


def unban(queue: Queue, user_ref: str, *, actor: str, reason: str | None = None) -> UserRecord:
    return queue.set_ban(user_ref, False, actor=actor, reason=reason)
