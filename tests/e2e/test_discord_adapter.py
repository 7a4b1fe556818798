"""The Discord adapter end to end: the real discord.py client (the adapter's own) against the fake
Discord, the real queue and the real worker (delivering from its thread) with a small test generator."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import discord
import pytest
import yarl
from discord.gateway import DiscordWebSocket

from bot.config import DiscordConfig
from bot.fakes.discord_server import DiscordUser, FakeDiscord, FakeInteraction, Permissions, RecordedMessage
from bot.platforms import text as texts
from bot.platforms.discord import DiscordPlatform
from bot.worker import Worker
from storage.queue import Queue
from storage.records import RequestRecord
from storage.states import Status
from tests.e2e.adapter_support import BAD_INPUT, LetterGenerator

TIMEOUT = 5.0
CALLBACK = "POST /interactions/{interaction_id}/{token}/callback"
EDIT_ORIGINAL = "PATCH /webhooks/{application_id}/{token}/messages/{message_id}"
CHANNEL_POST = "POST /channels/{channel_id}/messages"


@pytest.fixture(params=["sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    """This module runs on SQLite; the tests marked ``BOTH_DATABASES`` also on PostgreSQL."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_schema_url")


BOTH_DATABASES = pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as server:
        server.image_mods = server.add_role(server.guild, "Image Mods", 0)  # type: ignore[attr-defined]
        yield server


def settings(fake: FakeDiscord, **overrides: Any) -> DiscordConfig:
    return DiscordConfig(**{"enabled": True, "token": fake.token, "api_base_url": fake.api_base,
                            "gateway_url": fake.gateway_url, "guild_ids": (fake.guild.id,),
                            "moderator_roles": ("Image Mods",), "position_update_seconds": 3600.0, **overrides})


async def start(fake: FakeDiscord, queue: Queue, **overrides: Any) -> DiscordPlatform:
    adapter = DiscordPlatform(settings(fake, **overrides), queue, client_options={"guild_ready_timeout": 0.05})
    await adapter.start(intake=True, ready_timeout=TIMEOUT)
    return adapter


@pytest.fixture
async def adapter(fake: FakeDiscord, queue: Queue, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[DiscordPlatform]:
    # The adapter sets discord.py's two seams from its settings; monkeypatch puts them back afterwards.
    monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url))
    a = await start(fake, queue)
    yield a
    await a.stop()


@pytest.fixture
def worker(queue: Queue, adapter: DiscordPlatform, tmp_path: Path) -> Worker:
    return Worker(queue, LetterGenerator(), {"discord": adapter}, tmp_path / "images", owner="test-worker")


async def work(worker: Worker) -> None:
    """Generate and deliver from a worker thread, as ``dallebot serve`` does."""
    def run() -> None:
        while worker.generate_batch() or worker.deliver_batch():
            pass

    await asyncio.wait_for(asyncio.to_thread(run), 30)


async def answered(fake: FakeDiscord, inter: FakeInteraction) -> RecordedMessage:
    """Wait until the bot has edited its deferred ("thinking") message."""
    return await fake.wait_for(lambda f: inter.original if inter.original and not inter.original.loading else None,
                               TIMEOUT)


async def responded(fake: FakeDiscord, inter: FakeInteraction) -> RecordedMessage:
    """For a button click: wait for the callback, then for the message it made to be final."""
    await fake.wait_for(lambda f: inter.callbacks, TIMEOUT)
    return await answered(fake, inter)


async def dalle(fake: FakeDiscord, user: DiscordUser, **options: Any) -> FakeInteraction:
    inter = await fake.send_slash_command("dalle", options, user=user)
    await answered(fake, inter)
    return inter


def stored(queue: Queue, inter: FakeInteraction) -> RequestRecord:
    [rec] = [r for r in queue.list(platform="discord", limit=500) if r.external_id == inter.id]
    return rec


@BOTH_DATABASES
async def test_dalle_is_deferred_shows_its_position_and_ends_with_the_images(
        fake: FakeDiscord, adapter: DiscordPlatform, worker: Worker, queue: Queue) -> None:
    first = await dalle(fake, fake.add_user("alice"), prompt="a lighthouse at dusk")
    mason = fake.add_user("mason")
    inter = await dalle(fake, mason, prompt="an astronaut riding a horse", seed=7)

    assert inter.callbacks == [{"type": 5}]  # deferred ("thinking") within the 3 s
    assert inter.original.content == "Queued: position 2 in the queue (ETA unknown)."
    rec = stored(queue, inter)
    assert inter.original.custom_ids == [f"dallebot:cancel:{rec.id}"]
    assert (rec.status, rec.prompt, rec.seed, rec.n_images) == (Status.QUEUED, "an astronaut riding a horse", 7, 4)
    assert (rec.author_id, rec.channel_id, rec.guild_id) == (mason.id, fake.channel.id, fake.guild.id)

    await asyncio.to_thread(queue.cancel, stored(queue, first).id, actor="test")  # the line moves
    await adapter.update_positions()
    assert inter.original.content == "Queued: next in line (ETA unknown)."
    assert first.original.content == "Cancelled." and first.original.custom_ids == []

    await asyncio.to_thread(worker.generate_batch)
    await adapter.update_positions()
    assert inter.original.content == "Done drawing, sending the images…" and inter.original.custom_ids == []
    await work(worker)

    message = inter.original
    assert [a.filename for a in message.attachments] == [f"dalle-{rec.id}-{k}.png" for k in (1, 2, 3, 4)]
    assert all(a.data.startswith(b"\x89PNG") for a in message.attachments)
    assert message.content == "`an astronaut riding a horse` (seed 7)"
    assert message.custom_ids == [f"dallebot:reroll:{rec.id}"]
    done = stored(queue, inter)
    assert done.status == Status.POSTED and done.reply_id == message.id
    assert fake.requests_to(CHANNEL_POST) == [] and inter.followups == []
    await adapter.update_positions()  # delivered requests are left alone
    assert message.content == "`an astronaut riding a horse` (seed 7)"


async def test_delivery_after_token_expiry_is_a_channel_message(fake: FakeDiscord, adapter: DiscordPlatform,
                                                                worker: Worker, queue: Queue) -> None:
    mason = fake.add_user("mason")
    inter = await dalle(fake, mason, prompt="a slow @everyone snail", images=2)  # @everyone is dropped
    fake.expire(inter)  # the 15 minutes are over (Discord answers 401/50027)
    await work(worker)

    [posted] = [m for m in fake.channel_messages(fake.channel) if m.kind == "channel"]
    assert posted.content.startswith(f"<@{mason.id}> `a slow snail`")
    assert len(posted.attachments) == 2 and posted.custom_ids == [f"dallebot:reroll:{stored(queue, inter).id}"]
    body = fake.requests_to(CHANNEL_POST)[0].json
    assert body["allowed_mentions"] == {"parse": [], "users": [int(mason.id)]}  # pings the user, nobody else
    assert stored(queue, inter).reply_id == posted.id
    assert inter.original.attachments == []


async def test_private_request_is_ephemeral_then_dm_after_expiry(fake: FakeDiscord, adapter: DiscordPlatform,
                                                                  worker: Worker, queue: Queue) -> None:
    alice, bob = fake.add_user("alice"), fake.add_user("bob")
    early = await dalle(fake, alice, prompt="a secret garden", private=True)
    late = await dalle(fake, bob, prompt="a secret cave", private=True)
    assert early.callbacks == [{"type": 5, "data": {"flags": 64}}] and early.original.ephemeral
    fake.expire(late)
    await work(worker)
    assert early.original.ephemeral and len(early.original.attachments) == 4
    [dm] = fake.channel_messages(fake.dm_channel(bob))
    assert len(dm.attachments) == 4 and stored(queue, late).status == Status.POSTED
    assert [m for m in fake.channel_messages(fake.channel) if m.kind == "channel"] == []


async def test_closed_dms_fail_without_retry(fake: FakeDiscord, adapter: DiscordPlatform, worker: Worker,
                                             queue: Queue) -> None:
    inter = await dalle(fake, fake.add_user("shy", dms_closed=True), prompt="a closed door", private=True)
    fake.expire(inter)
    await work(worker)
    assert stored(queue, inter).status == Status.FAILED


@BOTH_DATABASES
async def test_duplicated_interaction_is_one_request(fake: FakeDiscord, adapter: DiscordPlatform,
                                                     queue: Queue) -> None:
    inter = await dalle(fake, fake.add_user("mason"), prompt="twice")
    await fake.redeliver(inter)  # the same INTERACTION_CREATE again
    await dalle(fake, fake.add_user("alice"), prompt="a marker after the duplicate")
    adapter._seen.clear()  # as after a restart: the duplicate now reaches the defer, which Discord refuses
    await fake.redeliver(inter)
    await fake.wait_for(lambda f: [r for r in f.requests_to(CALLBACK) if r.status == 400], TIMEOUT)
    assert inter.callbacks == [{"type": 5}]
    assert len([r for r in queue.list(platform="discord") if r.external_id == inter.id]) == 1
    assert len(queue.list(platform="discord")) == 2


async def test_429_with_retry_after_is_waited_out(fake: FakeDiscord, adapter: DiscordPlatform, worker: Worker,
                                                  queue: Queue) -> None:
    inter = await dalle(fake, fake.add_user("mason"), prompt="a busy bee")
    fake.inject_rate_limit(EDIT_ORIGINAL, retry_after=0.2)
    await work(worker)
    assert [r.status for r in fake.requests_to(EDIT_ORIGINAL)][-2:] == [429, 200]
    assert len(inter.original.attachments) == 4 and stored(queue, inter).status == Status.POSTED


async def test_cancel_button_is_for_the_requester_only(fake: FakeDiscord, adapter: DiscordPlatform,
                                                       queue: Queue) -> None:
    mason, mallory = fake.add_user("mason"), fake.add_user("mallory")
    inter = await dalle(fake, mason, prompt="a cat to keep")
    rec = stored(queue, inter)
    cancel = f"dallebot:cancel:{rec.id}"

    click = await fake.send_component(inter.original, cancel, user=mallory)
    await responded(fake, click)
    assert click.original.ephemeral and click.original.content.startswith("Only the person who asked")
    assert stored(queue, inter).status == Status.QUEUED

    # a double click: both clicks arrive while the button is still there; one cancels, the other is told why not
    clicks = [await fake.send_component(inter.original, cancel, user=mason) for _ in range(2)]
    await fake.wait_for(lambda f: all(c.callbacks for c in clicks), TIMEOUT)
    assert sorted(c.callbacks[0]["type"] for c in clicks) == [4, 7]  # 7: the queued message itself is updated
    assert inter.original.content == "Cancelled." and inter.original.custom_ids == []
    assert stored(queue, inter).status == Status.CANCELLED
    [told] = [c for c in clicks if c.callbacks[0]["type"] == 4]
    assert (await answered(fake, told)).content == "This request is already cancelled."


async def test_reroll_is_a_new_request_with_a_new_seed(fake: FakeDiscord, adapter: DiscordPlatform,
                                                       worker: Worker, queue: Queue) -> None:
    mason, alice = fake.add_user("mason"), fake.add_user("alice")
    inter = await dalle(fake, mason, prompt="a red fox", seed=5)
    await work(worker)
    original = stored(queue, inter)

    click = await fake.send_component(inter.original, f"dallebot:reroll:{original.id}", user=alice)
    await responded(fake, click)
    assert click.callbacks == [{"type": 5}] and click.original.content.startswith("Queued")
    again = stored(queue, click)
    assert (again.prompt, again.author_id, again.options["reroll_of"]) == ("a red fox", alice.id, original.id)
    assert again.seed is not None and again.seed != 5
    await work(worker)
    assert len(click.original.attachments) == 4 and stored(queue, click).status == Status.POSTED


async def test_status_shows_queue_length_and_eta(fake: FakeDiscord, adapter: DiscordPlatform, worker: Worker,
                                                 queue: Queue) -> None:
    await dalle(fake, fake.add_user("alice"), prompt="one")
    await work(worker)  # one request measured: a throughput exists now
    await dalle(fake, fake.add_user("bob"), prompt="two")
    inter = await fake.send_slash_command("dalle-status", {}, user=fake.add_user("carol"))
    message = await answered(fake, inter)
    assert message.ephemeral and message.content.startswith("Queue: 1 waiting, 0 being drawn.")
    assert "requests/hour" in message.content and "ETA" not in message.content and "about" in message.content


async def _mod(fake: FakeDiscord, user: DiscordUser, sub: str, options: list[dict[str, Any]] | None = None,
               resolved: dict[str, Any] | None = None, *, guild: Any = None, channel: Any = None) -> RecordedMessage:
    """Run ``/dalle-mod <sub>`` (the fake's helper does not nest subcommand options)."""
    guild, channel = guild or fake.guild, channel or fake.channel
    command = fake._find_command("dalle-mod", guild)
    assert command is not None
    data: dict[str, Any] = {"id": command["id"], "name": "dalle-mod", "type": 1, "guild_id": guild.id,
                            "options": [{"type": 1, "name": sub, "options": options or []}]}
    if resolved:
        data["resolved"] = resolved
    inter = await fake._send_interaction(2, data, user=user, guild=guild, channel=channel)
    return await answered(fake, inter)


@BOTH_DATABASES
async def test_moderator_commands_refuse_members_without_the_role(fake: FakeDiscord, adapter: DiscordPlatform,
                                                                  queue: Queue) -> None:
    plain = fake.add_user("plain")
    by_role = fake.add_user("rolemod", roles=[fake.image_mods])  # type: ignore[attr-defined]
    by_permission = fake.add_user("permmod", roles=[fake.moderator_role])
    spammer = fake.add_user("spammer")
    inter = await dalle(fake, spammer, prompt="something to reject")
    rec = stored(queue, inter)

    for sub, options in (("queue", []), ("reject", [{"type": 4, "name": "request_id", "value": rec.id}])):
        refused = await _mod(fake, plain, sub, options)
        assert refused.ephemeral and refused.content == texts.NOT_A_MODERATOR
    assert stored(queue, inter).status == Status.QUEUED

    listing = await _mod(fake, by_role, "queue")
    assert listing.ephemeral and f"#{rec.id} queued discord:{spammer.id}" in listing.content
    done = await _mod(fake, by_permission, "reject", [{"type": 4, "name": "request_id", "value": rec.id},
                                                      {"type": 3, "name": "reason", "value": "spam"}])
    assert done.content == f"Request #{rec.id} is now rejected."
    assert stored(queue, inter).status == Status.REJECTED
    assert inter.original.content == "spam" and inter.original.custom_ids == []  # the requester is told
    again = await _mod(fake, by_role, "approve", [{"type": 4, "name": "request_id", "value": rec.id}])
    assert "cannot approve" in again.content

    member = fake.guild.members[spammer.id]
    resolved = {"users": {spammer.id: spammer.payload()},
                "members": {spammer.id: {k: v for k, v in member.payload().items() if k != "user"}}}
    banned = await _mod(fake, by_role, "ban", [{"type": 6, "name": "user", "value": spammer.id}], resolved)
    assert banned.content == f"<@{spammer.id}> can no longer make requests."
    assert queue.get_user(f"discord:{spammer.id}").banned
    later = await dalle(fake, spammer, prompt="another one")
    assert later.original.content == texts.BANNED and stored(queue, later).status == Status.REJECTED
    audit = [a for a in queue.audit() if a.actor.startswith("discord-moderator:")]
    assert [(a.action, a.actor) for a in audit] == [("rejected", f"discord-moderator:{by_permission.id}"),
                                                    ("refusal_posted", f"discord-moderator:{by_permission.id}"),
                                                    ("banned", f"discord-moderator:{by_role.id}")]


async def test_moderation_is_only_for_the_operators_guilds(fake: FakeDiscord, queue: Queue,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """/dalle-mod acts on the whole queue, so a server that merely added the bot (global commands)
    cannot moderate, even its owner with every permission; the listed moderator guild can."""
    monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url))
    stranger = fake.add_user("stranger")
    theirs = fake.add_guild("Stranger's Server", owner=stranger)
    lobby = fake.add_channel(theirs, "lobby")
    victim = fake.add_user("victim")
    adapter = await start(fake, queue, guild_ids=(), moderator_guild_ids=(fake.guild.id,))
    try:
        inter = await dalle(fake, victim, prompt="a private thing", private=True)
        rec = stored(queue, inter)
        for sub, options in (("queue", []), ("reject", [{"type": 4, "name": "request_id", "value": rec.id}])):
            refused = await _mod(fake, stranger, sub, options, guild=theirs, channel=lobby)
            assert refused.ephemeral and refused.content == texts.NOT_A_MODERATION_GUILD
        assert stored(queue, inter).status == Status.QUEUED
        listing = await _mod(fake, fake.add_user("mod", roles=[fake.moderator_role]), "queue")
        assert f"#{rec.id} queued discord:{victim.id}" in listing.content
    finally:
        await adapter.stop()
    nobody = await start(fake, queue, guild_ids=())          # no moderator guilds at all: nobody
    try:
        refused = await _mod(fake, fake.owner, "queue")
        assert refused.content == texts.NOT_A_MODERATION_GUILD
    finally:
        await nobody.stop()


async def test_a_slow_rejection_still_answers_the_moderator_in_time(fake: FakeDiscord, adapter: DiscordPlatform,
                                                                   queue: Queue) -> None:
    """Rejecting tells the requester first (Discord REST, here held up by a 3.5 s rate limit): the
    moderator's command is acknowledged before that, inside Discord's 3 seconds."""
    inter = await dalle(fake, fake.add_user("spammer"), prompt="something to reject")
    rec = stored(queue, inter)
    fake.inject_rate_limit(EDIT_ORIGINAL, retry_after=3.5)
    done = await _mod(fake, fake.add_user("mod", roles=[fake.moderator_role]), "reject",
                      [{"type": 4, "name": "request_id", "value": rec.id}])
    assert done.content == f"Request #{rec.id} is now rejected."
    assert stored(queue, inter).status == Status.REJECTED
    assert inter.original.content.startswith("Sorry, a moderator") and inter.original.custom_ids == []  # told


async def test_a_database_outage_at_intake_is_answered(fake: FakeDiscord, adapter: DiscordPlatform, queue: Queue,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """/dalle is deferred at once; if the request cannot be stored, the "thinking" message says so."""
    from bot.platforms import discord as discord_module
    from storage.errors import DatabaseUnavailable

    def down(*args: Any, **kwargs: Any) -> None:
        raise DatabaseUnavailable("the database is not answering")

    monkeypatch.setattr(discord_module, "admit", down)
    inter = await fake.send_slash_command("dalle", {"prompt": "a cat"}, user=fake.add_user("mason"))
    assert (await answered(fake, inter)).content == texts.INTAKE_UNAVAILABLE
    assert queue.list(platform="discord") == []


async def test_allowed_channels_per_guild(fake: FakeDiscord, queue: Queue, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url))
    art = fake.add_channel(fake.guild, "art")
    adapter = await start(fake, queue, allowed_channels=(f"{fake.guild.id}:{art.id}",))
    try:
        refused = await fake.send_slash_command("dalle", {"prompt": "a cat"}, user=fake.add_user("mason"))
        message = await answered(fake, refused)
        assert refused.callbacks[0]["type"] == 4 and message.ephemeral
        assert message.content == texts.CHANNEL_NOT_ALLOWED
        ok = await fake.send_slash_command("dalle", {"prompt": "a cat"}, user=fake.add_user("alice"), channel=art)
        assert (await answered(fake, ok)).content.startswith("Queued")
        assert [r.channel_id for r in queue.list(platform="discord")] == [art.id]
    finally:
        await adapter.stop()


async def test_commands_are_synced_only_when_they_change(fake: FakeDiscord, queue: Queue,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url))
    runs = []
    for max_images in (4, 4, 9):
        adapter = await start(fake, queue, max_images=max_images)
        runs.append(adapter.synced)
        await adapter.stop()
    assert runs == [[fake.guild.id], [], [fake.guild.id]]  # the restart changed nothing; max_images did
    assert len(fake.command_syncs) == 2
    names = {c["name"] for c in fake.guild_commands[fake.guild.id]}
    assert names == {"dalle", "dalle-status", "dalle-mod"}
    dalle_cmd = next(c for c in fake.guild_commands[fake.guild.id] if c["name"] == "dalle")
    images = next(o for o in dalle_cmd["options"] if o["name"] == "images")
    assert images["max_value"] == 9


@BOTH_DATABASES
async def test_bad_input_through_discord(fake: FakeDiscord, adapter: DiscordPlatform, worker: Worker,
                                         queue: Queue) -> None:
    cases = [*BAD_INPUT, ("mass mention", "@everyone <@&1> look at this <@1> cat")]
    sent = {}
    for i, (name, prompt) in enumerate(cases):
        sent[name] = await dalle(fake, fake.add_user(f"user{i}"), prompt=prompt)
    await work(worker)
    rejected = set()
    for name, inter in sent.items():
        rec = stored(queue, inter)
        message = inter.original
        if rec.status == Status.REJECTED:
            rejected.add(name)
            assert message.content == rec.error and not message.attachments, name  # a clear reply
        else:
            assert rec.status == Status.POSTED and len(message.attachments) == 4, name
            assert message.content.startswith("`") and "\u202e" not in message.content, name
    assert rejected == {"empty", "only mentions", "over-long", "zero-width only", "emoji only"}
    assert stored(queue, sent["mass mention"]).prompt == "look at this cat"
    for r in fake.requests_to(EDIT_ORIGINAL):  # the bot never pings anyone from a prompt
        assert (r.json or {}).get("allowed_mentions", {"parse": []})["parse"] == []
    assert stored(queue, sent["sql"]).prompt == "a cat'); DROP TABLE requests; -- \" OR 1=1"


def test_settings_are_frozen_dataclasses() -> None:
    cfg = DiscordConfig()
    assert dataclasses.replace(cfg, max_images=2).max_images == 2 and not cfg.enabled
    assert Permissions.MANAGE_MESSAGES == 1 << 13


async def test_serve_runs_both_adapters_end_to_end(fake: FakeDiscord, db_url: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``dallebot serve`` (intake + worker roles): the X poll job and the Discord client on the service's
    loop, the worker's delivery thread handing Discord work back to it."""
    from bot.app import open_app
    from bot.config import DatabaseConfig, DataConfig, Settings, XConfig
    from bot.fakes.x_server import FakeX
    from bot.service import Service

    monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url))
    with FakeX() as fake_x:
        s = Settings(data=DataConfig(dir=str(tmp_path / "data")), database=DatabaseConfig(url=db_url),
                     x=XConfig(enabled=True, api_base_url=fake_x.base_url, poll_interval=1.0, **fake_x.credentials()),
                     discord=settings(fake))
        app = open_app(s, auto_upgrade=True)
        app.__dict__["generator"] = LetterGenerator()  # the model boundary
        assert set(app.platforms) == {"local", "x", "discord"}
        app.platforms["discord"].client._connection.guild_ready_timeout = 0.05  # type: ignore[attr-defined]
        service = Service(app, roles=("intake", "worker"))
        task = asyncio.create_task(service.run())
        try:
            mention = fake_x.add_mention(fake_x.add_user("alice"), "a cat on a skateboard")
            await fake.wait_until_identified(TIMEOUT)
            await fake.wait_for(lambda f: f.guild_commands.get(f.guild.id), TIMEOUT)
            inter = await fake.send_slash_command("dalle", {"prompt": "a dog on a bike"}, user=fake.add_user("mason"))
            await fake.wait_for(lambda f: inter.original and len(inter.original.attachments) == 4, 15)
            await asyncio.wait_for(asyncio.to_thread(fake_x.wait_for, lambda f: f.replies_to(mention), 15), 16)
            assert len(fake_x.replies_to(mention)) == 1 and fake_x.replies_to(mention)[0].media_keys
        finally:
            service.stopping.set()
            await asyncio.wait_for(task, TIMEOUT)
            # As asyncio.run() does when `dallebot serve` exits: let the job threads finish first.
            await asyncio.wait_for(asyncio.get_running_loop().shutdown_default_executor(), 30)
        try:
            assert {r.status for r in app.queue.list()} == {Status.POSTED}  # marked after the replies
        finally:
            app.close()


async def test_drain_worker_without_a_running_client_posts_in_the_channel(
        fake: FakeDiscord, adapter: DiscordPlatform, queue: Queue, tmp_path: Path) -> None:
    """``dallebot worker --drain`` has no event loop for Discord: the adapter logs in on a private
    loop (REST only) and delivers as a channel message (the interaction token lives elsewhere)."""
    mason = fake.add_user("mason")
    inter = await dalle(fake, mason, prompt="a drained cat")
    drain_only = DiscordPlatform(settings(fake), queue)
    try:
        worker = Worker(queue, LetterGenerator(), {"discord": drain_only}, tmp_path / "img", owner="drain")
        await work(worker)
    finally:
        await asyncio.to_thread(drain_only.close)
    [posted] = [m for m in fake.channel_messages(fake.channel) if m.kind == "channel"]
    assert posted.content.startswith(f"<@{mason.id}> `a drained cat`") and len(posted.attachments) == 4
    rec = stored(queue, inter)
    assert rec.status == Status.POSTED
    # the intake process's "Queued" message is closed at its next update (no stale Cancel button)
    assert rec.id in adapter.tracked and inter.original.content.startswith("Queued")
    await adapter.update_positions()
    assert inter.original.content == "Done." and inter.original.custom_ids == []
    assert rec.id not in adapter.tracked


HISTORY = "GET /channels/{channel_id}/messages"


async def _crash_after_posting(queue: Queue, platform: DiscordPlatform, rid: int, tmp_path: Path) -> None:
    """Process A generates and posts request ``rid`` through ``platform``, then dies before it can
    record the post (the request stays ``posting`` under A's lease)."""
    a = Worker(queue, LetterGenerator(), {"discord": platform}, tmp_path / "img", owner="a")
    assert await asyncio.to_thread(a.generate_batch) == 1
    claim = queue.claim_deliveries("a", 5)
    assert claim.ids == [rid]
    rec = queue.get(rid)
    await asyncio.to_thread(platform.deliver, rec, [Path(p) for p in rec.image_paths])


async def _recover_elsewhere(fake: FakeDiscord, queue: Queue, clock: Any, tmp_path: Path) -> None:
    """After A's delivery lease expires, process B (a fresh client: no interaction token) delivers."""
    clock.advance(queue.policy.lease_seconds + 1)
    other = DiscordPlatform(settings(fake), queue)
    try:
        b = Worker(queue, LetterGenerator(), {"discord": other}, tmp_path / "img", owner="b")
        assert await asyncio.wait_for(asyncio.to_thread(b.deliver_batch), 30) == 1
    finally:
        await asyncio.to_thread(other.close)


async def test_a_channel_post_made_before_a_crash_is_found_by_another_process(
        fake: FakeDiscord, adapter: DiscordPlatform, queue: Queue, clock: Any, tmp_path: Path) -> None:
    mason = fake.add_user("mason")
    inter = await dalle(fake, mason, prompt="a crashed cat")
    rid = stored(queue, inter).id
    first = DiscordPlatform(settings(fake), queue)  # process A: a drain worker, posts in the channel
    try:
        await _crash_after_posting(queue, first, rid, tmp_path)
    finally:
        await asyncio.to_thread(first.close)
    await _recover_elsewhere(fake, queue, clock, tmp_path)

    [posted] = [m for m in fake.channel_messages(fake.channel) if m.attachments]
    assert len(fake.requests_to(CHANNEL_POST)) == 1  # found, not posted again
    assert fake.requests_to(HISTORY)
    rec = queue.get(rid)
    assert rec.status == Status.POSTED and rec.reply_id == posted.id
    assert [a.action for a in queue.audit(rid)][-3:] == ["posting", "recovering", "posted"]


async def test_an_interaction_answered_before_a_crash_is_found_by_another_process(
        fake: FakeDiscord, adapter: DiscordPlatform, queue: Queue, clock: Any, tmp_path: Path) -> None:
    mason = fake.add_user("mason")
    inter = await dalle(fake, mason, prompt="a crashed dog")
    rid = stored(queue, inter).id
    await _crash_after_posting(queue, adapter, rid, tmp_path)  # A edits the interaction's own message
    assert len(inter.original.attachments) == 4
    await _recover_elsewhere(fake, queue, clock, tmp_path)

    assert fake.requests_to(CHANNEL_POST) == []  # B found the answered interaction in the channel
    rec = queue.get(rid)
    assert rec.status == Status.POSTED and rec.reply_id == inter.original.id


async def test_without_history_access_a_crashed_delivery_is_posted_again(
        fake: FakeDiscord, adapter: DiscordPlatform, queue: Queue, clock: Any, tmp_path: Path) -> None:
    """At least once: when the bot may not read the channel's history, B cannot know, and posts."""
    mason = fake.add_user("mason")
    inter = await dalle(fake, mason, prompt="a crashed owl")
    rid = stored(queue, inter).id
    first = DiscordPlatform(settings(fake), queue)
    try:
        await _crash_after_posting(queue, first, rid, tmp_path)
    finally:
        await asyncio.to_thread(first.close)
    for role in fake.guild.roles.values():  # the bot's role and @everyone
        role.permissions &= ~Permissions.READ_MESSAGE_HISTORY
    await _recover_elsewhere(fake, queue, clock, tmp_path)

    posts = [m for m in fake.channel_messages(fake.channel) if m.attachments]
    assert len(posts) == 2 and queue.get(rid).reply_id == posts[-1].id


async def test_a_private_result_sent_by_dm_before_a_crash_is_found_by_another_process(
        fake: FakeDiscord, adapter: DiscordPlatform, queue: Queue, clock: Any, tmp_path: Path) -> None:
    bob = fake.add_user("bob")
    inter = await dalle(fake, bob, prompt="a crashed secret", private=True)
    rid = stored(queue, inter).id
    first = DiscordPlatform(settings(fake), queue)  # no token here: the private result goes by DM
    try:
        await _crash_after_posting(queue, first, rid, tmp_path)
    finally:
        await asyncio.to_thread(first.close)
    await _recover_elsewhere(fake, queue, clock, tmp_path)

    [dm] = fake.channel_messages(fake.dm_channel(bob))
    assert len(dm.attachments) == 4 and queue.get(rid).reply_id == dm.id
    assert [m for m in fake.channel_messages(fake.channel) if m.attachments] == []
