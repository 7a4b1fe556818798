"""Rate limits at intake: per user (burst and hourly), per Discord guild and channel, and a global
queue cap. Policy is a pure function of counts and a clock; the counts come from the database
(:mod:`storage.limits`), so limits hold across restarts and processes.

:meth:`RateLimiter.check` has the shape of an intake check (:data:`bot.platforms.admission.Check`):
it returns the polite refusal for the user, or None to accept.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from collections.abc import Callable, Sequence
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
    """An intake check (``check``) and a batch intake check (``check_many``): one query per kind of
    window for a whole batch, then the batch is decided in order, each accepted event counting
    against the events after it (so one user's 10 mentions in one poll are limited like 10 polls)."""

    def __init__(self, counts: LimitCounts, cfg: Any, *, clock: Callable[[], dt.datetime] = utcnow,
                 on_limited: Callable[[Limited], None] | None = None) -> None:
        self.counts = counts
        self.cfg = cfg
        self.clock = clock
        self.on_limited = on_limited

    def _windows(self, event: Any) -> list[tuple[str, str, str, int, float]]:
        """(limit name, counted by, key, limit, window seconds) of the limits that apply to ``event``."""
        cfg = self.cfg
        out = [("user_burst", "user", event.author_id, cfg.user_burst, cfg.user_burst_seconds),
               ("user_hourly", "user", event.author_id, cfg.user_hourly, 3600.0)]
        if event.guild_id:
            out.append(("guild_hourly", "guild", event.guild_id, cfg.guild_hourly, 3600.0))
        if event.channel_id and event.guild_id:
            out.append(("channel_hourly", "channel", event.channel_id, cfg.channel_hourly, 3600.0))
        return [w for w in out if w[3] > 0]

    def limited_many(self, events: Sequence[Any]) -> list[Limited | None]:
        """The limit each event runs into (or None), deciding ``events`` in order; when several
        windows are full, the one with the longest wait (so "try again in ..." is true)."""
        cfg, now = self.cfg, self.clock()
        wanted: dict[tuple[str, str], tuple[set[str], dict[str, dt.datetime]]] = {}
        for event in events:
            for name, by, key, _limit, seconds in self._windows(event):
                keys, windows = wanted.setdefault((by, event.platform), (set(), {}))
                keys.add(key)
                windows[name] = now - dt.timedelta(seconds=seconds)
        counts = {group: self.counts.grouped(group[0], group[1], list(keys), windows)
                  for group, (keys, windows) in wanted.items()}
        queued = self.counts.queued() if cfg.queue_cap > 0 else 0
        added: Counter[tuple[str, str, str]] = Counter()  # accepted in this batch, per window and key
        out: list[Limited | None] = []
        for event in events:
            hit: Limited | None = None
            windows = self._windows(event)
            for name, by, key, limit, seconds in windows:
                stored = counts[(by, event.platform)].get(key, {}).get(name, 0)
                mine = added[(name, event.platform, key)]
                if stored + mine >= limit:  # full: of all the full windows, the one freed last says when
                    full = Limited(name, self._wait(by, event.platform, key, limit - mine, seconds, now))
                    if hit is None or (full.retry_after or 0.0) > (hit.retry_after or 0.0):
                        hit = full
            if hit is None and cfg.queue_cap > 0 and queued >= cfg.queue_cap:
                hit = Limited("queue_cap", None)
            if hit is None:
                queued += 1
                for name, _by, key, _limit, _seconds in windows:
                    added[(name, event.platform, key)] += 1
            out.append(hit)
        return out

    def _wait(self, by: str, platform: str, key: str, room: int, seconds: float, now: dt.datetime) -> float:
        """Seconds until one more request fits, when ``room`` slots of the limit are left for stored
        requests (the rest went to this batch, whose requests leave the window last)."""
        if room <= 0:
            return seconds
        count, oldest = self.counts.window(by, platform, key, now - dt.timedelta(seconds=seconds), room)
        return retry_after(count, room, oldest, seconds, now) or 1.0

    def limited(self, event: Any) -> Limited | None:
        """The limit ``event`` (an IntakeEvent) runs into (the longest wait), or None."""
        return self.limited_many([event])[0]

    def _refusal(self, hit: Limited | None) -> str | None:
        if hit is None:
            return None
        if self.on_limited:
            self.on_limited(hit)
        _log.info("rate limited (%s)", hit.kind, extra={"action": "rate_limited"})
        if hit.kind == "queue_cap":
            return self.cfg.busy_message
        return self.cfg.limited_message.format(wait=humane(hit.retry_after or 60))

    def check_many(self, events: Sequence[Any]) -> list[str | None]:
        """Batch intake check: the refusal for each event, or None to accept it."""
        return [self._refusal(hit) for hit in self.limited_many(events)]

    def check(self, event: Any) -> str | None:
        return self.check_many([event])[0]

    __call__ = check
