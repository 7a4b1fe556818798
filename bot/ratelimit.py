"""Rate limits at intake: per user (burst and hourly), per Discord guild and channel, and a global
queue cap. Policy is a pure function of counts and a clock; the counts come from the database
(:mod:`storage.limits`), so limits hold across restarts and processes.

:meth:`RateLimiter.check` has the shape of an intake check (:data:`bot.platforms.admission.Check`):
it returns the polite refusal for the user, or None to accept.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from storage.limits import LimitCounts
from storage.models import utcnow

_log = logging.getLogger(__name__)


def retry_after(count: int, limit: int, oldest: dt.datetime | None, window: float, now: dt.datetime) -> float | None:
    """Seconds until one more request fits, or None when it fits now. ``limit <= 0`` means no limit.
    ``oldest`` is the creation time of the request whose leaving the window frees a slot."""
    if limit <= 0 or count < limit:
        return None
    if oldest is None:
        return window
    return max(1.0, (oldest + dt.timedelta(seconds=window) - now).total_seconds())


def humane(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} seconds"
    if seconds < 5400:
        return f"{round(seconds / 60)} minutes"
    return f"{round(seconds / 3600)} hours"


@dataclass(frozen=True, slots=True)
class Limited:
    kind: str  # "user_burst", "user_hourly", "guild_hourly", "channel_hourly", "queue_cap"
    retry_after: float | None


class RateLimiter:
    def __init__(self, counts: LimitCounts, cfg: Any, *, clock: Callable[[], dt.datetime] = utcnow,
                 on_limited: Callable[[Limited], None] | None = None) -> None:
        self.counts = counts
        self.cfg = cfg
        self.clock = clock
        self.on_limited = on_limited

    def limited(self, event: Any) -> Limited | None:
        """The first limit ``event`` (an IntakeEvent) runs into, or None."""
        cfg, now = self.cfg, self.clock()
        windows: list[tuple[str, Callable[..., tuple[int, dt.datetime | None]], tuple[Any, ...], int, float]] = [
            ("user_burst", self.counts.user, (event.platform, event.author_id), cfg.user_burst, cfg.user_burst_seconds),
            ("user_hourly", self.counts.user, (event.platform, event.author_id), cfg.user_hourly, 3600.0),
        ]
        if event.guild_id:
            windows.append(("guild_hourly", self.counts.guild, (event.platform, event.guild_id), cfg.guild_hourly, 3600.0))
        if event.channel_id and event.guild_id:
            windows.append(("channel_hourly", self.counts.channel, (event.platform, event.channel_id),
                            cfg.channel_hourly, 3600.0))
        for kind, count_fn, key, limit, window in windows:
            if limit <= 0:
                continue
            count, oldest = count_fn(*key, now - dt.timedelta(seconds=window), limit)
            wait = retry_after(count, limit, oldest, window, now)
            if wait is not None:
                return Limited(kind, wait)
        if cfg.queue_cap > 0 and self.counts.queued() >= cfg.queue_cap:
            return Limited("queue_cap", None)
        return None

    def check(self, event: Any) -> str | None:
        hit = self.limited(event)
        if hit is None:
            return None
        if self.on_limited:
            self.on_limited(hit)
        _log.info("rate limited (%s)", hit.kind, extra={"action": "rate_limited"})
        if hit.kind == "queue_cap":
            return self.cfg.busy_message
        return self.cfg.limited_message.format(wait=humane(hit.retry_after or 60))
