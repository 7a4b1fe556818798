"""A real discord.py 2.7 client with an app_commands tree against the fake Discord
(bot.fakes.discord_server): REST and gateway on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import discord
import pytest
import yarl
from discord import app_commands
from discord.gateway import DiscordWebSocket

from bot.fakes.discord_server import FakeDiscord, FakeDiscordThread, FakeInteraction, Permissions
from tests.e2e.conftest import make_png

TIMEOUT = 5.0


class RerollView(discord.ui.View):
    """A persistent view, as the bot will attach to finished images."""

    def __init__(self, clicks: asyncio.Queue[discord.Interaction]) -> None:
        super().__init__(timeout=None)
        self.clicks = clicks

    @discord.ui.button(label="Re-roll", custom_id="dallebot:reroll", style=discord.ButtonStyle.primary)
    async def reroll(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        await interaction.response.send_message("Re-rolling…", ephemeral=True)
        await self.clicks.put(interaction)


class DalleTestBot(discord.Client):
    """The smallest bot with a ``/dalle`` command: it hands each interaction to
    the test, which then drives the response through discord.py's own API."""

    def __init__(self, guild_id: int) -> None:
        super().__init__(intents=discord.Intents.default(), guild_ready_timeout=0.05)
        self.guild_id = guild_id
        self.tree = app_commands.CommandTree(self)
        self.received: asyncio.Queue[tuple[discord.Interaction, dict[str, Any]]] = asyncio.Queue()
        self.clicks: asyncio.Queue[discord.Interaction] = asyncio.Queue()

        @self.tree.command(name="dalle", description="Generate images from a text prompt")
        @app_commands.describe(prompt="What to draw", images="A reference image", seed="Optional seed")
        async def dalle(interaction: discord.Interaction, prompt: app_commands.Range[str, 1, 300],
                        images: discord.Attachment | None = None, seed: int | None = None) -> None:
            await self.received.put((interaction, {"prompt": prompt, "images": images, "seed": seed}))

    async def setup_hook(self) -> None:
        self.add_view(RerollView(self.clicks))
        guild = discord.Object(self.guild_id)
        self.tree.copy_global_to(guild=guild)
        await self.tree.sync(guild=guild)


async def _start(client: discord.Client, token: str) -> asyncio.Task[None]:
    task = asyncio.create_task(client.start(token))
    ready = asyncio.create_task(client.wait_until_ready())
    done, _ = await asyncio.wait({task, ready}, timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
    if ready not in done:
        ready.cancel()
        if task in done:
            task.result()  # raises the login/connect error
        raise TimeoutError("discord.py did not become ready against the fake")
    return task


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as server:
        yield server


@pytest.fixture
async def bot(fake: FakeDiscord, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[DalleTestBot]:
    # discord.py's two seams (what fake.patch_discord_py() also does).
    monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url))
    client = DalleTestBot(int(fake.guild.id))
    task = await _start(client, fake.token)
    yield client
    await client.close()
    await asyncio.wait_for(task, TIMEOUT)


async def _invoke(fake: FakeDiscord, bot: DalleTestBot, options: dict[str, Any], **kwargs: Any,
                  ) -> tuple[FakeInteraction, discord.Interaction, dict[str, Any]]:
    sent = await fake.send_slash_command("dalle", options, **kwargs)
    interaction, args = await asyncio.wait_for(bot.received.get(), TIMEOUT)
    assert interaction.id == int(sent.id)
    return sent, interaction, args


async def test_connects_and_syncs_commands(fake: FakeDiscord, bot: DalleTestBot) -> None:
    assert fake.api_base.startswith("http://127.0.0.1:") and fake.gateway_url.startswith("ws://127.0.0.1:")
    assert bot.user is not None and bot.user.id == int(fake.bot.id)
    assert bot.application_id == int(fake.application_id)
    [identify] = fake.identifies
    assert identify["token"] == fake.token and identify["intents"] == discord.Intents.default().value
    assert fake.sessions[0].zlib is not None  # discord.py asked for zlib-stream and decoded it
    assert fake.sessions[0].heartbeats >= 1  # sent right after HELLO, and ACKed
    assert [r.route for r in fake.requests[:3]] == [
        "GET /users/@me", "GET /oauth2/applications/@me", "PUT /applications/{application_id}/guilds/{guild_id}/commands"]

    [(scope, body)] = fake.command_syncs
    assert scope == fake.guild.id
    [dalle] = body
    assert dalle["name"] == "dalle"
    assert [(o["name"], o["type"], o["required"]) for o in dalle["options"]] == [
        ("prompt", 3, True), ("images", 11, False), ("seed", 4, False)]
    assert dalle["options"][0]["max_length"] == 300

    guild = bot.get_guild(int(fake.guild.id))
    assert guild is not None and guild.get_channel(int(fake.channel.id)).name == "image-gen"
    assert guild.get_role(int(fake.moderator_role.id)).permissions.manage_messages


async def test_resync_of_unchanged_commands_keeps_versions(fake: FakeDiscord, bot: DalleTestBot) -> None:
    guild = discord.Object(int(fake.guild.id))
    version = fake.guild_commands[fake.guild.id][0]["version"]
    before = {c.name: c.id for c in await bot.tree.fetch_commands(guild=guild)}
    await bot.tree.sync(guild=guild)
    after = {c.name: c.id for c in await bot.tree.fetch_commands(guild=guild)}
    assert before == after and len(fake.command_syncs) == 2
    assert fake.guild_commands[fake.guild.id][0]["version"] == version  # unchanged: same version
    assert await bot.tree.fetch_commands() == []  # nothing global was synced


async def test_slash_command_defer_edit_and_followup_with_png(fake: FakeDiscord, bot: DalleTestBot) -> None:
    mason = fake.add_user("mason")
    png = make_png("blue")
    sent, interaction, args = await _invoke(fake, bot, {"prompt": "an astronaut riding a horse", "seed": 7},
                                            user=mason)
    assert args == {"prompt": "an astronaut riding a horse", "images": None, "seed": 7}
    assert interaction.user.id == int(mason.id) and interaction.channel_id == int(fake.channel.id)
    assert interaction.filesize_limit == 10 * 1024 * 1024
    assert not interaction.is_expired() and abs(interaction.created_at.timestamp() - time.time()) < 60

    await interaction.response.defer(thinking=True)
    assert sent.callbacks == [{"type": 5}] and sent.original is not None and sent.original.loading

    await interaction.edit_original_response(content="Queued: position 3")
    assert sent.original.content == "Queued: position 3" and not sent.original.loading

    followup = await interaction.followup.send(content=f"{mason.mention} here you go",
                                               file=discord.File(io.BytesIO(png), "dalle.png"),
                                               view=RerollView(bot.clicks), wait=True)
    [recorded] = sent.followups
    assert followup.id == int(recorded.id)
    assert [(a.filename, a.data) for a in recorded.attachments] == [("dalle.png", png)]
    assert followup.attachments[0].width == 256 and followup.mentions[0].id == int(mason.id)
    assert recorded.custom_ids == ["dallebot:reroll"]
    assert await followup.attachments[0].read() == png  # served by the fake's CDN route


async def test_edit_original_with_attachments(fake: FakeDiscord, bot: DalleTestBot) -> None:
    sent, interaction, _ = await _invoke(fake, bot, {"prompt": "a cat"}, user=fake.add_user("mason"))
    await interaction.response.defer()
    images = [make_png(c) for c in ("red", "green")]
    message = await interaction.edit_original_response(
        content="Done", attachments=[discord.File(io.BytesIO(d), f"img{i}.png") for i, d in enumerate(images)])
    assert [a.data for a in sent.original.attachments] == images
    assert [a.filename for a in message.attachments] == ["img0.png", "img1.png"]
    # Editing again while keeping one attachment, as discord.py sends it.
    await interaction.edit_original_response(content="Kept one", attachments=[message.attachments[1]])
    assert [a.data for a in sent.original.attachments] == images[1:]


async def test_attachment_option_is_downloadable(fake: FakeDiscord, bot: DalleTestBot) -> None:
    ref = make_png("purple", 64)
    sent, interaction, args = await _invoke(fake, bot, {"prompt": "like this", "images": ("ref.png", ref)},
                                            user=fake.add_user("mason"))
    await interaction.response.defer()
    assert args["images"].filename == "ref.png" and args["images"].size == len(ref)
    assert await args["images"].read() == ref


async def test_expired_token_makes_followups_fail_and_channel_post_works(fake: FakeDiscord,
                                                                          bot: DalleTestBot) -> None:
    mason = fake.add_user("mason")
    sent, interaction, _ = await _invoke(fake, bot, {"prompt": "a slow one"}, user=mason)
    await interaction.response.defer(thinking=True)
    fake.expire(sent)

    with pytest.raises(discord.HTTPException) as caught:
        await interaction.followup.send(file=discord.File(io.BytesIO(make_png()), "late.png"))
    assert (caught.value.status, caught.value.code) == (401, 50027)
    with pytest.raises(discord.HTTPException) as caught:
        await interaction.edit_original_response(content="done")
    assert (caught.value.status, caught.value.code) == (401, 50027)

    # The fallback the adapter will use: a plain channel message, no interaction token.
    channel = bot.get_partial_messageable(interaction.channel_id)
    message = await channel.send(f"{mason.mention} your image", file=discord.File(io.BytesIO(make_png()), "a.png"))
    [posted] = [m for m in fake.channel_messages(fake.channel) if m.kind == "channel"]
    assert posted.id == str(message.id) and posted.attachments[0].data == make_png()


async def test_backdated_interaction_is_expired_on_both_sides(fake: FakeDiscord, bot: DalleTestBot) -> None:
    sent, interaction, _ = await _invoke(fake, bot, {"prompt": "from the past"}, user=fake.add_user("mason"),
                                         age=16 * 60)
    assert interaction.is_expired()
    with pytest.raises(discord.NotFound) as caught:
        await interaction.response.defer()
    assert caught.value.code == 10062 and sent.callbacks == []


async def test_initial_response_after_three_seconds_is_unknown_interaction(fake: FakeDiscord,
                                                                           bot: DalleTestBot) -> None:
    fake.initial_response_deadline = 0.0  # every callback is "late"; no sleeping needed
    sent, interaction, _ = await _invoke(fake, bot, {"prompt": "too slow"}, user=fake.add_user("mason"))
    with pytest.raises(discord.NotFound) as caught:
        await interaction.response.defer()
    assert caught.value.code == 10062
    with pytest.raises(discord.NotFound):
        await interaction.followup.send("anyone there?")


async def test_duplicated_event_and_double_acknowledgement(fake: FakeDiscord, bot: DalleTestBot) -> None:
    sent, interaction, _ = await _invoke(fake, bot, {"prompt": "twice"}, user=fake.add_user("mason"))
    await interaction.response.defer()
    await fake.redeliver(sent)
    again, _ = await asyncio.wait_for(bot.received.get(), TIMEOUT)
    assert again.id == interaction.id  # discord.py does not dedupe: the adapter must
    with pytest.raises(discord.HTTPException) as caught:
        await again.response.defer()
    assert (caught.value.status, caught.value.code) == (400, 40060)
    assert sent.callbacks == [{"type": 5}]


async def test_429_with_retry_after_is_waited_out(fake: FakeDiscord, bot: DalleTestBot) -> None:
    sent, interaction, _ = await _invoke(fake, bot, {"prompt": "busy"}, user=fake.add_user("mason"))
    await interaction.response.defer()
    fake.inject_rate_limit("POST /webhooks/{application_id}/{token}", retry_after=0.2)
    fake.inject_rate_limit("POST /channels/{channel_id}/messages", retry_after=0.2, is_global=True)

    started = time.monotonic()
    await interaction.followup.send("after the 429", wait=True)
    await bot.get_partial_messageable(int(fake.channel.id)).send("also after a global 429")
    assert time.monotonic() - started >= 0.35  # two waits of 0.2 s (the loop may wake a tick early)
    for route in ("POST /webhooks/{application_id}/{token}", "POST /channels/{channel_id}/messages"):
        assert [r.status for r in fake.requests_to(route)] == [429, 200]
    assert [m.content for m in sent.followups] == ["after the 429"]


async def test_429_without_via_header_is_not_retried(fake: FakeDiscord, bot: DalleTestBot) -> None:
    fake.inject_rate_limit("POST /channels/{channel_id}/messages", via=False)
    with pytest.raises(discord.HTTPException) as caught:
        await bot.get_partial_messageable(int(fake.channel.id)).send("blocked")
    assert caught.value.status == 429
    assert len(fake.requests_to("POST /channels/{channel_id}/messages")) == 1


async def test_429_without_via_header_on_a_webhook_is_not_retried(fake: FakeDiscord, bot: DalleTestBot) -> None:
    """Cloudflare's ban page carries none of Discord's headers, Via included: discord.py's webhook
    path (interaction edits) raises it as a 429 at once (with a Via header it would read the HTML
    page as JSON and fail with a TypeError)."""
    sent, interaction, _ = await _invoke(fake, bot, {"prompt": "a fox"}, user=fake.add_user("mason"))
    await interaction.response.defer()
    route = "PATCH /webhooks/{application_id}/{token}/messages/{message_id}"
    fake.inject_rate_limit(route, via=False)
    with pytest.raises(discord.HTTPException) as caught:
        await interaction.edit_original_response(content="blocked")
    assert caught.value.status == 429 and "error code: 1015" in caught.value.text
    assert len(fake.requests_to(route)) == 1


async def test_button_click_is_a_component_interaction(fake: FakeDiscord, bot: DalleTestBot) -> None:
    mason = fake.add_user("mason")
    sent, interaction, _ = await _invoke(fake, bot, {"prompt": "a fox"}, user=mason)
    await interaction.response.defer()
    await interaction.followup.send("done", view=RerollView(bot.clicks))
    [message] = sent.followups

    click = await fake.send_component(message, "dallebot:reroll", user=mason)
    clicked = await asyncio.wait_for(bot.clicks.get(), TIMEOUT)
    assert clicked.type is discord.InteractionType.component and clicked.message.id == int(message.id)
    assert click.callbacks[0]["type"] == 4 and click.original.content == "Re-rolling…" and click.original.ephemeral


async def test_member_permissions_come_from_roles(fake: FakeDiscord, bot: DalleTestBot) -> None:
    mod = fake.add_user("mod", roles=[fake.moderator_role])
    _, as_mod, _ = await _invoke(fake, bot, {"prompt": "x"}, user=mod)
    _, as_user, _ = await _invoke(fake, bot, {"prompt": "y"}, user=fake.add_user("plain"))
    assert as_mod.permissions.manage_messages and not as_user.permissions.manage_messages
    assert as_mod.app_permissions.attach_files
    assert fake.moderator_role.permissions == Permissions.MANAGE_MESSAGES


async def test_dm_delivery_and_closed_dms(fake: FakeDiscord, bot: DalleTestBot) -> None:
    open_user = fake.add_user("open")
    closed_user = fake.add_user("closed", dms_closed=True)
    for user in (open_user, closed_user):
        sent, interaction, _ = await _invoke(fake, bot, {"prompt": "private"}, user=user)
        await interaction.response.defer(ephemeral=True)
        assert sent.original.ephemeral
        if user is open_user:
            await interaction.user.send("your image", file=discord.File(io.BytesIO(make_png()), "dm.png"))
            [dm] = fake.channel_messages(fake.dm_channel(open_user))
            assert dm.attachments[0].filename == "dm.png"
        else:
            with pytest.raises(discord.Forbidden) as caught:
                await interaction.user.send("your image")
            assert caught.value.code == 50007


async def test_slash_command_in_dm(fake: FakeDiscord, bot: DalleTestBot) -> None:
    # A DM invocation is matched against global commands, so sync those too.
    await bot.tree.sync()
    sent, interaction, _ = await _invoke(fake, bot, {"prompt": "in a DM"}, user=fake.add_user("mason"), dm=True)
    assert interaction.guild_id is None and isinstance(interaction.channel, discord.DMChannel)
    await interaction.response.send_message("hi")
    assert sent.original.content == "hi"


async def test_gateway_reconnect_resumes_the_session(fake: FakeDiscord, bot: DalleTestBot) -> None:
    resumed = asyncio.ensure_future(bot.wait_for("resumed", timeout=TIMEOUT))
    await fake.force_reconnect()
    await resumed
    assert len(fake.identifies) == 1 and len(fake.resumes) == 1
    sent, interaction, _ = await _invoke(fake, bot, {"prompt": "after resume"}, user=fake.add_user("mason"))
    await interaction.response.defer()
    assert sent.acknowledged


async def test_wrong_token_fails_login(fake: FakeDiscord, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base)
    client = discord.Client(intents=discord.Intents.none())
    with pytest.raises(discord.LoginFailure):
        await asyncio.wait_for(client.login("not-the-token"), TIMEOUT)
    await client.close()


async def test_unknown_routes_are_recorded(fake: FakeDiscord, bot: DalleTestBot) -> None:
    with pytest.raises(discord.NotFound):
        await bot.http.request(discord.http.Route("GET", "/voice/regions"))
    assert fake.requests[-1].route == "unhandled"


async def test_fake_in_its_own_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeDiscordThread() as handle:
        fake = handle.fake
        monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base)
        monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url))
        client = DalleTestBot(int(fake.guild.id))
        task = await _start(client, fake.token)
        try:
            user = handle.call(lambda: fake.add_user("mason"))
            sent = await asyncio.to_thread(handle.call, fake.send_slash_command("dalle", {"prompt": "x"}, user=user))
            interaction, _ = await asyncio.wait_for(client.received.get(), TIMEOUT)
            await interaction.response.defer()
            assert handle.call(lambda: sent.callbacks) == [{"type": 5}]
        finally:
            await client.close()
            await asyncio.wait_for(task, TIMEOUT)


async def test_oversized_attachment_and_server_error(fake: FakeDiscord, bot: DalleTestBot) -> None:
    sent, interaction, _ = await _invoke(fake, bot, {"prompt": "huge"}, user=fake.add_user("mason"))
    assert interaction.filesize_limit == fake.attachment_size_limit
    await interaction.response.defer()
    fake.attachment_size_limit = 100
    with pytest.raises(discord.HTTPException) as caught:
        await interaction.followup.send(file=discord.File(io.BytesIO(make_png()), "big.png"))
    assert (caught.value.status, caught.value.code) == (413, 40005)

    fake.inject_server_error("POST /channels/{channel_id}/messages", status=503)  # 503 is not retried
    with pytest.raises(discord.DiscordServerError):
        await bot.get_partial_messageable(int(fake.channel.id)).send("down")


async def test_offline_guard_blocks_aiohttp(offline_guard: list[str]) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorError):
            await session.get("https://discord.com/api/v10/gateway")
    assert offline_guard == ["resolve 'discord.com'"]
    offline_guard.clear()


async def test_channel_history_is_newest_first_paged_and_never_ephemeral(fake: FakeDiscord,
                                                                         bot: DalleTestBot) -> None:
    sent, interaction, _ = await _invoke(fake, bot, {"prompt": "a secret"}, user=fake.add_user("ivy"))
    await interaction.response.send_message("only you can see this", ephemeral=True)
    channel = bot.get_partial_messageable(interaction.channel_id)
    posted = [await channel.send(f"post {k}") for k in range(5)]
    newest = [m async for m in channel.history(limit=3)]
    assert [m.content for m in newest] == ["post 4", "post 3", "post 2"]
    older = [m async for m in channel.history(limit=10, before=newest[-1])]
    assert [m.content for m in older] == ["post 1", "post 0"]  # the ephemeral reply is not listed
    assert all(m.author.id == bot.user.id for m in newest + older) and len(posted) == 5

    for role in fake.guild.roles.values():
        role.permissions &= ~Permissions.READ_MESSAGE_HISTORY
    with pytest.raises(discord.Forbidden):
        [m async for m in channel.history(limit=3)]
