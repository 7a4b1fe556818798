"""X adapter fixes found in review: each test failed before its fix. The real tweepy Client against
the fake X, the real queue."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.config import XConfig
from bot.fakes.x_server import FakeX
from bot.platforms.x import CURSOR, XPlatform
from bot.worker import Worker
from storage.queue import Queue
from storage.states import Status
from tests.conftest import FakeClock
from tests.e2e.adapter_support import LetterGenerator
from tests.e2e.test_x_adapter import (EpochClock, fake, make_x, one_request, shown, work,  # noqa: F401
                                      x, xclock)  # fake, x, xclock: fixtures

def test_a_mention_x_lists_late_is_still_read(fake: FakeX, x: XPlatform, queue: Queue, xclock: EpochClock,
                                              tmp_path: Path) -> None:
    """X can list a mention after newer ones (indexing lag): its id is then older than the cursor.
    It was never read (the author got no reply); each round now reads a minute before the cursor,
    and what it reads again is neither stored nor refused a second time."""
    alice, bob = fake.add_user("alice"), fake.add_user("bob")
    fake.add_mention(alice, "an early bird")
    assert x.poll_once() == 1  # the cursor is set
    xclock.advance(10)
    late = fake.add_mention(alice, "a lighthouse at dusk", hidden=True)  # not listed yet
    xclock.advance(3)
    empty = fake.add_mention(bob, "")  # refused: one reply
    xclock.advance(3)
    newer = fake.add_mention(bob, "a fox in the snow")
    assert x.poll_once() == 2
    assert int(queue.get_cursor(CURSOR) or 0) == int(newer.id) > int(late.id)
    fake.reveal(late)  # X lists it now, behind the cursor
    xclock.advance(5)
    assert x.poll_once() == 1
    assert one_request(queue, late).status == Status.QUEUED
    for _ in range(3):
        xclock.advance(5)
        assert x.poll_once() == 0
    assert len(queue.list(platform="x")) == 4
    assert queue.get_cursor(CURSOR) == newer.id  # never moved back
    work(Worker(queue, LetterGenerator(), {"x": x}, tmp_path / "img", owner="w"))
    for mention in (late, newer, empty):
        assert len(fake.replies_to(mention)) == 1
    assert shown(fake.replies_to(late)[0]).startswith("Here are your 4 images")


def test_a_reply_posted_before_a_crash_is_found_behind_a_page_of_newer_posts(fake: FakeX, x: XPlatform,
                                                                           queue: Queue, tmp_path: Path) -> None:
    """A worker posted the reply and died before recording it; by the retry the busy bot had posted
    over 100 more. X refuses the repeat as duplicate content and the reply is looked for in the bot's
    posts: it was only looked for in the first page, so a request its author had the images for
    ended failed ("refused as duplicate content")."""
    mention = fake.add_mention(fake.add_user("alice"), "a crowded harbour")
    x.poll_once()
    worker = Worker(queue, LetterGenerator(), {"x": x}, tmp_path / "img", owner="w")
    worker.generate_batch()
    rec = one_request(queue, mention)
    posted = x.deliver(rec, [Path(p) for p in rec.image_paths])  # the worker dies here
    for i in range(120):  # other requests answered meanwhile
        other = fake.add_mention(fake.add_user(f"user{i}"), f"a picture {i}")
        fake.add_tweet(fake.bot, f"Here is your image! (#x{i})", reply_to=other).media_keys = ["3_1"]
    assert worker.deliver_batch() == 1
    done = one_request(queue, mention)
    assert done.status == Status.POSTED and done.reply_id == posted.reply_id
    assert len(fake.replies_to(mention)) == 1


@pytest.mark.parametrize("handle", ["@dalle_mini_bot", " @dalle_mini_bot "])
def test_a_configured_handle_written_with_its_at_sign_still_finds_the_mentions(
        fake: FakeX, queue: Queue, xclock: EpochClock, tmp_path: Path, handle: str) -> None:
    """bot_username = "@dalle_mini_bot" (as people write a handle) made every mention look like one that
    names the bot only in a reply prefix: all were skipped, with no error, and nobody got an answer
    (mentions are now recognised by the account id too); the reply links read x.com/@dalle_mini_bot/."""
    x = make_x(fake, queue, xclock, bot_user_id=fake.bot.id, bot_username=handle)
    mention = fake.add_mention(fake.add_user("alice"), "a cat in a hat")
    assert x.poll_once() == 1
    work(Worker(queue, LetterGenerator(), {"x": x}, tmp_path / "img", owner="w"))
    rec = one_request(queue, mention)
    assert rec.status == Status.POSTED
    assert rec.reply_url == f"https://x.com/dalle_mini_bot/status/{rec.reply_id}"
    x.client.session.close()


def test_mentions_of_an_unknown_bot_user_id_are_a_clear_warning(fake: FakeX, queue: Queue, xclock: EpochClock,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """X answers 200 with only ``errors`` (a partial error) for a user id it does not know: a wrong
    bot_user_id polled nothing, for ever, without a word in the log."""
    x = make_x(fake, queue, xclock, bot_user_id="1234567", bot_username="dalle_mini_bot")
    fake.add_mention(fake.add_user("alice"), "a cat in a hat")
    with caplog.at_level("WARNING", logger="bot.platforms.x"):
        assert x.poll_once() == 0
    [line] = [r.getMessage() for r in caplog.records if r.name == "bot.platforms.x"]
    assert line == "X: cannot read the mentions of user 1234567: Could not find user with id: [1234567]."
    assert queue.get_cursor(CURSOR) is None
    x.client.session.close()


def test_the_apps_spent_day_of_posts_is_waited_out_to_its_reset(queue: Queue, xclock: EpochClock,
                                                               tmp_path: Path) -> None:
    """X's 24-hour limit on posts has an app-wide window too (``x-app-limit-24hour-*``). When it was
    spent the adapter only knew the 15-minute window's reset: every request came back each quarter
    hour all day, uploading its images and spending a 429 each time."""
    with FakeX(clock=xclock, daily_limits={"POST /2/tweets": (None, 2)}) as fake:
        x = make_x(fake, queue, xclock)
        worker = Worker(queue, LetterGenerator(), {"x": x}, tmp_path / "img", owner="w")
        mentions = [fake.add_mention(fake.add_user(f"user{i}"), f"a small boat {i}") for i in range(3)]
        x.poll_once()
        work(worker)
        assert [len(fake.replies_to(m)) for m in mentions] == [1, 1, 0]
        last = one_request(queue, mentions[2])
        assert last.status == Status.GENERATED and "rate limit on post" in (last.error or "")
        assert (last.run_at - queue.clock()).total_seconds() > 23 * 3600  # after the day's reset
        assert [r.status for r in fake.requests_to("POST /2/tweets")] == [201, 201]  # no 429 spent
        assert len(fake.requests_to("POST /2/media/upload")) == 2  # nor an upload
        x.client.session.close()


def test_no_images_are_uploaded_for_a_reply_that_cannot_be_posted_yet(fake: FakeX, x: XPlatform, queue: Queue,
                                                                     tmp_path: Path) -> None:
    """Posting rate-limited for longer than a delivery waits: each request of the batch still
    uploaded its images (spending the upload limit, media X then drops) before finding out."""
    mentions = [fake.add_mention(fake.add_user(f"user{i}"), f"a quiet pond {i}") for i in range(3)]
    x.poll_once()
    fake.inject_rate_limit("POST /2/tweets", count=1, reset_after=600)
    work(Worker(queue, LetterGenerator(), {"x": x}, tmp_path / "img", owner="w"))
    for m in mentions:
        rec = one_request(queue, m)
        assert rec.status == Status.GENERATED and (rec.run_at - queue.clock()).total_seconds() >= 590
    assert len(fake.requests_to("POST /2/tweets")) == 1
    assert len(fake.requests_to("POST /2/media/upload")) == 1  # only the first, before the 429 said so
    assert x.posts.used() == 0


def test_a_mention_edited_before_it_was_read_is_drawn_as_edited(fake: FakeX, x: XPlatform, queue: Queue,
                                                                xclock: EpochClock, tmp_path: Path) -> None:
    """A typo fixed within seconds: both versions are listed in the same round, and the first one
    (the typo) became the request; the reply went to the outdated post. One request per edit chain,
    the newest version's prompt, the reply to the newest version."""
    fake.add_mention(fake.add_user("zed"), "an early bird")
    x.poll_once()
    alice = fake.add_user("alice")
    typo = fake.add_mention(alice, "a red foz")
    xclock.advance(5)
    fixed = fake.edit_tweet(typo, "@dalle_mini_bot a red fox")
    xclock.advance(5)
    assert x.poll_once() == 1
    [rec] = [r for r in queue.list(platform="x") if r.author_id == alice.id]
    assert rec.prompt == "a red fox" and rec.external_id == typo.id and rec.options["reply_to"] == fixed.id
    work(Worker(queue, LetterGenerator(), {"x": x}, tmp_path / "img", owner="w"))
    assert fake.replies_to(typo) == [] and len(fake.replies_to(fixed)) == 1
    fake.edit_tweet(fixed, "@dalle_mini_bot a red fox, again")  # a later edit is the same request
    xclock.advance(5)
    assert x.poll_once() == 0


def test_a_reply_x_made_without_answering_is_found_once_x_lists_it(fake: FakeX, queue: Queue, xclock: EpochClock,
                                                                   tmp_path: Path) -> None:
    """X acts on a reply it never answered (the try timed out); the retry is refused as duplicate
    content, and the reply is not among the bot's listed posts yet (indexing lag). That ended the
    request failed for good, though its author had the images; now it is looked for again."""
    settings = XConfig(enabled=True, api_base_url=fake.base_url, poll_interval=5.0, **fake.credentials())
    x = XPlatform(settings, queue, clock=xclock, sleep=xclock.advance, http_timeout=(5.0, 0.5))
    mention = fake.add_mention(fake.add_user("alice"), "a slow tortoise")
    x.poll_once()
    naps: list[float] = []

    def nap(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 1:  # X acts on the try it held, too late: the reply is made, not listed yet
            hang.release()
            fake.wait_for(lambda f: f.replies_to(mention))
        else:
            fake.reveal(fake.replies_to(mention)[0])

    worker = Worker(queue, LetterGenerator(), {"x": x}, tmp_path / "img", owner="w", sleep=nap)
    worker.generate_batch()
    fake.hide_new_posts = True
    hang = fake.inject_hang("POST /2/tweets", seconds=30)
    assert worker.deliver_batch() == 1
    [reply] = fake.replies_to(mention)
    rec = one_request(queue, mention)
    assert rec.status == Status.POSTED and rec.reply_id == reply.id
    assert [r.status for r in fake.requests_to("POST /2/tweets")] == [201, 403, 403]
    assert x.posts.used() == 1
    x.client.session.close()


def test_mentions_of_a_renamed_bot_account_are_still_requests(fake: FakeX, queue: Queue, xclock: EpochClock,
                                                              tmp_path: Path) -> None:
    """The bot account was renamed (or its handle misspelt in the settings): every mention was taken
    for one naming the bot only in a reply prefix and skipped, silently. X's mention entities carry
    the account id; a reply prefix still does not count."""
    x = make_x(fake, queue, xclock, bot_user_id=fake.bot.id, bot_username="dalle_mini_bot_old")
    alice = fake.add_user("alice")
    mention = fake.add_mention(alice, "a cat in a hat")
    assert x.poll_once() == 1
    work(Worker(queue, LetterGenerator(), {"x": x}, tmp_path / "img", owner="w"))
    assert one_request(queue, mention).status == Status.POSTED
    [reply] = fake.replies_to(mention)
    fake.add_tweet(alice, "thanks!", reply_to=reply)  # names the bot only in X's reply prefix
    assert x.poll_once() == 0
    assert len(queue.list(platform="x")) == 1
    x.client.session.close()


def test_the_bots_handle_at_the_end_or_inside_a_prompt_is_not_drawn(fake: FakeX, x: XPlatform,
                                                                    queue: Queue) -> None:
    """"a red fox in the snow @dalle_mini_bot" (the bot named last, as many write it) kept the handle
    in the prompt: the model got it as words, and it counted against the length limit."""
    alice, bob = fake.add_user("alice"), fake.add_user("bob")
    last = fake.add_tweet(alice, "a red fox in the snow @dalle_mini_bot")
    inside = fake.add_tweet(bob, "hey @DALLE_mini_bot draw a lighthouse")
    only = fake.add_tweet(bob, "@alice @dalle_mini_bot")
    assert x.poll_once() == 3
    assert one_request(queue, last).prompt == "a red fox in the snow"
    assert one_request(queue, inside).prompt == "hey draw a lighthouse"
    assert one_request(queue, only).status == Status.REJECTED  # nothing to draw: one refusal
    assert shown(fake.replies_to(only)[0]).startswith("Please give me something to draw")


def test_a_refusal_x_made_without_answering_is_recorded_as_sent(fake: FakeX, queue: Queue, xclock: EpochClock,
                                                                clock: FakeClock) -> None:
    """A refusal whose try timed out stays owed; X had made it all the same, so the later sweep is
    refused as duplicate content. That was recorded as 'refusal_failed' (the queue log said the
    requester was not told, and the day's refusal budget did not count it)."""
    settings = XConfig(enabled=True, api_base_url=fake.base_url, poll_interval=5.0, **fake.credentials())
    x = XPlatform(settings, queue, clock=xclock, sleep=xclock.advance, http_timeout=(5.0, 0.5))
    empty = fake.add_mention(fake.add_user("bob"), "")
    hang = fake.inject_hang("POST /2/tweets", seconds=30)
    assert x.poll_once() == 1
    assert hang.held == 1 and x.refusals.used() == 0  # timed out: still owed
    hang.release()
    fake.wait_for(lambda f: f.replies_to(empty))  # X acts on it late
    clock.advance(x.lease_seconds + 1)
    x.poll_once()  # the sweep sends it again
    assert [r.status for r in fake.requests_to("POST /2/tweets")] == [201, 403]
    assert len(fake.replies_to(empty)) == 1
    assert [a.action for a in queue.audit() if a.action.startswith("refusal")] == ["refusal_posted"]
    assert x.refusals.used() == 1
    x.client.session.close()
