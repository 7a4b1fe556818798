"""Moderator actions: the one place that decides what approve, reject, requeue, cancel, ban mean.

The CLI, the dashboard and Discord's moderator commands all call these functions.

A rejection owes the requester a refusal. When the caller passes its ``platforms``, :func:`act` sends
it at once through the request's platform (if that platform has ``deliver_refusal``) and records
``refusal_posted`` or ``refusal_failed`` in the queue log; the rejection stands either way. On X a
temporary failure records nothing: the refusal stays owed, and the poller sends it later
(:func:`storage.platform_state.owed_refusals`), as it does for rejections made without
``platforms`` (the CLI). No other platform retries owed refusals, so there it is ``refusal_failed``.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from typing import Any

from bot.platforms.base import DeliveryError
from storage.errors import IllegalTransition, StorageError
from storage.moderators import status_changes_since
from storage.platform_state import audit
from storage.queue import Queue
from storage.records import RequestRecord, UserRecord

_log = logging.getLogger(__name__)

#: What the requester is told when a moderator rejects a request without giving a reason.
DEFAULT_REFUSAL = "Sorry, a moderator decided not to post this one."

ACTIONS = ("approve", "reject", "requeue", "cancel", "hold")

#: Actors whose status changes are the request's normal course, not someone's decision.
AUTOMATIC_ACTORS = ("worker:", "intake:", "service:")

#: Platforms whose poller sends a refusal left owed after a temporary failure (X:
#: :func:`storage.platform_state.owed_refusals`). Elsewhere nothing retries it, so such a failure is
#: recorded as ``refusal_failed``, like a permanent one.
SENDS_OWED_REFUSALS = frozenset({"x"})

#: The platforms a user can be on (``users.platform``), and the longest id one can have.
PLATFORMS = ("local", "x", "discord")
USER_ID_MAX = 128


def act(queue: Queue, action: str, request_id: int, *, actor: str, reason: str | None = None,
        platforms: Mapping[str, Any] | None = None, seen: dt.datetime | None = None) -> RequestRecord:
    """Apply a moderator ``action`` to a request; raises IllegalTransition or NotFound.
    With ``platforms``, a rejection also sends the requester its refusal (see the module docstring).

    ``seen``: when the moderator's page showed the request (the dashboard's forms send it). If
    someone other than the pipeline (another moderator, the requester) changed its status since,
    nothing is done and the IllegalTransition says who did what: a stale "reject" would otherwise
    overturn another moderator's approval and refuse the requester. The workers' progress (queued,
    running, generated, ...) does not count: a hold or cancel still catches a request on the move."""
    if action not in ACTIONS:
        raise ValueError(f"unknown moderator action {action!r}; expected one of {', '.join(ACTIONS)}")
    if seen is not None:
        _check_unchanged(queue, action, request_id, seen)
    rec: RequestRecord = getattr(queue, action)(request_id, actor=actor, reason=reason)
    if action == "reject" and platforms is not None:
        send_refusal(queue, rec, platforms, actor=actor, message=reason or DEFAULT_REFUSAL)
    return rec


def _check_unchanged(queue: Queue, action: str, request_id: int, seen: dt.datetime) -> None:
    change = status_changes_since(queue, request_id, seen, exclude_actors=AUTOMATIC_ACTORS)
    if change is None:
        return
    rec = queue.get(request_id)
    raise IllegalTransition(request_id, rec.status.value, action, action,
                            detail=f"and {change.actor} {change.action} it after your page showed it "
                                   f"({change.created_at:%H:%M:%S} UTC): nothing was done, look again")


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
        if not exc.permanent and rec.platform in SENDS_OWED_REFUSALS:
            # X failing for a while: nothing recorded, so the refusal stays owed and is sent later
            _log.warning("refusal for request %s not sent yet (%s); it stays owed", rec.id, exc,
                         extra={"request_id": rec.id})
            return False
        # permanent, or on a platform that nothing would retry it on: the queue log says the
        # requester was not told (it said nothing, as if the refusal had gone out)
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


class BadUserRef(StorageError, ValueError):
    """A user reference no platform can have (the message says why, in one line)."""


def check_user_ref(user_ref: str) -> str:
    """``user_ref`` when it can name a user: ``local:ID`` (or a bare ID), ``x:NUMBER`` or
    ``discord:NUMBER``; else :class:`BadUserRef`. A typo ("discrod:123", "x:@name") would otherwise
    ban nobody while the moderator is told the user is banned."""
    platform, sep, uid = user_ref.partition(":")
    if not sep:
        platform, uid = "local", user_ref
    shown = repr(user_ref[:80])
    if platform not in PLATFORMS:
        raise BadUserRef(f"unknown platform {platform[:32]!r} in user {shown}: "
                         f"write {', '.join(p + ':ID' for p in PLATFORMS)}")
    if not uid or len(uid) > USER_ID_MAX:
        raise BadUserRef(f"no user id in {shown}" if not uid else f"user id too long in {shown} "
                         f"(at most {USER_ID_MAX} characters)")
    if platform != "local" and not (uid.isascii() and uid.isdigit()):
        raise BadUserRef(f"{platform} user ids are numbers: {shown} is not one (a name or @handle is not an id)")
    return user_ref


def ban(queue: Queue, user_ref: str, *, actor: str, reason: str | None = None) -> UserRecord:
    return queue.set_ban(check_user_ref(user_ref), True, actor=actor, reason=reason)


def unban(queue: Queue, user_ref: str, *, actor: str, reason: str | None = None) -> UserRecord:
    return queue.set_ban(check_user_ref(user_ref), False, actor=actor, reason=reason)
