"""Discord adapter faults found in review: the real discord.py client (the adapter's own) against the
fake Discord, the real queue (SQLite, and PostgreSQL where a lock is needed) and the real worker."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from bot.fakes.discord_server import FakeDiscord, FakeInteraction
from bot.platforms import text as texts
from bot.platforms.discord import DiscordPlatform
from bot.worker import Worker
from storage.errors import DatabaseUnavailable
from storage.queue import Queue
from storage.states import Status
from tests.e2e.adapter_support import LetterGenerator
from tests.e2e.test_discord_adapter import (  # noqa: F401  (fixtures)
    EDIT_ORIGINAL,
    TIMEOUT,
    _mod,
    adapter,
    answered,
    dalle,
    db_url,
    fake,
    responded,
    stored,
    work,
    worker,
)

ON_POSTGRES = pytest.mark.parametrize("db_url", ["postgres"], indirect=True)


@contextlib.contextmanager
def requests_table_locked(queue: Queue, seconds: float) -> Iterator[None]:
    """Another session holds the requests table (ACCESS EXCLUSIVE, as a schema upgrade or VACUUM FULL
    does) for ``seconds``: every read of it waits that long. The lock is held when the block starts."""
    held = threading.Event()

    def hold() -> None:
        with queue.db.write.begin() as conn:
            conn.execute(sa.text("LOCK TABLE requests IN ACCESS EXCLUSIVE MODE"))
            held.set()
            time.sleep(seconds)

    thread = threading.Thread(target=hold, name="table-lock", daemon=True)
    thread.start()
    assert held.wait(10), "could not lock the requests table"
    try:
        yield
    finally:
        thread.join(seconds + 10)


def acknowledged_in_time(inter: FakeInteraction) -> bool:
    return bool(inter.callbacks) and not inter.missed_deadline


@ON_POSTGRES
async def test_clicks_and_commands_are_acknowledged_while_the_database_is_slow(
        fake: FakeDiscord, adapter: DiscordPlatform, worker: Worker, queue: Queue) -> None:
    """Discord drops an interaction not acknowledged within 3 s ("The application did not respond").
    Re-roll, /dalle-status and /dalle-mod queue read the queue first and answered after, so a database
    that took longer than that (a lock, a busy server) lost the click or command; they acknowledge
    first and answer once the database does."""
    mason, alice = fake.add_user("mason"), fake.add_user("alice")
    inter = await dalle(fake, mason, prompt="a red fox", seed=5)
    await work(worker)
    original = stored(queue, inter)
    dora = fake.add_user("dora")
    waiting = stored(queue, await dalle(fake, dora, prompt="a waiting whale"))
    moderator = fake.add_user("mod", roles=[fake.moderator_role])

    with requests_table_locked(queue, 4.0):
        click = await fake.send_component(inter.original, f"dallebot:reroll:{original.id}", user=alice)
        status = await fake.send_slash_command("dalle-status", {}, user=fake.add_user("carol"))
        listing = asyncio.create_task(_mod(fake, moderator, "queue"))
        await asyncio.sleep(3.2)  # past Discord's 3 seconds, the table still locked
        assert acknowledged_in_time(click) and acknowledged_in_time(status)

    await responded(fake, click)
    assert click.original.content.startswith("Queued") and not click.original.ephemeral
    again = stored(queue, click)
    assert again.options["reroll_of"] == original.id and again.author_id == alice.id and again.seed != 5
    message = await answered(fake, status)
    assert message.ephemeral and message.content.startswith("Queue: ") and "being drawn" in message.content
    listed = await asyncio.wait_for(listing, TIMEOUT)
    assert listed.ephemeral and f"#{waiting.id} queued discord:{dora.id}" in listed.content


async def test_a_private_result_is_rerolled_privately(fake: FakeDiscord, adapter: DiscordPlatform, worker: Worker,
                                                      queue: Queue) -> None:
    """The Re-roll of an ephemeral (private) result is deferred ephemerally, before any database read."""
    bob = fake.add_user("bob")
    inter = await dalle(fake, bob, prompt="a secret garden", private=True)
    await work(worker)
    assert inter.original.ephemeral and len(inter.original.attachments) == 4
    click = await fake.send_component(inter.original, f"dallebot:reroll:{stored(queue, inter).id}", user=bob)
    message = await responded(fake, click)
    assert click.callbacks == [{"type": 5, "data": {"flags": 64}}]
    assert message.ephemeral and message.content.startswith("Queued")
    assert stored(queue, click).options["private"] is True


async def test_a_database_outage_is_answered_on_buttons_and_commands(
        fake: FakeDiscord, adapter: DiscordPlatform, worker: Worker, queue: Queue,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With the database down, a Re-roll click, /dalle-status and a moderator's /dalle-mod commands
    say so, instead of leaving Discord's "thinking…" (or "did not respond") for ever."""
    mason = fake.add_user("mason")
    inter = await dalle(fake, mason, prompt="a red fox")
    await work(worker)
    rid = stored(queue, inter).id
    waiting = await dalle(fake, mason, prompt="a blue fox")  # queued, with its Cancel button
    moderator = fake.add_user("mod", roles=[fake.moderator_role])

    def down(*args: Any, **kwargs: Any) -> Any:
        raise DatabaseUnavailable("the database is not answering")

    ids = {waiting.id: stored(queue, waiting).id}

    def stored_id(i: FakeInteraction) -> int:
        return ids[i.id]

    for name in ("get", "stats", "list", "approve", "reject", "set_ban"):
        monkeypatch.setattr(queue, name, down)

    click = await fake.send_component(inter.original, f"dallebot:reroll:{rid}", user=fake.add_user("alice"))
    assert (await responded(fake, click)).content == texts.QUEUE_UNAVAILABLE
    status = await fake.send_slash_command("dalle-status", {}, user=fake.add_user("carol"))
    assert (await answered(fake, status)).content == texts.QUEUE_UNAVAILABLE
    for sub, options in (("queue", []), ("approve", [{"type": 4, "name": "request_id", "value": rid}]),
                         ("reject", [{"type": 4, "name": "request_id", "value": rid}])):
        answer = await _mod(fake, moderator, sub, options)
        assert answer.ephemeral and answer.content == texts.QUEUE_UNAVAILABLE, sub
    member = fake.guild.members[mason.id]
    resolved = {"users": {mason.id: mason.payload()},
                "members": {mason.id: {k: v for k, v in member.payload().items() if k != "user"}}}
    banned = await _mod(fake, moderator, "ban", [{"type": 6, "name": "user", "value": mason.id}], resolved)
    assert banned.ephemeral and banned.content == texts.QUEUE_UNAVAILABLE
    cancel = await fake.send_component(waiting.original, f"dallebot:cancel:{stored_id(waiting)}", user=mason)
    told = await fake.wait_for(lambda f: cancel.callbacks and cancel.original is not waiting.original
                               and cancel.original, TIMEOUT)
    assert told.ephemeral and told.content == texts.QUEUE_UNAVAILABLE
    assert waiting.original.content.startswith("Queued")  # the queued message is left as it was
    monkeypatch.undo()
    assert stored(queue, inter).status == Status.POSTED and stored(queue, waiting).status == Status.QUEUED


async def test_a_result_discord_refuses_leaves_no_stale_message(fake: FakeDiscord, adapter: DiscordPlatform,
                                                                worker: Worker, queue: Queue) -> None:
    """Discord refuses the result for good (here: the images are over the interaction's upload limit,
    413): the request fails, and its message says so at the next update instead of "Sending the
    images…" for ever (the entry that follows it is then dropped)."""
    inter = await dalle(fake, fake.add_user("mason"), prompt="a huge painting")
    rid = stored(queue, inter).id
    fake.attachment_size_limit = 100  # bytes: every image is larger
    await work(worker)
    assert queue.get(rid).status == Status.FAILED and "413" in (queue.get(rid).error or "")
    await adapter.update_positions()
    assert inter.original.content == texts.discord_status_line("failed", None, None)
    assert inter.original.custom_ids == [] and inter.original.attachments == []
    assert rid not in adapter.tracked


async def test_messages_whose_token_ran_out_are_no_longer_followed(fake: FakeDiscord, adapter: DiscordPlatform,
                                                                   queue: Queue) -> None:
    """A request's interaction token lasts 15 minutes; after that its message can no longer be
    edited, so the entry that follows it is dropped (they piled up for every request that took
    longer, a leak in the long-running intake process). Delivery then goes to the channel."""
    inter = await fake.send_slash_command("dalle", {"prompt": "a slow snail"}, user=fake.add_user("mason"),
                                          age=15 * 60 - 2.0)  # its token has 2 s left
    await answered(fake, inter)
    rid = stored(queue, inter).id
    assert rid in adapter.tracked
    await asyncio.sleep(2.5)
    await adapter.update_positions()
    assert rid not in adapter.tracked


async def test_a_429_without_retry_after_backs_off_a_minute(fake: FakeDiscord, adapter: DiscordPlatform,
                                                            queue: Queue, clock: Any, tmp_path: Path) -> None:
    """A 429 that discord.py does not wait out itself (Cloudflare's HTML ban page, without Discord's
    Via header and JSON body) was retried within a second or two, which prolongs such a ban; the
    delivery now waits a minute (or the Retry-After it gives), here by going back to the queue."""
    inter = await dalle(fake, fake.add_user("mason"), prompt="a banned bee")
    sleeps: list[float] = []
    w = Worker(queue, LetterGenerator(), {"discord": adapter}, tmp_path / "img", owner="w", sleep=sleeps.append,
               delivery_retry_seconds=30)
    assert await asyncio.to_thread(w.generate_batch) == 1
    before = len(fake.requests_to(EDIT_ORIGINAL))
    fake.inject_rate_limit(EDIT_ORIGINAL, via=False)
    assert await asyncio.wait_for(asyncio.to_thread(w.deliver_batch), 30) == 1
    assert [r.status for r in fake.requests_to(EDIT_ORIGINAL)[before:]] == [429]  # not asked again at once
    rec = stored(queue, inter)
    assert rec.status == Status.GENERATED and sleeps == []
    assert (rec.run_at - clock()).total_seconds() >= 59
    clock.advance(61)
    assert await asyncio.wait_for(asyncio.to_thread(w.deliver_batch), 30) == 1
    assert stored(queue, inter).status == Status.POSTED and len(inter.original.attachments) == 4


async def test_a_client_that_gives_up_says_so(fake: FakeDiscord, adapter: DiscordPlatform,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """discord.py gives up for good on some gateway closes (4004: the token was reset, as Discord
    does to a token found leaked). /dalle then goes unanswered: that is an error in the log, where
    the client task used to end without a word until the service stopped."""
    await fake.wait_until_identified(TIMEOUT)
    fake.token = "a-reset-token"  # the bot's token is no longer valid
    with caplog.at_level("ERROR", logger="bot.platforms.discord"):
        await fake.force_reconnect()  # RESUME refused, IDENTIFY refused: close 4004
        for _ in range(100):
            if adapter._task is not None and adapter._task.done():
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0)  # the task's done callbacks run
    [record] = [r for r in caplog.records if r.name == "bot.platforms.discord" and r.levelname == "ERROR"]
    assert "Discord client stopped" in record.getMessage() and "4004" in record.getMessage()


@ON_POSTGRES
async def test_a_cancel_click_is_acknowledged_while_the_database_is_slow(
        fake: FakeDiscord, adapter: DiscordPlatform, queue: Queue) -> None:
    """Cancel answers at once when the database does (the same responses as ever); when it takes
    longer than Discord's 3 seconds, the click is acknowledged first and answered after: the request
    was cancelled, but the click "failed" and the message kept its Cancel button."""
    mason, mallory = fake.add_user("mason"), fake.add_user("mallory")
    inter = await dalle(fake, mason, prompt="a cat to cancel")
    rid = stored(queue, inter).id
    cancel = f"dallebot:cancel:{rid}"
    with requests_table_locked(queue, 4.0):
        stranger = await fake.send_component(inter.original, cancel, user=mallory)
        click = await fake.send_component(inter.original, cancel, user=mason)
        await asyncio.sleep(3.2)
        assert acknowledged_in_time(stranger) and acknowledged_in_time(click)
    await fake.wait_for(lambda f: inter.original.content == "Cancelled.", TIMEOUT)
    assert inter.original.custom_ids == [] and queue.get(rid).status == Status.CANCELLED
    [told] = await fake.wait_for(lambda f: stranger.followups, TIMEOUT)
    assert told.ephemeral and told.content.startswith("Only the person who asked")
    assert rid not in adapter.tracked


async def test_a_long_rejection_reason_still_reaches_the_requester(fake: FakeDiscord, adapter: DiscordPlatform,
                                                                   queue: Queue) -> None:
    """A moderator's reason is the requester's message, and Discord takes at most 2000 characters:
    a longer one was refused (400), so the requester was never told and kept a live Cancel button."""
    inter = await dalle(fake, fake.add_user("spammer"), prompt="something to reject")
    rid = stored(queue, inter).id
    reason = "This breaks rule 4. " * 150  # 3000 characters
    done = await _mod(fake, fake.add_user("mod", roles=[fake.moderator_role]), "reject",
                      [{"type": 4, "name": "request_id", "value": rid}, {"type": 3, "name": "reason", "value": reason}])
    assert done.content == f"Request #{rid} is now rejected."
    told = inter.original
    assert told.content.startswith("This breaks rule 4.") and len(told.content) <= 2000
    assert told.custom_ids == []
    assert [a.action for a in queue.audit(rid)][-1] == "refusal_posted"
