"""The Discord adapter (discord.py app_commands): ``/dalle``, buttons, status and moderator commands.

``/dalle prompt:<text> [images] [seed] [private]``
    Deferred at once (the 3-second rule), then stored through :func:`bot.platforms.admission.admit`
    with the interaction id as the external id: a duplicated INTERACTION_CREATE (discord.py does not
    dedupe) is one request. The deferred message then shows a refusal, or the queue position and ETA
    with a Cancel button (requester only); :meth:`DiscordPlatform.update_positions` edits it as the
    request moves. ``private``: the messages are ephemeral, and a late result goes by DM.

Delivery (the worker calls :meth:`DiscordPlatform.deliver` from its thread; the coroutine runs on the
client's event loop through ``asyncio.run_coroutine_threadsafe``)
    While the interaction token (15 minutes) has more than ``[discord] expiry_margin_seconds`` left,
    the deferred message is edited into the result: the images as attachments and a Re-roll button
    (a new request with a new seed from whoever clicks; limits apply). After that, or when Discord
    says the token is gone (401/404), it is a channel message that mentions the user (private: a DM).
    discord.py waits out 429s itself (``Retry-After``); one it does not (Cloudflare's ban page) is
    retried after its ``Retry-After``, or a minute. A missing channel, missing permissions, closed DMs
    or files over the upload limit fail without retry, and the request's message then shows that.
    A delivery that fails after its request may have been sent (timed out, connection lost, a 5xx) is
    a ``maybe_posted`` :class:`DeliveryError`: the worker looks for the result before posting again.
    A message whose token has run out is no longer followed.

Start-up and outages
    Discord unreachable or failing at start-up (no connection, 5xx, a gateway that refuses) does not stop
    the service: one warning, then the client keeps logging in and connecting in the background (the
    wait doubling from :data:`RECONNECT_MIN_S` to :data:`RECONNECT_MAX_S`) and answers /dalle once
    connected. Deliveries meanwhile fail as retryable (the worker tries again later); they need only
    the REST login, not the gateway. A token Discord refuses is a configuration error, raised at once.

Every command and click is acknowledged before the database is asked anything (Cancel: once the
database has taken more than :data:`ACK_WITHIN_S`), since Discord drops an interaction that is not
acknowledged within 3 seconds; a database that fails is answered with
:data:`bot.platforms.text.QUEUE_UNAVAILABLE`, never with "thinking…" for ever.

``/dalle-status``: queue length and an ETA from the measured throughput.
``/dalle-mod queue|approve|reject|ban``: for members with a role named in ``[discord]
moderator_roles`` or the Manage Messages permission, in the guilds of ``moderator_guild_ids`` (default:
``guild_ids``) only, since the commands act on the whole queue; actions go through :mod:`bot.moderation`.

Commands are synced at start only when their definition changed: a hash of the command payload is
kept in the ``cursors`` table per application and scope (guild or global).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import hashlib
import json
import logging
import math
import random
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import aiohttp
import discord
from discord import app_commands

from bot import moderation
from bot.config import ConfigError, DiscordConfig
from bot.platforms import text as texts
from bot.platforms.admission import Admission, Check, IntakeEvent, admit
from bot.platforms.base import Delivery, DeliveryError
from bot.platforms.discord_views import CancelButton, RerollButton, cancel_view, result_view
from storage.errors import IllegalTransition, NotFound
from storage.platform_state import throughput
from storage.queue import Queue
from storage.records import RequestRecord
from storage.states import TERMINAL, Status

_log = logging.getLogger(__name__)

NO_MENTIONS = discord.AllowedMentions.none()
DELIVERY_TIMEOUT_S = 300.0
# After a crash mid-delivery, how many of the bot's latest messages where a result goes are searched
# for it (one request to Discord; a busier channel than this may get the result twice).
RECOVERY_LOOKBACK = 100
#: Longest message text Discord takes.
MESSAGE_LIMIT = 2000
#: A click whose work (database) takes longer than this is acknowledged first, then answered:
#: Discord drops an interaction not acknowledged within 3 seconds.
ACK_WITHIN_S = 2.0
#: Waits between two tries to log in to Discord, or to make the first gateway connection, while it
#: cannot be reached: doubled at each failure, from the first to the second (seconds).
RECONNECT_MIN_S = 2.0
RECONNECT_MAX_S = 300.0
#: The one line for a token Discord refuses (it never names the token itself); {} says where.
TOKEN_REFUSED = ("Discord refused the bot token ({}): check [discord] token "
                 "(or the DALLEBOT_DISCORD_TOKEN environment variable)")


@dataclass
class Tracked:
    """A request whose interaction this process answered: its token is good for 15 minutes."""

    interaction: discord.Interaction
    text: str = ""
    done: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class DalleClient(discord.Client):
    """The discord.py client: the command tree and the persistent buttons."""

    def __init__(self, adapter: DiscordPlatform, **kwargs: Any) -> None:
        intents = discord.Intents.none()
        intents.guilds = True  # roles and channels of the guilds (moderator role names)
        kwargs.setdefault("allowed_mentions", NO_MENTIONS)
        super().__init__(intents=intents, **kwargs)
        self.adapter = adapter
        self.tree = app_commands.CommandTree(self)
        adapter.build_commands(self.tree)

    async def setup_hook(self) -> None:
        self.add_dynamic_items(CancelButton, RerollButton)
        await self.adapter.sync_commands()

    async def on_ready(self) -> None:
        self.adapter._on_ready()


class DiscordPlatform:
    name = "discord"
    poll_interval: float | None = None  # event-driven: the gateway pushes interactions

    def __init__(
        self,
        cfg: DiscordConfig,
        queue: Queue,
        *,
        max_prompt_chars: int = 280,
        default_images: int = 4,
        checks: Sequence[Check] = (),
        client_options: dict[str, Any] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.queue = queue
        self.max_prompt_chars = max_prompt_chars
        self.default_images = min(default_images, cfg.max_images)
        self.checks = list(checks)
        self.rng = rng or random.Random()
        self.client = DalleClient(self, **(client_options or {}))
        self.tracked: dict[int, Tracked] = {}
        self._seen: OrderedDict[int, None] = OrderedDict()
        self._allowed: dict[str, set[str]] = {}
        for entry in cfg.allowed_channels:
            guild, _, channel = entry.partition(":")
            self._allowed.setdefault(guild, set()).add(channel)
        self._loop: asyncio.AbstractEventLoop | None = None
        # A private loop and its thread, when no service runs this adapter (see _own_loop).
        self._own: tuple[asyncio.AbstractEventLoop, threading.Thread] | None = None
        self._own_lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None
        self._updater: asyncio.Task[None] | None = None
        self._stopping = False
        self._started = False
        self._stop_event: asyncio.Event | None = None
        self._connect_failed: asyncio.Event | None = None
        self._connect_error = ""
        self._logged_in = False  # REST works (delivery); the gateway (intake) may still be connecting
        self._connected_once = False
        self._announce = False  # a start-up warning was logged: say when Discord is back
        self.synced: list[str] = []  # scopes synced at the last start (for logs and tests)
        #: Every platform of the app (set by open_app), so /dalle-mod reject can tell an X user too.
        self.platforms: dict[str, Any] | None = None

    # ---- lifecycle (IntakeSource) ---------------------------------------------------------

    def _apply_overrides(self) -> None:
        if self.cfg.api_base_url:
            discord.http.Route.BASE = self.cfg.api_base_url.rstrip("/")
        if self.cfg.gateway_url:
            import yarl
            from discord.gateway import DiscordWebSocket

            DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.cfg.gateway_url)

    async def start(self, *, intake: bool, ready_timeout: float = 60.0) -> None:
        """``intake``: connect to the gateway and take commands; else log in for REST only (what a
        worker-only process needs to deliver).

        Discord unreachable or failing (no connection, 5xx, a gateway that does not answer) does not
        stop the start: one warning, then the client keeps trying in the background (waits doubling
        from :data:`RECONNECT_MIN_S` up to :data:`RECONNECT_MAX_S`) and answers /dalle once connected;
        deliveries meanwhile fail as retryable. A token Discord refuses (401 at login, close 4004) is
        a configuration error, raised at once (:class:`bot.config.ConfigError`)."""
        self._apply_overrides()
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._started = False
        self._stop_event = asyncio.Event()
        self._connect_failed = asyncio.Event()
        self._logged_in = False
        try:
            await asyncio.wait_for(self._login(), ready_timeout)
        except discord.LoginFailure:
            raise ConfigError(TOKEN_REFUSED.format("401 Unauthorized at login")) from None
        except Exception as exc:  # unreachable, 5xx, timed out, commands not synced (database down)
            _log.warning("Discord: cannot log in yet (%s); the service runs without Discord and keeps trying "
                         "in the background%s", _reason(exc), "; /dalle is answered once connected" if intake else "")
            self._announce = True
            self._task = asyncio.create_task(self._keep_trying(intake, logged_in=False), name="discord-client")
            self._task.add_done_callback(self._client_ended)
            if intake:
                self._updater = asyncio.create_task(self._update_loop(), name="discord-positions")
            self._started = True
            return
        self._started = True
        if not intake:
            return
        self._task = asyncio.create_task(self._keep_trying(intake, logged_in=True), name="discord-client")
        self._task.add_done_callback(self._client_ended)
        ready = asyncio.create_task(self.client.wait_until_ready())
        failed = asyncio.create_task(self._connect_failed.wait())
        done, _ = await asyncio.wait({self._task, ready, failed}, timeout=ready_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        failed.cancel()
        if ready not in done:
            if self._task in done:  # gave up for good before READY (a refused token, intents)
                exc = self._task.exception()
                if isinstance(exc, discord.ConnectionClosed) and exc.code == 4004:
                    raise ConfigError(TOKEN_REFUSED.format("gateway close 4004")) from None
                self._task.result()  # raises it
            _log.warning("Discord: cannot connect to the gateway yet%s; the service runs and keeps trying in the "
                         "background; /dalle is answered once connected",
                         f" ({self._connect_error})" if self._connect_error else " (no answer)")
            self._announce = True
        self._updater = asyncio.create_task(self._update_loop(), name="discord-positions")
        self._started = True

    async def _login(self) -> None:
        """Log in (REST: ``GET /users/@me``, the application, the command sync); after a failure the
        HTTP session is closed, so that the next try starts a fresh one (and none is left open)."""
        try:
            await self.client.login(self.cfg.token)
        except BaseException:
            await self._discard_session()
            raise
        self._logged_in = True

    async def _discard_session(self) -> None:
        self._logged_in = False
        with contextlib.suppress(Exception):
            await self.client.http.close()
        # the session owned the connector (closed with it): the next login makes a new one
        self.client.http.connector = discord.utils.MISSING

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less when the adapter is stopped meanwhile."""
        assert self._stop_event is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), seconds)

    async def _keep_trying(self, intake: bool, *, logged_in: bool) -> None:
        """The client's life: log in (until it works), then (intake) keep the gateway connected.
        discord.py reconnects by itself once it has had a session, but not when the very first
        connection fails: that, and the login, are retried here with a capped exponential backoff."""
        delay = RECONNECT_MIN_S
        while not logged_in:
            await self._pause(delay)
            if self._stopping:
                return
            try:
                await self._login()
                logged_in = True
            except discord.LoginFailure:
                _log.error("%s; not trying again until the service is restarted",
                           TOKEN_REFUSED.format("401 Unauthorized at login"))
                return
            except Exception as exc:
                if self._stopping:
                    return
                delay = min(delay * 2, RECONNECT_MAX_S)
                _log.info("Discord: still cannot log in (%s); next try in %.1fs", _reason(exc), delay)
        if not intake:
            if self._announce:
                _log.warning("Discord: logged in; delivering results again")
                self._announce = False
            return
        delay = RECONNECT_MIN_S
        with _quiet_first_reconnects(self):
            while not self._stopping:
                try:
                    await self.client.connect(reconnect=True)
                    return  # closed (stop)
                except Exception as exc:
                    if self._stopping or self.client.is_closed():
                        raise  # given up for good (discord.py closed the client): _client_ended says so
                    # The first connection failed (discord.py needs a first session to reconnect).
                    self._connect_error = _reason(exc)
                    assert self._connect_failed is not None
                    self._connect_failed.set()
                    _log.info("Discord: cannot connect to the gateway (%s); next try in %.1fs",
                              self._connect_error, delay)
                await self._pause(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)

    def _on_ready(self) -> None:
        self._connected_once = True
        if self._announce:
            _log.warning("Discord: connected; /dalle is answered again")
            self._announce = False

    def _client_ended(self, task: asyncio.Task[None]) -> None:
        """discord.py reconnects by itself, but gives up for good on some errors (a reset token: close
        4004; intents not allowed: 4014). Nothing answers /dalle after that: say so loudly."""
        if task.cancelled() or not self._started or self._stopping:  # during start, start() raises it
            return
        exc = task.exception()
        if exc is not None:
            _log.error("the Discord client stopped for good (%s: %s); /dalle and the buttons go unanswered "
                       "until the service is restarted", type(exc).__name__, exc)

    async def poll(self) -> int:
        return 0

    async def stop(self) -> None:
        self._stopping = True
        if self._stop_event is not None:
            self._stop_event.set()  # a login or connection retry waiting its turn: no more tries
        if self._updater is not None:
            self._updater.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._updater
        await self.client.close()
        if self._task is not None:
            if self._task.done() and not self._task.cancelled() and self._task.exception() is not None:
                return  # it ended with an error long ago, reported then (_client_ended)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._task, 10)

    # ---- commands -------------------------------------------------------------------------

    def build_commands(self, tree: app_commands.CommandTree[Any]) -> None:
        adapter = self
        max_images = self.cfg.max_images

        async def dalle(interaction, prompt, images=None, seed=None, private=False):  # type: ignore[no-untyped-def]
            await adapter.on_dalle(interaction, prompt, images, seed, private)

        # Real objects, not strings: discord.py reads these to build the options, and the image
        # count's upper bound comes from the settings.
        dalle.__annotations__ = {
            "interaction": discord.Interaction, "prompt": app_commands.Range[str, 1, 2000],
            "images": Optional[app_commands.Range[int, 1, max_images]],
            "seed": Optional[app_commands.Range[int, 0, 2**31 - 1]], "private": bool, "return": None,
        }
        described = app_commands.describe(
            prompt="What to draw", images=f"How many images (1-{max_images})",
            seed="A seed, to get the same images again", private="Only you see the result")(dalle)
        tree.command(name="dalle", description="Draw images from a text prompt")(described)

        @tree.command(name="dalle-status", description="How long the image queue is")
        async def status(interaction: discord.Interaction) -> None:
            await adapter.on_status(interaction)

        mod = app_commands.Group(name="dalle-mod", description="Moderate the image queue", guild_only=True)

        @mod.command(name="queue", description="Requests waiting or held for review")
        async def mod_queue(interaction: discord.Interaction) -> None:
            if await adapter.require_moderator(interaction):
                await adapter.on_mod_queue(interaction)

        @mod.command(name="approve", description="Let a held request go on")
        async def mod_approve(interaction: discord.Interaction, request_id: int) -> None:
            if await adapter.require_moderator(interaction):
                await adapter.on_mod_action(interaction, "approve", request_id, None)

        @mod.command(name="reject", description="Refuse a request")
        async def mod_reject(interaction: discord.Interaction, request_id: int, reason: str | None = None) -> None:
            if await adapter.require_moderator(interaction):
                await adapter.on_mod_action(interaction, "reject", request_id, reason)

        @mod.command(name="ban", description="Stop taking requests from a user")
        async def mod_ban(interaction: discord.Interaction, user: discord.User, reason: str | None = None) -> None:
            if await adapter.require_moderator(interaction):
                await adapter.on_mod_ban(interaction, user, reason)

        tree.add_command(mod)

    async def sync_commands(self) -> None:
        """Sync the command tree, for each configured guild (or globally), only if it changed."""
        tree = self.client.tree
        scopes: list[discord.Object | None] = [discord.Object(int(g)) for g in self.cfg.guild_ids] or [None]
        self.synced = []
        for guild in scopes:
            if guild is not None:
                tree.copy_global_to(guild=guild)
            payload = [c.to_dict(tree) for c in tree.get_commands(guild=guild)]
            digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
            scope = str(guild.id) if guild is not None else "global"
            name = f"discord:commands:{self.client.application_id}:{scope}"
            if await asyncio.to_thread(self.queue.get_cursor, name) == digest:
                continue
            await tree.sync(guild=guild)
            await asyncio.to_thread(self.queue.set_cursor, name, digest)
            self.synced.append(scope)
            _log.info("synced Discord commands (%s)", scope)

    # ---- intake -------------------------------------------------------------------------

    def _first_time(self, interaction_id: int) -> bool:
        """False for an interaction this process has seen (a duplicated gateway event)."""
        if interaction_id in self._seen:
            return False
        self._seen[interaction_id] = None
        while len(self._seen) > 10_000:
            self._seen.popitem(last=False)
        return True

    def channel_allowed(self, guild_id: int | None, channel_id: int | None) -> bool:
        allowed = self._allowed.get(str(guild_id)) if guild_id is not None else None
        return not allowed or str(channel_id) in allowed

    async def on_dalle(self, interaction: discord.Interaction, prompt: str, images: int | None, seed: int | None,
                       private: bool) -> None:
        if not self._first_time(interaction.id):
            return
        if not self.channel_allowed(interaction.guild_id, interaction.channel_id):
            with contextlib.suppress(discord.HTTPException):
                await interaction.response.send_message(texts.CHANNEL_NOT_ALLOWED, ephemeral=True)
            return
        try:
            await interaction.response.defer(thinking=True, ephemeral=private)
        except discord.HTTPException:  # acknowledged by another process (a duplicate), or too late
            return
        event = self._event(interaction, texts.extract_discord_prompt(prompt), images or self.default_images, seed,
                            {"private": private, "kind": "slash"})
        await self._admit_and_answer(interaction, event)

    async def _admit_and_answer(self, interaction: discord.Interaction, event: IntakeEvent) -> None:
        try:
            adm = await asyncio.to_thread(admit, self.queue, event, max_chars=self.max_prompt_chars,
                                          checks=self.checks)
        except Exception:  # the database is down (or a bug): say so rather than "thinking" for ever
            _log.exception("could not take Discord request %s", interaction.id)
            with contextlib.suppress(discord.HTTPException):
                await interaction.edit_original_response(content=texts.INTAKE_UNAVAILABLE)
            return
        await self._answer(interaction, adm)

    def _event(self, interaction: discord.Interaction, prompt: str, n_images: int, seed: int | None,
               options: dict[str, Any]) -> IntakeEvent:
        user = interaction.user
        return IntakeEvent(
            platform=self.name, external_id=str(interaction.id), author_id=str(user.id),
            author_name=user.name, prompt_raw=prompt,
            channel_id=str(interaction.channel_id) if interaction.channel_id else None,
            guild_id=str(interaction.guild_id) if interaction.guild_id else None,
            n_images=max(1, min(n_images, self.cfg.max_images)), seed=seed, options=options,
        )

    async def _answer(self, interaction: discord.Interaction, adm: Admission) -> None:
        """Edit the deferred message: a refusal, or the queue position with a Cancel button."""
        if not adm.created:
            return  # stored before: whoever stored it answers
        if not adm.accepted:
            with contextlib.suppress(discord.HTTPException):
                await interaction.edit_original_response(content=adm.refusal or texts.GENERIC_REFUSAL)
            return
        tracked = Tracked(interaction)
        self.tracked[adm.request.id] = tracked
        await self._refresh(adm.request.id, tracked, await asyncio.to_thread(self._rate))

    # ---- position updates -----------------------------------------------------------------

    def _rate(self) -> float:
        return throughput(self.queue.db, clock=self.queue.clock)

    def _eta(self, position: int | None, rate: float) -> float | None:
        return None if position is None or rate <= 0 else (position + 1) / rate

    async def _refresh(self, request_id: int, tracked: Tracked, rate: float) -> None:
        try:
            rec = await asyncio.to_thread(self.queue.get, request_id)
            position = await asyncio.to_thread(self.queue.position, request_id)
        except NotFound:
            self.tracked.pop(request_id, None)
            return
        if rec.status == Status.POSTING:
            return  # delivery edits the message (or, from another process, posts in the channel)
        if rec.status == Status.POSTED:
            # Delivered by another process (worker machine, `worker --drain`), which could only post
            # in the channel or DM: close this message. Delivery from this process untracked it first.
            self.tracked.pop(request_id, None)
            async with tracked.lock:
                if not tracked.done:
                    tracked.done = True
                    try:
                        await tracked.interaction.edit_original_response(
                            content=texts.discord_status_line("posted", None, None), view=None)
                    except discord.HTTPException as exc:
                        _log.info("cannot edit the queue message of request %d: %s", request_id, exc)
            return
        text = texts.discord_status_line(rec.status.value, position, self._eta(position, rate))
        async with tracked.lock:
            if tracked.done or text == tracked.text:
                return
            view = cancel_view(request_id) if rec.status in (Status.QUEUED, Status.HELD) else None
            try:
                await tracked.interaction.edit_original_response(content=text, view=view)
                tracked.text = text
            except discord.HTTPException as exc:
                _log.info("cannot edit the queue message of request %d: %s", request_id, exc)
                if exc.status in (401, 404):
                    tracked.done = True
        if rec.status in TERMINAL or tracked.done:
            self.tracked.pop(request_id, None)

    async def update_positions(self) -> None:
        """Edit every tracked request's message whose text changed (position, status)."""
        margin = self.cfg.expiry_margin_seconds
        rate = await asyncio.to_thread(self._rate)
        for rid, tracked in list(self.tracked.items()):
            left = _seconds_left(tracked.interaction)
            if left <= 0:  # the token is gone: nothing can edit this message any more
                self.tracked.pop(rid, None)
                continue
            if left < margin:
                continue  # delivery will fall back to the channel; keep quiet until then
            await self._refresh(rid, tracked, rate)

    async def _update_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.position_update_seconds)
            try:
                await self.update_positions()
            except Exception:  # keep updating: one bad round must not end the loop
                _log.exception("updating Discord queue positions failed")

    # ---- buttons --------------------------------------------------------------------------

    def _cancel_for(self, request_id: int, user_id: str) -> str | None:
        """(Worker thread) Cancel ``request_id`` for the user who clicked: None when it is cancelled,
        else what to tell them."""
        try:
            rec = self.queue.get(request_id)
            if rec.platform != self.name or rec.author_id != user_id:
                return "Only the person who asked can cancel this request."
            try:
                self.queue.cancel(request_id, actor=f"discord:{user_id}", reason="cancelled by the requester")
            except IllegalTransition:
                return texts.cannot_cancel(self.queue.get(request_id).status.value)
        except NotFound:
            return "That request no longer exists."
        except Exception:  # the database is down: say so (the queued message stays as it is)
            _log.exception("cannot cancel request %d", request_id)
            return texts.QUEUE_UNAVAILABLE
        return None

    async def on_cancel(self, interaction: discord.Interaction, request_id: int) -> None:
        # Answered at once when the database answers in time; otherwise acknowledged first (a
        # deferred update of the clicked message), so the click does not fail (Discord's 3 seconds).
        work = asyncio.ensure_future(asyncio.to_thread(self._cancel_for, request_id, str(interaction.user.id)))
        deferred = False
        try:
            told = await asyncio.wait_for(asyncio.shield(work), ACK_WITHIN_S)
        except TimeoutError:
            with contextlib.suppress(discord.HTTPException):
                await interaction.response.defer()
                deferred = True
            told = await work
        if told is not None:
            with contextlib.suppress(discord.HTTPException):
                if deferred:
                    await interaction.followup.send(told, ephemeral=True)
                else:
                    await interaction.response.send_message(told, ephemeral=True)
            return
        cancelled = texts.discord_status_line("cancelled", None, None)
        try:
            if deferred:
                await interaction.edit_original_response(content=cancelled, view=None)
            else:
                await interaction.response.edit_message(content=cancelled, view=None)
        except discord.HTTPException as exc:  # the position updates will show it (the entry is kept)
            _log.info("cannot answer the Cancel click on request %d: %s", request_id, exc)
            return
        tracked = self.tracked.pop(request_id, None)
        if tracked is not None:
            tracked.done = True

    async def on_reroll(self, interaction: discord.Interaction, request_id: int) -> None:
        if not self._first_time(interaction.id):
            return
        if not self.channel_allowed(interaction.guild_id, interaction.channel_id):
            await interaction.response.send_message(texts.CHANNEL_NOT_ALLOWED, ephemeral=True)
            return
        # Acknowledged before the database is asked anything (Discord's 3 seconds). A private
        # result is an ephemeral message (or a DM, private anyway): its re-roll stays ephemeral.
        clicked = interaction.message
        if not await self._defer(interaction, ephemeral=bool(clicked is not None and clicked.flags.ephemeral)):
            return
        try:
            original = await asyncio.to_thread(self.queue.get, request_id)
        except NotFound:
            await self._edit_answer(interaction, "That request no longer exists.")
            return
        except Exception:
            await self._queue_unavailable(interaction, f"re-roll of request {request_id}")
            return
        private = bool(original.options.get("private"))
        seed = self.rng.randrange(2**31)
        while seed == original.seed:
            seed = self.rng.randrange(2**31)
        event = self._event(interaction, original.prompt_raw, original.n_images, seed,
                            {"private": private, "kind": "reroll", "reroll_of": request_id})
        await self._admit_and_answer(interaction, event)

    # ---- status and moderation ------------------------------------------------------------

    async def on_status(self, interaction: discord.Interaction) -> None:
        def read() -> tuple[dict[str, int], float]:
            return self.queue.stats(), self._rate()

        if not await self._defer(interaction, ephemeral=True):
            return
        try:
            stats, rate = await asyncio.to_thread(read)
        except Exception:
            await self._queue_unavailable(interaction, "/dalle-status")
            return
        waiting, drawing = stats["queued"], stats["running"]
        eta = None if rate <= 0 else (waiting + 1) / rate
        speed = f"{rate * 3600:.0f} requests/hour" if rate > 0 else "not measured yet"
        await self._edit_answer(
            interaction, f"Queue: {waiting} waiting, {drawing} being drawn. Throughput: {speed}. "
                         f"A new request would be ready in {texts.eta_text(eta)}.")

    def moderation_guilds(self) -> set[str]:
        return set(self.cfg.moderator_guild_ids or self.cfg.guild_ids)

    def is_moderator(self, interaction: discord.Interaction) -> bool:
        if interaction.guild_id is None or str(interaction.guild_id) not in self.moderation_guilds():
            return False
        perms = interaction.permissions
        if perms.manage_messages or perms.administrator:
            return True
        roles = getattr(interaction.user, "roles", [])
        return any(role.name in self.cfg.moderator_roles for role in roles)

    async def require_moderator(self, interaction: discord.Interaction) -> bool:
        if self.is_moderator(interaction):
            return True
        if interaction.guild_id is None:
            text = texts.NOT_IN_GUILD
        elif str(interaction.guild_id) not in self.moderation_guilds():
            text = texts.NOT_A_MODERATION_GUILD
        else:
            text = texts.NOT_A_MODERATOR
        await interaction.response.send_message(text, ephemeral=True)
        return False

    def _actor(self, interaction: discord.Interaction) -> str:
        return f"discord-moderator:{interaction.user.id}"

    async def on_mod_queue(self, interaction: discord.Interaction) -> None:
        if not await self._defer(interaction, ephemeral=True):
            return
        try:
            recs = await asyncio.to_thread(self.queue.list, status=[Status.QUEUED.value, Status.HELD.value],
                                           limit=15)
        except Exception:
            await self._queue_unavailable(interaction, "/dalle-mod queue")
            return
        if not recs:
            await self._edit_answer(interaction, "Nothing is waiting.")
            return
        lines = [f"#{r.id} {r.status.value} {r.user_ref}: `{texts.shorten(r.prompt.replace('`', 'ˋ'), 80)}`"
                 for r in recs]
        await self._edit_answer(interaction, "\n".join(lines)[:1900])

    async def on_mod_action(self, interaction: discord.Interaction, action: str, request_id: int,
                            reason: str | None) -> None:
        # Acknowledge first: a rejection tells the requester on their platform (REST calls, maybe a
        # rate-limit wait), which can take longer than the 3 s an interaction may go unanswered.
        if not await self._defer(interaction, ephemeral=True):
            return
        try:
            rec = await asyncio.to_thread(moderation.act, self.queue, action, request_id,
                                          actor=self._actor(interaction), reason=reason,
                                          platforms=self.platforms or {self.name: self})
            text = f"Request #{rec.id} is now {rec.status.value}."
        except (IllegalTransition, NotFound) as exc:
            text = str(exc)
        except Exception:
            await self._queue_unavailable(interaction, f"/dalle-mod {action} {request_id}")
            return
        await self._edit_answer(interaction, text)

    async def on_mod_ban(self, interaction: discord.Interaction, user: discord.User, reason: str | None) -> None:
        if not await self._defer(interaction, ephemeral=True):
            return
        try:
            await asyncio.to_thread(moderation.ban, self.queue, f"{self.name}:{user.id}",
                                    actor=self._actor(interaction), reason=reason)
        except Exception:
            await self._queue_unavailable(interaction, f"/dalle-mod ban {user.id}")
            return
        await self._edit_answer(interaction, f"{user.mention} can no longer make requests.")

    # ---- answering an interaction whose work needs the database ----------------------------

    @staticmethod
    async def _defer(interaction: discord.Interaction, *, ephemeral: bool) -> bool:
        """Acknowledge at once ("thinking…"), so that the database's time does not count against
        Discord's 3 seconds; False when Discord refused (already acknowledged elsewhere, too late)."""
        try:
            await interaction.response.defer(ephemeral=ephemeral, thinking=True)
        except discord.HTTPException:
            return False
        return True

    @staticmethod
    async def _edit_answer(interaction: discord.Interaction, text: str) -> None:
        try:
            await interaction.edit_original_response(content=text)
        except discord.HTTPException as exc:
            _log.info("cannot answer interaction %s: %s", interaction.id, exc)

    async def _queue_unavailable(self, interaction: discord.Interaction, what: str) -> None:
        """The database failed (down, or a bug): say so rather than leave "thinking…" for ever."""
        _log.exception("cannot answer %s", what)
        await self._edit_answer(interaction, texts.QUEUE_UNAVAILABLE)

    # ---- delivery -------------------------------------------------------------------------

    def _own_loop(self) -> None:
        """No event loop runs this adapter (``dallebot worker --drain``): start a private loop in a
        daemon thread and log in there for REST only (channel or DM delivery)."""
        with self._own_lock:
            if self._loop is not None:
                return
            loop = asyncio.new_event_loop()

            def run() -> None:
                try:
                    loop.run_forever()
                finally:
                    loop.run_until_complete(loop.shutdown_default_executor())
                    loop.close()

            thread = threading.Thread(target=run, name="discord-delivery", daemon=True)
            thread.start()
            self._own = (loop, thread)
            try:
                asyncio.run_coroutine_threadsafe(self.start(intake=False), loop).result(60)
            except Exception as exc:
                self.close()
                raise DeliveryError(f"cannot log in to Discord: {exc}") from exc

    def close(self) -> None:
        """Log out and stop the private loop started by :meth:`_own_loop` (if any)."""
        if self._own is None:
            return
        loop, thread = self._own
        try:
            asyncio.run_coroutine_threadsafe(self.stop(), loop).result(30)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(30)
            self._own = self._loop = None

    def _run(self, coro: Any, *, posting: bool = False) -> Any:
        """Run ``coro`` on the client's loop from the worker's thread and wait for it. ``posting``:
        ``coro`` posts, so a failure after its request may have been sent (timed out, connection
        lost) is a :class:`DeliveryError` with ``maybe_posted``."""
        if self._loop is None:
            try:
                self._own_loop()
            except DeliveryError:
                coro.close()
                raise
        loop = self._loop
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or loop.is_closed() or running is loop:
            coro.close()
            if running is loop:
                raise RuntimeError("Discord delivery must be called from a worker thread, not the event loop")
            raise DeliveryError("the Discord client is not running in this process")
        if not self._logged_in or self.client.is_closed():
            coro.close()
            # Not lost: the request is tried again (with backoff) once the client is back.
            raise DeliveryError("not connected to Discord (it could not be reached; the client keeps trying)"
                                if not self.client.is_closed() else "the Discord client is closed")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(DELIVERY_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            future.cancel()  # its request may have gone out: the result may be posted
            raise DeliveryError("Discord delivery timed out", maybe_posted=posting) from None
        except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError) as exc:  # Discord unreachable
            # Only a connection never made is sure to have posted nothing: one lost after the upload
            # (reset, no answer) may have left the result posted.
            raise DeliveryError(f"cannot reach Discord: {_reason(exc)}",
                                maybe_posted=posting and not _not_sent(exc)) from exc

    def deliver(self, request: RequestRecord, images: list[Path]) -> Delivery:
        return self._run(self._deliver(request, [Path(p) for p in images]), posting=True)

    def find_delivery(self, request: RequestRecord) -> Delivery | None:
        return self._run(self._find(request))

    @staticmethod
    def _files(request: RequestRecord, images: list[Path]) -> list[discord.File]:
        return [discord.File(p, filename=f"dalle-{request.id}-{k + 1}{p.suffix or '.png'}")
                for k, p in enumerate(images[:10])]

    async def _deliver(self, request: RequestRecord, images: list[Path]) -> Delivery:
        if not images:
            raise DeliveryError("no images to post", permanent=True)
        caption = texts.discord_result(request.prompt, request.seed)
        tracked = self.tracked.get(request.id)
        if tracked is not None and _seconds_left(tracked.interaction) > self.cfg.expiry_margin_seconds:
            async with tracked.lock:
                tracked.done = True
                try:
                    msg = await tracked.interaction.edit_original_response(
                        content=caption, attachments=self._files(request, images), view=result_view(request.id))
                    self.tracked.pop(request.id, None)
                    return Delivery(reply_id=str(msg.id), reply_url=msg.jump_url)
                except discord.RateLimited as exc:
                    tracked.done = False  # not delivered: the position updates go on
                    raise _delivery_error(exc) from exc
                except discord.HTTPException as exc:
                    if exc.status not in (401, 404):
                        # Not delivered (a retry comes, or the request fails): the updates go on, so
                        # the message ends showing what became of it, not "Sending the images…".
                        tracked.done = False
                        raise _delivery_error(exc) from exc
                    _log.info("interaction token of request %d is gone (%s): posting in the channel",
                              request.id, exc.status)
                except BaseException:
                    tracked.done = False
                    raise
        self.tracked.pop(request.id, None)
        try:
            if request.options.get("private"):
                user = await self.client.fetch_user(int(request.author_id))
                msg = await user.send(content=caption, files=self._files(request, images),
                                      view=result_view(request.id))
            else:
                if not request.channel_id:
                    raise DeliveryError("no channel to post the result in", permanent=True)
                channel = self.client.get_partial_messageable(int(request.channel_id))
                msg = await channel.send(
                    content=texts.discord_result(request.prompt, request.seed, f"<@{request.author_id}>"),
                    files=self._files(request, images), view=result_view(request.id),
                    allowed_mentions=discord.AllowedMentions(everyone=False, roles=False,
                                                             users=[discord.Object(int(request.author_id))]))
        except (discord.HTTPException, discord.RateLimited) as exc:
            raise _delivery_error(exc) from exc
        return Delivery(reply_id=str(msg.id), reply_url=msg.jump_url)

    def deliver_refusal(self, request: RequestRecord, message: str) -> Delivery:
        """A moderator rejected ``request``: say so in its message, or in the channel (DM if private)."""
        return self._run(self._refuse(request, message), posting=True)

    async def _refuse(self, request: RequestRecord, message: str) -> Delivery:
        mention = f"<@{request.author_id}> "
        message = texts.shorten(message, MESSAGE_LIMIT - len(mention))  # a moderator's reason can be long
        tracked = self.tracked.pop(request.id, None)
        if tracked is not None and _seconds_left(tracked.interaction) > 0:
            async with tracked.lock:
                tracked.done = True
                try:
                    msg = await tracked.interaction.edit_original_response(content=message, view=None)
                    return Delivery(reply_id=str(msg.id), reply_url=msg.jump_url)
                except discord.RateLimited as exc:
                    raise _delivery_error(exc) from exc
                except discord.HTTPException as exc:
                    if exc.status not in (401, 404):  # the edit may have gone through: do not post twice
                        raise _delivery_error(exc) from exc
                    # the token is gone: fall back to the channel
        try:
            if request.options.get("private"):
                user = await self.client.fetch_user(int(request.author_id))
                msg = await user.send(content=message)
            elif request.channel_id:
                msg = await self.client.get_partial_messageable(int(request.channel_id)).send(
                    content=mention + message,
                    allowed_mentions=discord.AllowedMentions(users=[discord.Object(int(request.author_id))]))
            else:
                raise DeliveryError("no channel to post the refusal in", permanent=True)
        except (discord.HTTPException, discord.RateLimited) as exc:
            raise _delivery_error(exc) from exc
        return Delivery(reply_id=str(msg.id), reply_url=msg.jump_url)

    async def _find(self, request: RequestRecord) -> Delivery | None:
        """After a crash mid-delivery: were the images already posted? The interaction's own message
        when its token lives in this process; otherwise the bot's recent messages where the result
        goes (the channel, or the DM for a private request), whichever process posted them: the
        images' file names carry the request id. None means post again."""
        msg = await self._answered_interaction(request) or await self._posted_result(request)
        if msg is None:
            return None
        self.tracked.pop(request.id, None)
        return Delivery(reply_id=str(msg.id), reply_url=msg.jump_url)

    async def _answered_interaction(self, request: RequestRecord) -> discord.Message | None:
        tracked = self.tracked.get(request.id)
        if tracked is None:
            return None
        try:
            msg = await tracked.interaction.original_response()
        except discord.HTTPException:
            return None
        return msg if msg.attachments else None

    async def _posted_result(self, request: RequestRecord) -> discord.Message | None:
        prefix = f"dalle-{request.id}-"
        try:
            if request.options.get("private"):
                channel: Any = await (await self.client.fetch_user(int(request.author_id))).create_dm()
            elif request.channel_id:
                channel = self.client.get_partial_messageable(int(request.channel_id))
            else:
                return None
            me = self.client.user.id if self.client.user else None
            async for msg in channel.history(limit=RECOVERY_LOOKBACK):
                if msg.author.id == me and any(a.filename.startswith(prefix) for a in msg.attachments):
                    return msg
        except (discord.HTTPException, discord.RateLimited) as exc:
            # No history permission, a deleted channel, a rate limit: posting again is the safe side
            # of "at least once".
            _log.info("cannot look for an earlier reply to request %d (%s): posting it again", request.id, exc)
        return None


def _reason(exc: BaseException) -> str:
    """One line on why a login or connection failed. discord.py's first gateway connection that fails
    surfaces as an AttributeError (it has no session to resume) raised while handling the real error."""
    if isinstance(exc, AttributeError) and exc.__context__ is not None:
        exc = exc.__context__
    text = " ".join(str(exc).split()) or ("no answer in time" if isinstance(exc, TimeoutError) else "no details")
    return f"{type(exc).__name__}: {text}"[:300]


class _FirstReconnects(logging.Filter):
    """Drops discord.py's 'Attempting a reconnect' tracebacks until the first connection: the adapter
    logs its own line for those tries."""

    def __init__(self, adapter: DiscordPlatform) -> None:
        super().__init__()
        self.adapter = adapter

    def filter(self, record: logging.LogRecord) -> bool:
        return self.adapter._connected_once or not str(record.msg).startswith("Attempting a reconnect")


@contextlib.contextmanager
def _quiet_first_reconnects(adapter: DiscordPlatform) -> Any:
    logger = logging.getLogger("discord.client")
    quiet = _FirstReconnects(adapter)
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _seconds_left(interaction: discord.Interaction) -> float:
    return (interaction.expires_at - dt.datetime.now(dt.UTC)).total_seconds()


#: Seconds to wait after a 429 that says nothing about when to come back.
RATE_LIMIT_FALLBACK_S = 60.0


def _retry_after(exc: discord.HTTPException) -> float:
    """When a 429 that discord.py did not wait out itself (Cloudflare's ban page, which has no Via
    header; or still limited after its retries) allows the next try: its Retry-After, else a minute.
    Retrying at once would only prolong a Cloudflare ban."""
    headers = getattr(exc.response, "headers", None) or {}
    try:
        seconds = float(headers.get("Retry-After", ""))
    except ValueError:
        return RATE_LIMIT_FALLBACK_S
    return seconds if math.isfinite(seconds) and seconds > 0 else RATE_LIMIT_FALLBACK_S


def _delivery_error(exc: discord.HTTPException | discord.RateLimited) -> DeliveryError:
    if isinstance(exc, discord.RateLimited):
        return DeliveryError(f"Discord rate limit: {exc}", retry_after=exc.retry_after)
    if exc.status == 429:
        return DeliveryError(f"Discord rate limit (429): {exc.text[:200]}", retry_after=_retry_after(exc))
    if exc.status in (400, 403, 404, 413):
        # Missing permissions, closed DMs, deleted channel, file too large: retrying will not help.
        return DeliveryError(f"Discord refused the result ({exc.status}/{exc.code}): {exc.text}", permanent=True)
    # A 5xx may come after Discord acted on the request (discord.py has even sent it again after a
    # 500/502/504): the result may be posted.
    return DeliveryError(f"Discord error {exc.status}: {exc.text}", maybe_posted=exc.status >= 500)


def _not_sent(exc: BaseException) -> bool:
    """Whether a connection error certainly came before the request was sent (no connection made)."""
    return isinstance(exc, (aiohttp.ClientConnectorError, ConnectionRefusedError,
                            aiohttp.ConnectionTimeoutError))
