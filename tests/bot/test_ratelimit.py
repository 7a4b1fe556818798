"""Rate limits at intake, counted in the real database (SQLite and PostgreSQL)."""

from __future__ import annotations

import dataclasses
import datetime as dt

from bot.config import LimitsConfig
from bot.platforms.admission import IntakeEvent, admit
from bot.ratelimit import RateLimiter, humane, retry_after
from storage.limits import LimitCounts
from storage.queue import Queue
from storage.states import Status

T0 = dt.datetime(2026, 1, 1, 12, 0, 0)


def test_retry_after_policy() -> None:
    assert retry_after(2, 3, None, 60, T0) is None
    assert retry_after(5, 0, None, 60, T0) is None  # 0 = no limit
    assert retry_after(3, 3, T0 - dt.timedelta(seconds=45), 60, T0) == 15
    assert retry_after(3, 3, T0 - dt.timedelta(seconds=60), 60, T0) == 1.0  # never "0 seconds"
    assert humane(15) == "15 seconds" and humane(600) == "10 minutes" and humane(7200) == "2 hours"


def _event(i: int, user: str = "u1", guild: str | None = None, channel: str | None = None) -> IntakeEvent:
    return IntakeEvent(platform="discord" if guild else "local", external_id=f"e{i}", author_id=user,
                       prompt_raw=f"a red circle {i}", guild_id=guild, channel_id=channel)


def _limiter(queue: Queue, clock, **kw) -> RateLimiter:
    cfg = dataclasses.replace(LimitsConfig(), **kw)
    return RateLimiter(LimitCounts(queue.db), cfg, clock=clock)


def test_user_burst_then_recovery(queue: Queue, clock) -> None:
    lim = _limiter(queue, clock, user_burst=3, user_burst_seconds=60, user_hourly=0)
    results = []
    for i in range(4):
        results.append(admit(queue, _event(i), max_chars=280, checks=[lim.check]))
        clock.advance(5)
    assert [a.accepted for a in results] == [True, True, True, False]
    assert "please try again in 45 seconds" in results[3].refusal  # the first request leaves the window at t=60
    assert results[3].request.status == Status.REJECTED and results[3].owes_refusal
    # a refused request does not extend the limit; once the window passes, requests fit again
    clock.advance(41)
    assert admit(queue, _event(10), max_chars=280, checks=[lim.check]).accepted
    # other users are not affected
    assert admit(queue, _event(11, user="u2"), max_chars=280, checks=[lim.check]).accepted


def test_hourly_limit_holds_across_a_restart(queue: Queue, clock) -> None:
    lim = _limiter(queue, clock, user_burst=0, user_hourly=5)
    for i in range(5):
        assert admit(queue, _event(i), max_chars=280, checks=[lim.check]).accepted
        clock.advance(60)
    # a new process: a new limiter over the same database
    fresh = _limiter(queue, clock, user_burst=0, user_hourly=5)
    refused = admit(queue, _event(99), max_chars=280, checks=[fresh.check])
    assert not refused.accepted and "55 minutes" in refused.refusal  # the first one (t=0) leaves at t=60 min; now t=5 min


def test_guild_and_channel_limits(queue: Queue, clock) -> None:
    lim = _limiter(queue, clock, user_burst=0, user_hourly=0, guild_hourly=4, channel_hourly=2)
    ok = [admit(queue, _event(i, user=f"u{i}", guild="g1", channel="c1"), max_chars=280, checks=[lim.check]).accepted
          for i in range(3)]
    assert ok == [True, True, False]  # channel limit
    ok = [admit(queue, _event(10 + i, user=f"v{i}", guild="g1", channel=f"c{2 + i}"), max_chars=280,
                 checks=[lim.check]).accepted for i in range(3)]
    assert ok == [True, True, False]  # guild limit (2 + 2 accepted)
    assert lim.limited(_event(20, guild="g2", channel="c9")) is None


def test_queue_cap_says_busy(queue: Queue, clock) -> None:
    lim = _limiter(queue, clock, user_burst=0, user_hourly=0, queue_cap=2)
    assert admit(queue, _event(1, user="a"), max_chars=280, checks=[lim.check]).accepted
    assert admit(queue, _event(2, user="b"), max_chars=280, checks=[lim.check]).accepted
    busy = admit(queue, _event(3, user="c"), max_chars=280, checks=[lim.check])
    assert not busy.accepted and busy.refusal == LimitsConfig().busy_message
    queue.claim("w", 1)  # one leaves the queue: room again
    assert admit(queue, _event(4, user="d"), max_chars=280, checks=[lim.check]).accepted


def test_a_batch_is_limited_as_one_by_one(queue: Queue, twin_queue: Queue, clock) -> None:
    """admit_many (one query per kind of limit for the whole batch) decides what admitting the events
    one after another decides, including limits reached inside the batch and their waits."""
    from bot.platforms.admission import admit_many

    kw = dict(user_burst=3, user_burst_seconds=60, user_hourly=5, guild_hourly=6, channel_hourly=4, queue_cap=12)
    for q in (queue, twin_queue):  # history: u1 has 2 requests from 30 s ago
        for i in range(2):
            admit(q, _event(100 + i), max_chars=280, checks=[_limiter(q, clock, **kw)])
    clock.advance(30)
    events = [_event(i, user=f"u{i % 3}", guild="g1" if i % 2 else None, channel=f"c{i % 4}" if i % 2 else None)
              for i in range(16)] + [_event(99, user="u1", guild="g2", channel="c9")]
    one = [admit(queue, e, max_chars=280, checks=[_limiter(queue, clock, **kw)]) for e in events]
    many = admit_many(twin_queue, events, max_chars=280, checks=[_limiter(twin_queue, clock, **kw)])
    assert [(a.accepted, a.refusal) for a in many] == [(a.accepted, a.refusal) for a in one]
    refusals = {a.refusal for a in many if not a.accepted}
    assert "please try again in 30 seconds" in " ".join(refusals)  # u1's stored burst leaves at t=60
    assert LimitsConfig().busy_message in refusals  # the queue cap, reached inside the batch


def test_a_batch_counts_its_own_requests(queue: Queue, clock) -> None:
    from bot.platforms.admission import admit_many

    lim = _limiter(queue, clock, user_burst=3, user_burst_seconds=60, user_hourly=0)
    got = admit_many(queue, [_event(i) for i in range(5)], max_chars=280, checks=[lim])
    assert [a.accepted for a in got] == [True, True, True, False, False]
    assert "please try again in 60 seconds" in got[3].refusal  # the batch's own first request frees the slot


def test_the_wait_is_that_of_the_window_freed_last(queue: Queue, clock) -> None:
    """With the burst and the hourly window both full, "try again in" is the longer wait: one more
    request fits only once both have room."""
    lim = _limiter(queue, clock, user_burst=2, user_burst_seconds=60, user_hourly=3)
    assert admit(queue, _event(0), max_chars=280, checks=[lim]).accepted  # t=0: leaves the hour at t=3600
    clock.advance(61)
    assert admit(queue, _event(1), max_chars=280, checks=[lim]).accepted  # t=61: leaves the burst at t=121
    clock.advance(1)
    assert admit(queue, _event(2), max_chars=280, checks=[lim]).accepted
    clock.advance(8)  # t=70: the burst frees a slot in 51 s, the hour in 3530 s
    refused = admit(queue, _event(3), max_chars=280, checks=[lim])
    assert not refused.accepted and "please try again in 59 minutes" in refused.refusal
    assert lim.limited(_event(4)).kind == "user_hourly"


def test_events_stored_before_count_once(queue: Queue, clock) -> None:
    """A redelivered event (stored before, or twice in one batch) is the stored request, and does not
    count against a limit or the queue cap a second time."""
    from bot.platforms.admission import admit_many

    lim = _limiter(queue, clock, user_burst=3, user_burst_seconds=60, user_hourly=0, queue_cap=3)
    first = admit(queue, _event(1), max_chars=280, checks=[lim])
    assert first.accepted
    clock.advance(5)
    got = admit_many(queue, [_event(1), _event(2), _event(2), _event(1), _event(3)], max_chars=280, checks=[lim])
    assert [(a.accepted, a.created) for a in got] == [(True, False), (True, True), (True, False), (True, False),
                                                     (True, True)]
    assert got[0].request.id == first.request.id and got[2].request.id == got[1].request.id
    assert all(a.refusal is None for a in got)
    # now the limit is really reached: 3 stored requests in the burst window and 3 queued
    over = admit_many(queue, [_event(3), _event(4)], max_chars=280, checks=[lim])
    assert [(a.accepted, a.created) for a in over] == [(True, False), (False, True)]
    assert "please try again in 55 seconds" in over[1].refusal


def test_a_refused_event_redelivered_keeps_its_refusal_without_a_new_one(queue: Queue, clock) -> None:
    from bot.platforms.admission import admit_many

    lim = _limiter(queue, clock, user_burst=1, user_burst_seconds=60, user_hourly=0)
    got = admit_many(queue, [_event(1), _event(2)], max_chars=280, checks=[lim])
    assert [a.accepted for a in got] == [True, False] and got[1].owes_refusal
    again = admit_many(queue, [_event(2), _event(1)], max_chars=280, checks=[lim])
    assert [(a.accepted, a.created, a.owes_refusal) for a in again] == [(False, False, False), (True, False, False)]
    assert again[0].refusal == got[1].refusal
