"""Fault tests for delivery: a platform outage (5xx) and then a rate limit (429 with a reset), with
the real tweepy client against the fake X, the real queue and the worker's tenacity retries.
Time is virtual: the fake X, the adapter and the worker's retry sleeps share one settable clock."""

from __future__ import annotations

from pathlib import Path

from bot.fakes.x_server import FakeX
from bot.worker import Worker
from storage.queue import Queue
from storage.states import Status
from tests.e2e.adapter_support import LetterGenerator
from tests.e2e.test_x_adapter import EpochClock, db_url, fake, make_x, xclock  # noqa: F401  (fixtures)

POST = "POST /2/tweets"


def test_outage_then_rate_limit_everything_delivered_once_within_budget(fake: FakeX, queue: Queue,  # noqa: F811
                                                                      xclock: EpochClock, tmp_path: Path) -> None:
    x = make_x(fake, queue, xclock, daily_post_budget=8, max_rate_limit_wait=60)
    users = [fake.add_user(f"user{i}") for i in range(3)]
    worker = Worker(queue, LetterGenerator(), {"x": x}, tmp_path / "images", owner="w", sleep=xclock.advance,
                    delivery_retry_seconds=120)
    try:
        mentions = [fake.add_mention(u, f"a cat number {i}") for i, u in enumerate(users)]
        x.poll_once()
        fake.inject_server_error(POST, status=503, count=None, duration=60)  # X is down for a minute
        t0 = xclock()
        while worker.generate_batch() or worker.deliver_batch():
            pass
        assert xclock() - t0 >= 60  # the worker waited the outage out (virtual time)
        for m in mentions:
            assert len(fake.replies_to(m)) == 1
        failed_posts = [r for r in fake.requests_to(POST) if r.status == 503]
        assert len(failed_posts) >= 3
        assert worker.metrics.registry.get_sample_value("dallebot_failures_total",
                                                        {"reason": "delivery_retry"}) >= 3
        # then a rate limit with a reset time: waited out, nothing posted early
        later = [fake.add_mention(u, f"a dog number {i}") for i, u in enumerate(users)]
        x.poll_once()
        fake.inject_rate_limit(POST, count=1, reset_after=30)
        while worker.generate_batch() or worker.deliver_batch():
            pass
        for m in mentions + later:
            assert len(fake.replies_to(m)) == 1
        statuses = [r.status for r in fake.requests_to(POST)]
        assert statuses.count(429) == 1 and statuses.count(201) == 6
        assert all(r.status == Status.POSTED for r in queue.list(platform="x"))
        # within the daily posting budget: 6 of 8 used, two more fit, then it is spent
        more = [fake.add_mention(users[0], f"a bird number {i}") for i in range(3)]
        x.poll_once()
        while worker.generate_batch() or worker.deliver_batch():
            pass
        posted = [m for m in more if fake.replies_to(m)]
        assert len(posted) == 2
        waiting = [r for r in queue.list(platform="x") if r.status == Status.GENERATED]
        assert len(waiting) == 1 and "budget" in (waiting[0].error or "")
    finally:
        x.client.session.close()
