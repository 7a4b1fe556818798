"""The port every platform implements, so the worker never knows which platform it serves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from storage.records import RequestRecord


@dataclass(frozen=True, slots=True)
class Delivery:
    """What the platform returned for a posted reply."""

    reply_id: str
    reply_url: str | None = None


class DeliveryError(Exception):
    """Posting failed. ``permanent`` errors (deleted or protected post) are not retried;
    ``retry_after`` (seconds) is honoured when the platform says when to come back.
    ``maybe_posted``: the call may have gone through although it failed (a timeout or a dropped
    connection after the request was sent, a server error): the reply may be out, so it is looked
    for (:meth:`Platform.find_delivery`) before it is posted again."""

    def __init__(self, message: str, *, permanent: bool = False, retry_after: float | None = None,
                 maybe_posted: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.retry_after = retry_after
        self.maybe_posted = maybe_posted


class Platform(Protocol):
    name: str

    def deliver(self, request: RequestRecord, images: list[Path]) -> Delivery:
        """Post the result (images) of ``request``; raise :class:`DeliveryError` on failure."""
        ...

    def find_delivery(self, request: RequestRecord) -> Delivery | None:
        """Recovery after a crash while posting: the reply already on the platform, if any."""
        ...
