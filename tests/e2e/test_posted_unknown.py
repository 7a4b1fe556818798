"""A post that may have gone through: the platform acted on the call, but its answer never came back
(X create_tweet read timeout; Discord's answer lost to a dropped connection or a delivery that timed
out). The real tweepy and discord.py clients against the fake servers, the real queue and worker:
the reply is posted exactly once and the request ends ``posted`` with that reply's id, whether the
retry comes within the attempt (the worker looks first) or at a later attempt (the queue keeps the
request ``posting``, so the next claim is a recovery that asks the platform)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import discord
import pytest
import yarl
from discord.gateway import DiscordWebSocket

import bot.platforms.discord as discord_platform
from bot.config import DiscordConfig, ModelConfig, XConfig
from bot.fakes.discord_server import FakeDiscord, FakeInteraction
from bot.fakes.x_server import FakeX, XTweet
from bot.model import load_generator
from bot.platforms.discord import DiscordPlatform
from bot.platforms.x import XPlatform
from bot.worker import Worker
from storage.queue import Queue
from storage.records import NewRequest, RequestRecord
from storage.states import Status
from tests.conftest import FakeClock
from tests.e2e.adapter_support import LetterGenerator
from tests.e2e.test_x_adapter import EpochClock, fake_x, xclock  # noqa: F401 (fixtures)

POST_TWEET = "POST /2/tweets"
TIMELINE = "GET /2/users/:id/tweets"
CHANNEL_POST = "POST /channels/{channel_id}/messages"
HISTORY = "GET /channels/{channel_id}/messages"


@pytest.fixture(params=["sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    """SQLite; the tests marked ``BOTH_DATABASES`` also on PostgreSQL."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_schema_url")


BOTH_DATABASES = pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)


def actions(queue: Queue, rid: int) -> list[str]:
    return [a.action for a in queue.audit(rid)]


# ---- X ----------------------------------------------------------------------------------------

@pytest.fixture
def x(fake_x: FakeX, queue: Queue, xclock: EpochClock) -> Iterator[XPlatform]:
    settings = XConfig(enabled=True, api_base_url=fake_x.base_url, poll_interval=5.0, **fake_x.credentials())
    # a short read timeout: the late answer is given up on, as a real one would be after 30 s
    adapter = XPlatform(settings, queue, clock=xclock, sleep=xclock.advance, http_timeout=(5.0, 0.5))
    yield adapter
    adapter.client.session.close()


def x_request(queue: Queue, mention: XTweet) -> RequestRecord:
    [rec] = [r for r in queue.list(platform="x") if r.external_id == mention.id]
    return rec


@BOTH_DATABASES
def test_x_reply_made_without_an_answer_is_found_not_posted_again(fake_x: FakeX, x: XPlatform, queue: Queue,
                                                                  xclock: EpochClock, tmp_path: Path) -> None:
    """X makes the reply, its answer comes after the client gave up (read timeout). The try after it
    asked X first and found the reply: no second post (it was posted again and only X's duplicate
    check caught it, spending a post on the rate-limited route)."""
    mention = fake_x.add_mention(fake_x.add_user("alice"), "a tortoise that took its time")
    assert x.poll_once() == 1
    naps: list[float] = []
    worker = Worker(queue, LetterGenerator(), {"x": x}, tmp_path / "img", owner="w", sleep=naps.append)
    assert worker.generate_batch() == 1
    late = fake_x.inject_late_answer(POST_TWEET, seconds=30)
    assert worker.deliver_batch() == 1
    late.release()
    [reply] = fake_x.replies_to(mention)
    rec = x_request(queue, mention)
    assert rec.status == Status.POSTED and rec.reply_id == reply.id
    assert len(naps) == 1  # one failed try, then the look that found it
    assert [r.status for r in fake_x.requests_to(POST_TWEET)] == [201]  # posted once, never refused
    assert fake_x.requests_to(TIMELINE)
    assert x.posts.used() == 1  # the reply that went out is counted, once
    assert actions(queue, rec.id)[-2:] == ["posting", "posted"]


@BOTH_DATABASES
def test_x_reply_made_without_an_answer_is_looked_for_at_the_next_attempt(
        fake_x: FakeX, x: XPlatform, queue: Queue, clock: FakeClock, tmp_path: Path) -> None:
    """No time left for a retry within the attempt: the request went back to ``generated`` and was
    posted again without a look. It now stays ``posting`` (unleased until the retry time), and the
    next claim is a recovery that finds the reply on X."""
    mention = fake_x.add_mention(fake_x.add_user("bob"), "a snail in a hurry")
    assert x.poll_once() == 1
    worker = Worker(queue, LetterGenerator(), {"x": x}, tmp_path / "img", owner="w", delivery_retry_seconds=0)
    assert worker.generate_batch() == 1
    late = fake_x.inject_late_answer(POST_TWEET, seconds=30)
    assert worker.deliver_batch() == 1
    late.release()
    rec = x_request(queue, mention)
    assert rec.status == Status.POSTING and rec.lease_token is None  # not generated: nobody knows yet
    assert worker.deliver_batch() == 0  # not before the retry time
    clock.advance(600)
    assert worker.deliver_batch() == 1
    [reply] = fake_x.replies_to(mention)
    rec = x_request(queue, mention)
    assert rec.status == Status.POSTED and rec.reply_id == reply.id
    assert [r.status for r in fake_x.requests_to(POST_TWEET)] == [201]
    assert actions(queue, rec.id)[-4:] == ["posting", "retry", "recovering", "posted"]
    assert x.posts.used() == 1


@BOTH_DATABASES
def test_a_last_attempt_that_may_have_posted_looks_before_it_ends(fake_x: FakeX, x: XPlatform, queue: Queue,
                                                                 clock: FakeClock, tmp_path: Path) -> None:
    """The request's last attempt times out after X made the reply, with no time left for a retry
    within it: the request ended ``dead`` while its reply was out (and a moderator's retry would
    post it again). The platform is asked once before the attempt fails: ``posted``."""
    mention = fake_x.add_mention(fake_x.add_user("erin"), "a last chance")
    assert x.poll_once() == 1
    worker = Worker(queue, LetterGenerator(), {"x": x}, tmp_path / "img", owner="w", delivery_retry_seconds=0)
    assert worker.generate_batch() == 1  # attempt 1 of 3
    fake_x.inject_partial_error(POST_TWEET, count=1)  # attempt 2: X answers, without the post
    assert worker.deliver_batch() == 1
    assert x_request(queue, mention).status == Status.GENERATED
    clock.advance(600)
    late = fake_x.inject_late_answer(POST_TWEET, seconds=30)
    assert worker.deliver_batch() == 1  # attempt 3, the last
    late.release()
    [reply] = fake_x.replies_to(mention)
    rec = x_request(queue, mention)
    assert (rec.status, rec.reply_id, rec.attempts) == (Status.POSTED, reply.id, 3)
    assert [r.status for r in fake_x.requests_to(POST_TWEET)] == [200, 201]
    assert x.posts.used() == 1


def test_x_post_that_never_reached_x_is_posted_at_the_next_try(fake_x: FakeX, x: XPlatform, queue: Queue,
                                                               tmp_path: Path) -> None:
    """The other side: X held the call and never acted on it (a hung server). The look finds
    nothing, the next try posts, and the budget counts that one post."""
    mention = fake_x.add_mention(fake_x.add_user("carol"), "a sloth asleep")
    assert x.poll_once() == 1
    worker = Worker(queue, LetterGenerator(), {"x": x}, tmp_path / "img", owner="w", sleep=lambda s: None)
    assert worker.generate_batch() == 1
    hang = fake_x.inject_hang(POST_TWEET, seconds=30)
    assert worker.deliver_batch() == 1
    [reply] = fake_x.replies_to(mention)
    assert x_request(queue, mention).reply_id == reply.id and x.posts.used() == 1
    assert len(fake_x.requests_to(TIMELINE)) == 1  # looked once before posting again
    hang.release()


def test_x_refusals_and_errors_x_answered_are_not_taken_for_posts(fake_x: FakeX, x: XPlatform, queue: Queue,
                                                                  tmp_path: Path) -> None:
    """A 429, a 403 or a 200 without the post are answers: the next try posts without a look, and
    the budget slot is given back."""
    mention = fake_x.add_mention(fake_x.add_user("dave"), "a parrot")
    assert x.poll_once() == 1
    worker = Worker(queue, LetterGenerator(), {"x": x}, tmp_path / "img", owner="w", sleep=lambda s: None)
    assert worker.generate_batch() == 1
    fake_x.inject_partial_error(POST_TWEET, count=1)
    assert worker.deliver_batch() == 1
    assert x_request(queue, mention).status == Status.POSTED
    assert fake_x.requests_to(TIMELINE) == [] and x.posts.used() == 1


# ---- Discord ----------------------------------------------------------------------------------

@pytest.fixture
async def fake_discord() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as server:
        yield server


def discord_settings(fake: FakeDiscord) -> DiscordConfig:
    return DiscordConfig(enabled=True, token=fake.token, api_base_url=fake.api_base, gateway_url=fake.gateway_url,
                         guild_ids=(fake.guild.id,), position_update_seconds=3600.0)


@pytest.fixture
async def adapter(fake_discord: FakeDiscord, queue: Queue,
                  monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[DiscordPlatform]:
    monkeypatch.setattr(discord.http.Route, "BASE", fake_discord.api_base)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake_discord.gateway_url))
    a = DiscordPlatform(discord_settings(fake_discord), queue, client_options={"guild_ready_timeout": 0.05})
    await a.start(intake=True, ready_timeout=5.0)
    yield a
    await a.stop()


async def slash(fake: FakeDiscord, username: str, prompt: str) -> FakeInteraction:
    inter = await fake.send_slash_command("dalle", {"prompt": prompt, "images": 2}, user=fake.add_user(username))
    await fake.wait_for(lambda f: inter.original if inter.original and not inter.original.loading else None, 5.0)
    return inter


def discord_request(queue: Queue, inter: FakeInteraction) -> RequestRecord:
    [rec] = [r for r in queue.list(platform="discord") if r.external_id == inter.id]
    return rec


def results(fake: FakeDiscord) -> list[Any]:
    return [m for m in fake.channel_messages(fake.channel) if m.attachments]


async def deliver(worker: Worker) -> int:
    return await asyncio.wait_for(asyncio.to_thread(worker.deliver_batch), 30)


@pytest.mark.parametrize("how", ["connection dropped", "answer too late"])
async def test_discord_result_posted_without_an_answer_is_posted_once(
        fake_discord: FakeDiscord, adapter: DiscordPlatform, queue: Queue, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """Discord posts the result in the channel (the interaction token is gone), but the answer is
    lost: the connection drops after the upload, or the answer comes after the delivery timed out.
    The retry posted it again (two results in the channel); it now looks first and finds it."""
    inter = await slash(fake_discord, "mason", "a lost letter")
    fake_discord.expire(inter)
    worker = Worker(queue, LetterGenerator(), {"discord": adapter}, tmp_path / "img", owner="w",
                    sleep=lambda s: None)
    assert await asyncio.to_thread(worker.generate_batch) == 1
    if how == "connection dropped":
        fake_discord.inject_lost_answer(CHANNEL_POST)
    else:
        monkeypatch.setattr(discord_platform, "DELIVERY_TIMEOUT_S", 0.5)
        fake_discord.inject_lost_answer(CHANNEL_POST, late=2.0)
    assert await deliver(worker) == 1
    [posted] = results(fake_discord)
    rec = discord_request(queue, inter)
    assert rec.status == Status.POSTED and rec.reply_id == posted.id
    assert len(fake_discord.requests_to(CHANNEL_POST)) == 1 and fake_discord.requests_to(HISTORY)
    assert actions(queue, rec.id)[-2:] == ["posting", "posted"]


@BOTH_DATABASES
async def test_discord_result_posted_without_an_answer_is_looked_for_at_the_next_attempt(
        fake_discord: FakeDiscord, adapter: DiscordPlatform, queue: Queue, clock: FakeClock, tmp_path: Path) -> None:
    inter = await slash(fake_discord, "mason", "a dropped call")
    fake_discord.expire(inter)
    worker = Worker(queue, LetterGenerator(), {"discord": adapter}, tmp_path / "img", owner="w",
                    delivery_retry_seconds=0)
    assert await asyncio.to_thread(worker.generate_batch) == 1
    fake_discord.inject_lost_answer(CHANNEL_POST)
    assert await deliver(worker) == 1
    rec = discord_request(queue, inter)
    assert rec.status == Status.POSTING and rec.lease_token is None
    assert "cannot reach Discord" in (rec.error or "")
    clock.advance(600)
    assert await deliver(worker) == 1
    [posted] = results(fake_discord)
    rec = discord_request(queue, inter)
    assert rec.status == Status.POSTED and rec.reply_id == posted.id
    assert len(fake_discord.requests_to(CHANNEL_POST)) == 1
    assert actions(queue, rec.id)[-4:] == ["posting", "retry", "recovering", "posted"]


async def test_discord_server_error_after_posting_is_looked_for(
        fake_discord: FakeDiscord, adapter: DiscordPlatform, queue: Queue, tmp_path: Path) -> None:
    """A 5xx may come after Discord posted (discord.py itself sends a 500/502/504 again): the next try
    looks first. A 503 that did not post: the look finds nothing, and the result is posted once."""
    inter = await slash(fake_discord, "mason", "an unavailable service")
    fake_discord.expire(inter)
    worker = Worker(queue, LetterGenerator(), {"discord": adapter}, tmp_path / "img", owner="w",
                    sleep=lambda s: None)
    assert await asyncio.to_thread(worker.generate_batch) == 1
    fake_discord.inject_server_error(CHANNEL_POST, status=503)
    assert await deliver(worker) == 1
    [posted] = results(fake_discord)
    assert discord_request(queue, inter).reply_id == posted.id
    assert [r.status for r in fake_discord.requests_to(CHANNEL_POST)] == [503, 200]
    assert len(fake_discord.requests_to(HISTORY)) == 1


# ---- failure metric labels ----------------------------------------------------------------------

def test_a_job_the_model_refuses_is_not_counted_as_an_unreadable_prompt(queue: Queue, tmp_path: Path) -> None:
    """The real (shipped) model refuses a request for 0 images: that was counted as
    ``prompt_unreadable``, which sent operators looking at prompts."""
    rid = queue.enqueue(NewRequest(platform="local", external_id="zero", author_id="u", author_name="u",
                                   prompt_raw="a red circle", prompt="a red circle", n_images=0)).request.id
    worker = Worker(queue, load_generator(ModelConfig()), {}, tmp_path / "img", owner="w")
    assert worker.generate_batch() == 1
    rec = queue.get(rid)
    assert rec.status == Status.FAILED and "the number of images must be 1 or more" in (rec.error or "")
    m = worker.metrics.registry
    assert m.get_sample_value("dallebot_failures_total", {"reason": "settings_unusable"}) == 1
    assert m.get_sample_value("dallebot_failures_total", {"reason": "prompt_unreadable"}) is None
