"""The X adapter end to end: the real tweepy Client against the fake X, the real queue (SQLite and
PostgreSQL) and the real worker with a small test generator."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.config import XConfig
from bot.fakes.x_server import FakeX, XTweet
from bot.platforms import text as texts
from bot.platforms.x import CURSOR, XPlatform
from bot.worker import Worker
from storage.moderators import INTAKE_PAUSED, Switches
from storage.queue import Queue
from storage.states import Status
from tests.conftest import FakeClock
from tests.e2e.adapter_support import BAD_INPUT, LetterGenerator

MENTIONS = "GET /2/users/:id/mentions"


class EpochClock:
    """A settable Unix clock shared by the fake X (rate-limit windows) and the adapter."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(params=["sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    """This module runs on SQLite; the tests marked ``BOTH_DATABASES`` also on PostgreSQL."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_schema_url")


BOTH_DATABASES = pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)


@pytest.fixture
def xclock() -> EpochClock:
    return EpochClock()


@pytest.fixture
def fake(xclock: EpochClock) -> Iterator[FakeX]:
    with FakeX(clock=xclock) as server:
        yield server


@pytest.fixture
def fake_x(xclock: EpochClock) -> Iterator[FakeX]:
    """The fake X by another name, for modules that also run a fake Discord (``fake`` there)."""
    with FakeX(clock=xclock) as server:
        yield server


def make_x(fake: FakeX, queue: Queue, xclock: EpochClock, **cfg: Any) -> XPlatform:
    settings = XConfig(enabled=True, api_base_url=fake.base_url, poll_interval=5.0, **fake.credentials(), **cfg)
    return XPlatform(settings, queue, clock=xclock, sleep=xclock.advance)


@pytest.fixture
def x(fake: FakeX, queue: Queue, xclock: EpochClock) -> Iterator[XPlatform]:
    adapter = make_x(fake, queue, xclock)
    yield adapter
    adapter.client.session.close()


@pytest.fixture
def worker(queue: Queue, x: XPlatform, tmp_path: Path) -> Worker:
    return Worker(queue, LetterGenerator(), {"x": x}, tmp_path / "images", owner="test-worker")


def work(worker: Worker) -> None:
    while worker.generate_batch() or worker.deliver_batch():
        pass


def shown(reply: XTweet) -> str:
    """The reply's text without the "@author " prefix X adds."""
    return reply.text[reply.display_start:]


def one_request(queue: Queue, mention: XTweet):
    [rec] = [r for r in queue.list(platform="x") if r.external_id == mention.id]
    return rec


@BOTH_DATABASES
def test_mention_becomes_exactly_one_threaded_reply_with_the_image(fake: FakeX, x: XPlatform, worker: Worker,
                                                                  queue: Queue) -> None:
    alice, pixel = fake.add_user("alice"), fake.add_user("pixel_fan")
    lamp = fake.add_tweet(pixel, "look at my new lamp")
    mention = fake.add_mention(alice, "@dalle_mini_bot @pixel_fan this lamp as a cathedral https://t.co/abc",
                               reply_to=lamp)

    assert x.poll_once() == 1
    rec = one_request(queue, mention)
    assert rec.status == Status.QUEUED and rec.prompt == "this lamp as a cathedral"
    assert rec.author_id == alice.id and rec.author_name == "alice" and rec.n_images == 4
    assert queue.get_cursor(CURSOR) == mention.id

    work(worker)

    [reply] = fake.replies_to(mention)
    assert reply.author_id == fake.bot.id and reply.conversation_id == lamp.conversation_id
    assert "http" not in reply.text and "cathedral" not in reply.text and f"#{rec.id}" in reply.text
    [key] = reply.media_keys
    media = next(m for m in fake.media.values() if m.media_key == key)
    assert (media.width, media.height) == (128, 128)  # one 2x2 grid of the four 64x64 images
    assert Image.open(io.BytesIO(media.data)).size == (128, 128)
    upload = fake.requests_to("POST /2/media/upload")[0]
    assert upload.auth == f"user:{fake.bot.id}" and upload.headers["authorization"].startswith("OAuth ")
    done = queue.get(rec.id)
    assert done.status == Status.POSTED and done.reply_id == reply.id

    assert x.poll_once() == 0  # nothing new; still one reply
    work(worker)
    assert len(fake.replies_to(mention)) == 1


def test_separate_photos_layout(fake: FakeX, queue: Queue, xclock: EpochClock, tmp_path: Path) -> None:
    x = make_x(fake, queue, xclock, reply_layout="separate", images=3)
    worker = Worker(queue, LetterGenerator(), {"x": x}, tmp_path / "img", owner="w")
    mention = fake.add_mention(fake.add_user("bob"), "three red foxes")
    x.poll_once()
    work(worker)
    [reply] = fake.replies_to(mention)
    assert len(reply.media_keys) == 3


@BOTH_DATABASES
def test_duplicated_and_edited_mention_is_one_request(fake: FakeX, x: XPlatform, worker: Worker,
                                                      queue: Queue) -> None:
    alice = fake.add_user("alice")
    mention = fake.add_mention(alice, "a red fox")
    assert x.poll_once() == 1
    fake.redeliver(mention, times=2)
    assert x.poll_once() == 0
    fake.edit_tweet(mention, "@dalle_mini_bot a red fox, but better")  # a new post id, same edit root
    assert x.poll_once() == 0
    assert len(queue.list(platform="x")) == 1
    work(worker)
    assert len(fake.replies_to(mention)) == 1


@BOTH_DATABASES
def test_a_refusal_lost_in_a_crash_is_sent_after_the_restart_once(fake: FakeX, x: XPlatform, queue: Queue,
                                                                  xclock: EpochClock, clock: FakeClock,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The poller dies after storing a refused mention and before replying: the next poller finds
    the refusal still owed in the queue log and sends it, once; a 429 leaves it owed, not dropped."""
    empty = fake.add_mention(fake.add_user("bob"), "")

    class Crash(BaseException):
        pass

    def crash(*args: object, **kwargs: object) -> None:
        raise Crash

    monkeypatch.setattr(x, "_refuse", crash)
    with pytest.raises(Crash):
        x.poll_once()
    monkeypatch.undo()
    assert one_request(queue, empty).status == Status.REJECTED and fake.replies_to(empty) == []

    restarted = make_x(fake, queue, xclock)
    clock.advance(restarted.lease_seconds + 1)
    fake.inject_rate_limit("POST /2/tweets", count=1, reset_after=30)  # the first try is rate-limited: still owed
    restarted.poll_once()
    assert fake.replies_to(empty) == []
    assert not [a for a in queue.audit() if a.action.startswith("refusal")]
    xclock.advance(31)
    restarted.poll_once()
    [reply] = fake.replies_to(empty)
    assert f"(#{one_request(queue, empty).id})" in shown(reply) and not reply.media_keys
    restarted.poll_once()
    clock.advance(60)
    restarted.poll_once()
    assert len(fake.replies_to(empty)) == 1  # settled: never sent twice
    assert [a.action for a in queue.audit() if a.action.startswith("refusal")] == ["refusal_posted"]
    restarted.client.session.close()


@BOTH_DATABASES
def test_restart_mid_poll_repeats_nothing(fake: FakeX, x: XPlatform, worker: Worker, queue: Queue,
                                          xclock: EpochClock, clock: FakeClock,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    alice, bob = fake.add_user("alice"), fake.add_user("bob")
    good = fake.add_mention(alice, "a lighthouse at dusk")
    empty = fake.add_mention(bob, "")  # refused: gets one refusal reply

    class Crash(BaseException):
        pass

    def crash(*args: object, **kwargs: object) -> None:
        raise Crash  # the process dies after storing the requests, before saving since_id

    monkeypatch.setattr(queue, "set_cursor", crash)
    with pytest.raises(Crash):
        x.poll_once()
    monkeypatch.undo()
    assert queue.get_cursor(CURSOR) is None
    assert len(fake.replies_to(empty)) == 1  # the refusal went out before the crash

    # A new process: it waits for the dead poller's lease to expire, then reads the same mentions.
    restarted = make_x(fake, queue, xclock)
    assert restarted.poll_once() == 0 and fake.requests_to(MENTIONS)[-1:] == fake.requests_to(MENTIONS)[:1]
    clock.advance(restarted.lease_seconds + 1)
    assert restarted.poll_once() == 0  # both mentions were stored already: nothing new
    assert queue.get_cursor(CURSOR) == empty.id
    assert len(queue.list(platform="x")) == 2
    assert len(fake.replies_to(empty)) == 1  # not refused twice

    work(Worker(queue, LetterGenerator(), {"x": restarted}, worker.images_dir, owner="w2"))
    assert len(fake.replies_to(good)) == 1
    assert one_request(queue, good).status == Status.POSTED
    restarted.client.session.close()


@BOTH_DATABASES
def test_only_one_poller_across_processes(fake: FakeX, x: XPlatform, queue: Queue, xclock: EpochClock,
                                          clock: FakeClock) -> None:
    other = make_x(fake, queue, xclock)
    fake.add_mention(fake.add_user("alice"), "a cat")
    assert x.poll_once() == 1
    fake.add_mention(fake.add_user("bob"), "a dog")
    assert other.poll_once() == 0
    assert len(fake.requests_to(MENTIONS)) == 1  # the second process did not even ask
    assert x.poll_once() == 1  # the holder renews its lease
    clock.advance(x.lease_seconds + 1)  # the holder died: the lease expires, the other takes over
    fake.add_mention(fake.add_user("carol"), "a bird")
    assert other.poll_once() == 1
    assert x.poll_once() == 0  # and now the first one stays out
    other.client.session.close()


def test_429_on_mentions_is_waited_out(fake: FakeX, x: XPlatform, queue: Queue, xclock: EpochClock) -> None:
    mention = fake.add_mention(fake.add_user("alice"), "a slow snail")
    fake.inject_rate_limit(MENTIONS, count=1, reset_after=30)
    assert x.poll_once() == 0
    assert x.wait_needed("mentions") > 29
    assert x.poll_once() == 0  # still before the reset: the adapter does not call X at all
    assert [r.status for r in fake.requests_to(MENTIONS)] == [429]
    xclock.advance(31)
    assert x.poll_once() == 1
    assert one_request(queue, mention).status == Status.QUEUED


def test_rate_limit_headers_with_nothing_left_are_honoured(fake: FakeX, queue: Queue, xclock: EpochClock) -> None:
    fake.rate_limits[MENTIONS] = (300, 2)  # the app may read mentions twice per window
    x = make_x(fake, queue, xclock)
    assert x.poll_once() == 0 and x.poll_once() == 0  # the second response says 0 remaining
    assert x.wait_needed("mentions") > 800
    assert x.poll_once() == 0
    assert [r.status for r in fake.requests_to(MENTIONS)] == [200, 200]  # no 429 was spent
    x.client.session.close()


def test_429_on_reply_is_waited_out(fake: FakeX, x: XPlatform, worker: Worker, queue: Queue) -> None:
    mention = fake.add_mention(fake.add_user("alice"), "a patient cat")
    x.poll_once()
    fake.inject_rate_limit("POST /2/tweets", count=1, reset_after=5)
    work(worker)
    assert [r.status for r in fake.requests_to("POST /2/tweets")] == [429, 201]
    assert len(fake.replies_to(mention)) == 1
    assert one_request(queue, mention).status == Status.POSTED


def test_long_rate_limit_hands_the_delivery_back(fake: FakeX, x: XPlatform, worker: Worker, queue: Queue) -> None:
    mention = fake.add_mention(fake.add_user("alice"), "a very patient cat")
    x.poll_once()
    fake.inject_rate_limit("POST /2/media/upload", count=1, reset_after=600)
    work(worker)
    rec = one_request(queue, mention)
    assert rec.status == Status.GENERATED and "rate limit" in (rec.error or "")
    assert (rec.run_at - queue.clock()).total_seconds() >= 590  # comes back after the reset
    assert fake.replies_to(mention) == []


@pytest.mark.parametrize("reply_error", [403, 404])
def test_deleted_or_protected_tweet_fails_without_retry(fake: FakeX, x: XPlatform, worker: Worker, queue: Queue,
                                                        reply_error: int) -> None:
    alice, carol = fake.add_user("alice"), fake.add_user("carol")
    deleted = fake.add_mention(alice, "a castle")
    protected = fake.add_mention(carol, "a forest")
    x.poll_once()
    worker.generate_batch()
    fake.delete_tweet(deleted, reply_error=reply_error)
    fake.protect_user(carol)
    worker.deliver_batch()
    for mention in (deleted, protected):
        rec = one_request(queue, mention)
        assert rec.status == Status.FAILED and rec.attempts == 2  # one generation, one delivery: no retry
    assert len(fake.requests_to("POST /2/tweets")) == 2


@BOTH_DATABASES
def test_refusals_have_their_own_daily_budget(fake: FakeX, queue: Queue, xclock: EpochClock) -> None:
    x = make_x(fake, queue, xclock, daily_refusal_budget=2)
    mentions = [fake.add_mention(fake.add_user(f"spammer{i}"), "") for i in range(4)]
    assert x.poll_once() == 4
    replied = [m for m in mentions if fake.replies_to(m)]
    assert replied == mentions[:2]  # oldest first, then the budget is spent
    for m in mentions:
        assert one_request(queue, m).status == Status.REJECTED
    actions = [a.action for a in queue.audit() if a.action.startswith("refusal")]
    assert actions == ["refusal_posted", "refusal_posted", "refusal_skipped", "refusal_skipped"]
    [reply] = fake.replies_to(mentions[0])
    assert shown(reply).startswith("Please give me something to draw") and "http" not in reply.text
    x.client.session.close()


@BOTH_DATABASES
def test_daily_post_budget(fake: FakeX, queue: Queue, xclock: EpochClock, tmp_path: Path) -> None:
    x = make_x(fake, queue, xclock, daily_post_budget=1)
    worker = Worker(queue, LetterGenerator(), {"x": x}, tmp_path / "img", owner="w")
    first = fake.add_mention(fake.add_user("alice"), "a first cat")
    x.poll_once()
    work(worker)
    assert len(fake.replies_to(first)) == 1
    second = fake.add_mention(fake.add_user("bob"), "a second cat")
    x.poll_once()
    rec = one_request(queue, second)
    assert rec.status == Status.REJECTED and rec.error == texts.DAILY_LIMIT
    [refusal] = fake.replies_to(second)
    assert shown(refusal).startswith(texts.DAILY_LIMIT) and not refusal.media_keys
    x.client.session.close()


def test_banned_and_paused_get_one_friendly_refusal(fake: FakeX, x: XPlatform, queue: Queue) -> None:
    mallory = fake.add_user("mallory")
    queue.set_ban(f"x:{mallory.id}", True, actor="test")
    banned = fake.add_mention(mallory, "a nice picture")
    x.poll_once()
    assert one_request(queue, banned).status == Status.REJECTED
    assert shown(fake.replies_to(banned)[0]).startswith(texts.BANNED)

    Switches(queue).set(INTAKE_PAUSED, True, actor="test")
    paused = fake.add_mention(fake.add_user("alice"), "a cat while paused")
    x.poll_once()
    assert one_request(queue, paused).status == Status.REJECTED
    assert shown(fake.replies_to(paused)[0]).startswith("The bot is paused")


def test_own_posts_retweets_and_thread_replies_are_ignored(fake: FakeX, x: XPlatform, queue: Queue) -> None:
    alice = fake.add_user("alice")
    mention = fake.add_mention(alice, "a cat")
    x.poll_once()
    bot_reply = fake.add_tweet(fake.bot, "@dalle_mini_bot note to self")  # the bot's own post
    thanks = fake.add_tweet(alice, "thanks!", reply_to=fake.add_tweet(fake.bot, "here", reply_to=mention))
    assert fake.bot.id in thanks.mention_ids  # X lists the bot in the reply prefix, so it is a "mention"
    x.poll_once()
    ids = {r.external_id for r in queue.list(platform="x")}
    assert ids == {mention.id} and bot_reply.id not in ids


@BOTH_DATABASES
def test_bad_input_through_x(fake: FakeX, x: XPlatform, worker: Worker, queue: Queue) -> None:
    mentions = {name: fake.add_mention(fake.add_user(f"user{i}"), f"@dalle_mini_bot {text}")
                for i, (name, text) in enumerate(BAD_INPUT)}
    assert x.poll_once() == len(BAD_INPUT)
    work(worker)
    for name, mention in mentions.items():
        rec = one_request(queue, mention)
        replies = fake.replies_to(mention)
        assert len(replies) == 1, name  # exactly one reply: the images or a clear refusal
        assert "http" not in replies[0].text
        if rec.status == Status.REJECTED:
            assert not replies[0].media_keys and shown(replies[0]).startswith(rec.error or "?"), name
        else:
            assert rec.status == Status.POSTED and replies[0].media_keys, name
            assert not any(ch in rec.prompt for ch in "\x00\x1b\u200b\u202e\ufeff"), name
    rejected = {n for n, m in mentions.items() if one_request(queue, m).status == Status.REJECTED}
    assert rejected == {"empty", "only mentions", "over-long", "zero-width only", "emoji only"}
    sql = one_request(queue, mentions["sql"])
    assert sql.prompt == "a cat'); DROP TABLE requests; -- \" OR 1=1"  # stored as text, tables intact
    html = one_request(queue, mentions["html"])
    assert html.prompt_raw.startswith("<script>")


def test_platform_settings_validation_and_secrets_from_the_environment(tmp_path: Path) -> None:
    from bot.config import ConfigError, load_settings, secret_values

    cfg = tmp_path / "c.toml"
    cfg.write_text('[x]\nenabled = true\n')
    with pytest.raises(ConfigError, match=r"x\.enabled in .*c\.toml needs bearer_token"):
        load_settings(cfg, env={})
    env = {f"DALLEBOT_X_{k.upper()}": f"env-{k}" for k in
           ("bearer_token", "consumer_key", "consumer_secret", "access_token", "access_token_secret")}
    s = load_settings(cfg, env={**env, "DALLEBOT_DISCORD_TOKEN": "env-discord"})
    assert s.x.enabled and s.x.access_token == "env-access_token" and s.discord.token == "env-discord"
    assert set(secret_values(s)) == set(env.values()) | {"env-discord"}
    for text, message in [
        ('[discord]\nallowed_channels = ["general"]\n', "discord.allowed_channels"),
        ('[discord]\nguild_ids = [123]\n', r"guild_ids.*expected a string, got int"),
        ('[discord]\nmax_images = 11\n', "discord.max_images"),
        ('[x]\nimages = 9\n', "x.images"),
        ('[x]\nreply_layout = "mosaic"\n', "x.reply_layout"),
        ('[x]\napi_base_url = "127.0.0.1:8081"\n', "x.api_base_url"),
    ]:
        cfg.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_settings(cfg, env={})
    cfg.write_text('[discord]\nallowed_channels = ["1:2", "1:3"]\nmoderator_roles = ["Mods", "Helpers"]\n')
    s = load_settings(cfg, env={})
    assert s.discord.allowed_channels == ("1:2", "1:3") and s.discord.moderator_roles == ("Mods", "Helpers")


def test_open_app_applies_the_prompt_filter_and_rate_limits(fake: FakeX, db_url: str, tmp_path: Path) -> None:
    from bot.app import open_app
    from bot.config import DatabaseConfig, DataConfig, LimitsConfig, SafetyConfig, Settings

    s = Settings(data=DataConfig(dir=str(tmp_path / "data")), database=DatabaseConfig(url=db_url),
                 x=XConfig(enabled=True, api_base_url=fake.base_url, **fake.credentials()),
                 safety=SafetyConfig(deny=("grobble",), use_default_list=False, nsfw_enabled=False),
                 limits=LimitsConfig(user_burst=1))
    app = open_app(s, auto_upgrade=True)
    try:
        x = app.platforms["x"]
        alice = fake.add_user("alice")
        filtered = fake.add_mention(alice, "a grobble in the garden")
        first = fake.add_mention(alice, "a cat in the garden")
        second = fake.add_mention(alice, "a dog in the garden")
        assert x.poll_once() == 3
        assert one_request(app.queue, first).status == Status.QUEUED
        for mention in (filtered, second):  # refused by the filter, then by the burst limit
            rec = one_request(app.queue, mention)
            [reply] = fake.replies_to(mention)
            assert rec.status == Status.REJECTED and shown(reply).startswith(rec.error or "?")
        assert "try again in" in (one_request(app.queue, second).error or "")
        x.client.session.close()
    finally:
        app.close()


def test_moderator_rejection_is_replied_within_the_refusal_budget(fake: FakeX, queue: Queue,
                                                                  xclock: EpochClock) -> None:
    from bot import moderation

    x = make_x(fake, queue, xclock, daily_refusal_budget=1)
    first = fake.add_mention(fake.add_user("alice"), "a questionable picture")
    second = fake.add_mention(fake.add_user("bob"), "another questionable picture")
    x.poll_once()
    for mention in (first, second):
        moderation.act(queue, "reject", one_request(queue, mention).id, actor="moderator:test", reason="Not this one.",
                       platforms={"x": x})
    [reply] = fake.replies_to(first)
    assert shown(reply).startswith("Not this one. (#") and not reply.media_keys
    assert fake.replies_to(second) == []  # over the refusal budget: recorded, not posted
    actions = [a.action for a in queue.audit() if a.action.startswith("refusal")]
    assert actions == ["refusal_posted", "refusal_failed"]
    x.client.session.close()


def _limited_x(fake: FakeX, queue: Queue, xclock: EpochClock, **limits: Any) -> XPlatform:
    from bot.config import LimitsConfig
    from bot.ratelimit import RateLimiter
    from storage.limits import LimitCounts

    settings = XConfig(enabled=True, api_base_url=fake.base_url, poll_interval=5.0, **fake.credentials())
    limiter = RateLimiter(LimitCounts(queue.db), LimitsConfig(**limits), clock=queue.clock)
    return XPlatform(settings, queue, checks=[limiter], clock=xclock, sleep=xclock.advance)


@BOTH_DATABASES
def test_an_edited_or_redelivered_mention_does_not_count_against_the_limits(fake: FakeX, queue: Queue,
                                                                            xclock: EpochClock) -> None:
    """Mentions stored before (an edit with the same root, a redelivery) are left out of the rate
    limits: a new mention arriving with them is judged on what is really stored."""
    x = _limited_x(fake, queue, xclock, user_burst=2, user_burst_seconds=600, user_hourly=0)
    alice = fake.add_user("alice")
    first = fake.add_mention(alice, "a red fox")
    assert x.poll_once() == 1
    fake.edit_tweet(first, "@dalle_mini_bot a red fox, but better")
    fake.redeliver(first)
    second = fake.add_mention(alice, "a blue fox")
    assert x.poll_once() == 1
    assert one_request(queue, second).status == Status.QUEUED and fake.replies_to(second) == []
    assert len(queue.list(platform="x")) == 2
    third = fake.add_mention(alice, "a green fox")  # now alice really has 2 requests in the window
    assert x.poll_once() == 1
    assert one_request(queue, third).status == Status.REJECTED
    assert "try again in" in shown(fake.replies_to(third)[0])
    x.client.session.close()


def test_a_hung_x_fails_the_try_instead_of_blocking_the_delivery(fake: FakeX, queue: Queue, xclock: EpochClock,
                                                                  tmp_path: Path) -> None:
    """tweepy sets no timeout: the adapter's session does, so a reply X never answers is given up
    (and retried) instead of holding the delivery thread while its lease is renewed forever. X acting
    late on the abandoned call refuses it as a duplicate: one reply."""
    settings = XConfig(enabled=True, api_base_url=fake.base_url, poll_interval=5.0, **fake.credentials())
    x = XPlatform(settings, queue, clock=xclock, sleep=xclock.advance, http_timeout=(5.0, 0.5))
    naps: list[float] = []
    worker = Worker(queue, LetterGenerator(), {"x": x}, tmp_path / "img", owner="w", sleep=naps.append)
    mention = fake.add_mention(fake.add_user("alice"), "a sleepy sloth")
    x.poll_once()
    worker.generate_batch()
    hang = fake.inject_hang("POST /2/tweets", seconds=30)
    started = time.monotonic()
    assert worker.deliver_batch() == 1
    assert time.monotonic() - started < 15  # not the 30 s the server held the first try
    assert hang.held == 1 and len(naps) == 1  # the first try timed out; the worker retried once
    [reply] = fake.replies_to(mention)
    rec = one_request(queue, mention)
    assert rec.status == Status.POSTED and rec.reply_id == reply.id and x.posts.used() == 1
    hang.release()
    late = fake.wait_for(lambda f: [r for r in f.requests_to("POST /2/tweets") if r.status == 403])
    assert "duplicate content" in late[0].response["detail"]
    assert len(fake.replies_to(mention)) == 1
    x.client.session.close()


@BOTH_DATABASES
@pytest.mark.parametrize("failure", ["server error", "timeout"])
def test_a_refusal_hit_by_a_passing_x_failure_stays_owed(fake: FakeX, queue: Queue, xclock: EpochClock,
                                                         clock: FakeClock, failure: str) -> None:
    """A 5xx or a connection/timeout error on a refusal is not its outcome: nothing is recorded, the
    budget slot is given back, and the refusal goes out at a later round, once."""
    settings = XConfig(enabled=True, api_base_url=fake.base_url, poll_interval=5.0, daily_refusal_budget=1,
                       **fake.credentials())
    x = XPlatform(settings, queue, clock=xclock, sleep=xclock.advance, http_timeout=(5.0, 0.5))
    empty = fake.add_mention(fake.add_user("bob"), "")
    if failure == "server error":
        fake.inject_server_error("POST /2/tweets", status=503, count=1)
    else:
        hang = fake.inject_hang("POST /2/tweets", seconds=30)
    assert x.poll_once() == 1
    assert one_request(queue, empty).status == Status.REJECTED
    assert not [a for a in queue.audit() if a.action.startswith("refusal")]  # still owed
    assert x.refusals.used() == 0  # the slot is given back
    if failure == "timeout":
        assert hang.held == 1
    clock.advance(x.lease_seconds + 1)
    x.poll_once()
    [reply] = fake.replies_to(empty)
    assert shown(reply).startswith("Please give me something to draw")
    assert [a.action for a in queue.audit() if a.action.startswith("refusal")] == ["refusal_posted"]
    assert x.refusals.used() == 1
    clock.advance(60)
    x.poll_once()
    assert len(fake.replies_to(empty)) == 1
    x.client.session.close()


def test_a_moderator_refusal_that_fails_gives_its_budget_back(fake: FakeX, queue: Queue, xclock: EpochClock) -> None:
    from bot import moderation

    x = make_x(fake, queue, xclock, daily_refusal_budget=1)
    first = fake.add_mention(fake.add_user("alice"), "a questionable picture")
    second = fake.add_mention(fake.add_user("bob"), "another questionable picture")
    x.poll_once()
    fake.inject_server_error("POST /2/tweets", status=503, count=1)
    moderation.act(queue, "reject", one_request(queue, first).id, actor="moderator:test", reason="Not this one.",
                   platforms={"x": x})
    assert fake.replies_to(first) == [] and x.refusals.used() == 0
    moderation.act(queue, "reject", one_request(queue, second).id, actor="moderator:test", reason="Nor this.",
                   platforms={"x": x})
    [reply] = fake.replies_to(second)  # the budget of one was not spent by the failed try
    assert shown(reply).startswith("Nor this. (#")
    # the failed try recorded nothing: still owed, and the poller's sweep settles it (budget now spent)
    assert [a.action for a in queue.audit() if a.action.startswith("refusal")] == ["refusal_posted"]
    queue.clock.advance(x.lease_seconds + 1)  # type: ignore[attr-defined]
    x.poll_once()
    assert [(a.request_id, a.action) for a in queue.audit() if a.action.startswith("refusal")] == [
        (one_request(queue, second).id, "refusal_posted"), (one_request(queue, first).id, "refusal_skipped")]
    x.client.session.close()


@BOTH_DATABASES
def test_a_rejection_from_the_cli_is_replied_by_the_poller(fake: FakeX, x: XPlatform, queue: Queue,
                                                          clock: FakeClock) -> None:
    """A request held for review for hours, then rejected where no X client runs (the CLI, the
    dashboard): the poller owes its author a refusal and sends it, once."""
    from bot import moderation

    mention = fake.add_mention(fake.add_user("alice"), "a questionable picture")
    x.poll_once()
    rid = one_request(queue, mention).id
    queue.hold(rid, actor="moderator:test", reason="look at it")
    clock.advance(5 * 3600)
    moderation.act(queue, "reject", rid, actor="moderator:cli", reason="Not this one.")
    x.poll_once()
    assert fake.replies_to(mention) == []  # not before a lease has passed (a live sender is not raced)
    clock.advance(x.lease_seconds + 61)
    x.poll_once()
    [reply] = fake.replies_to(mention)
    assert shown(reply).startswith("Not this one. (#")
    clock.advance(120)
    x.poll_once()
    assert len(fake.replies_to(mention)) == 1


def test_a_429_without_reset_after_an_expired_block_backs_off(fake: FakeX, x: XPlatform, queue: Queue,
                                                             xclock: EpochClock) -> None:
    """An old, expired rate-limit block does not stand in for the minute's backoff of a new 429
    that says nothing about its reset."""
    fake.inject_rate_limit(MENTIONS, count=1, reset_after=30)
    assert x.poll_once() == 0
    xclock.advance(31)  # that block is over (its entry stays)
    fake.inject_rate_limit(MENTIONS, count=1, rate_headers=False)
    assert x.poll_once() == 0
    assert 59 < x.wait_needed("mentions") <= 60
    assert x.poll_once() == 0  # not called again before the minute is over
    limited = fake.requests_to(MENTIONS)
    assert [r.status for r in limited] == [429, 429]
    assert "x-rate-limit-reset" in limited[0].response_headers
    assert not any(h.startswith("x-rate-limit") for h in limited[1].response_headers)  # no reset was sent
    xclock.advance(61)
    mention = fake.add_mention(fake.add_user("alice"), "a patient snail")
    assert x.poll_once() == 1
    assert one_request(queue, mention).status == Status.QUEUED


@pytest.mark.parametrize("failure", ["server error", "rate limit", "timeout"])
async def test_start_survives_x_failing_to_name_the_bot(fake: FakeX, queue: Queue, xclock: EpochClock,
                                                        caplog: pytest.LogCaptureFixture, failure: str) -> None:
    """Without bot_user_id/bot_username configured, start() looks the bot up; X failing there is
    logged, not raised (it would stop the whole service, other platforms too): polling retries it."""
    settings = XConfig(enabled=True, api_base_url=fake.base_url, poll_interval=5.0, **fake.credentials())
    x = XPlatform(settings, queue, clock=xclock, sleep=xclock.advance, http_timeout=(5.0, 0.5))
    if failure == "server error":
        fake.inject_server_error("GET /2/users/me", status=503, count=1)
    elif failure == "rate limit":
        fake.inject_rate_limit("GET /2/users/me", count=1, reset_after=600)
    else:
        fake.inject_hang("GET /2/users/me", seconds=30)
    with caplog.at_level("WARNING", logger="bot.platforms.x"):
        await x.start(intake=True)
    assert "cannot look up the bot account" in caplog.text
    assert len(fake.requests_to("GET /2/users/me")) == (0 if failure == "timeout" else 1)
    mention = fake.add_mention(fake.add_user("alice"), "a resilient robot")
    assert x.poll_once() == 1  # the poller looks the bot up again
    assert one_request(queue, mention).status == Status.QUEUED
    await x.stop()
