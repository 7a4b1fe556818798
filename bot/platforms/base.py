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
    ``retry_after`` (seconds) is honoured when the platform says when to come back."""

    def __init__(self, message: str, *, permanent: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.retry_after = retry_after


class Platform(Protocol):
    name: str

    def deliver(self, request: RequestRecord, images: list[Path]) -> Delivery:
        """Post the result (images) of ``request``; raise :class:`DeliveryError` on failure."""
        ...

    def find_delivery(self, request: RequestRecord) -> Delivery | None:
        """Recovery after a crash while posting: the reply already on the platform, if any."""
        ...
