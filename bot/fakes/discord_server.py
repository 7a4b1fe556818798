"""A fake Discord (REST API v10 plus gateway websocket) on 127.0.0.1.

The real ``discord.py`` client connects to it unchanged.  It is an aiohttp app
(aiohttp ships with discord.py; uvicorn has no websocket library installed
here) running on the caller's event loop, with all state in memory.

Pointing discord.py at it
-------------------------
discord.py 2.7 has two seams, both class attributes read at call time:

* REST: ``discord.http.Route.BASE`` (default ``https://discord.com/api/v10``).
  Every REST call, including interaction callbacks and webhook followups
  (``discord/webhook/async_.py`` uses the same ``Route``), builds its URL from it.
* Gateway: ``discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY`` (a
  ``yarl.URL``, default ``wss://gateway.discord.gg/``).  A plain ``Client`` or
  ``commands.Bot`` connects straight to it (only ``AutoShardedClient`` asks
  ``GET /gateway/bot``, which the fake also answers); after READY the client
  resumes at the ``resume_gateway_url`` the fake sends, which points back here.

So, before ``client.start()``::

    async with FakeDiscord() as fake:
        with fake.patch_discord_py():        # sets both, restores on exit
            client = MyBot(intents=discord.Intents.default())
            task = asyncio.create_task(client.start(fake.token))
            await asyncio.wait_for(client.wait_until_ready(), 5)
            inter = await fake.send_slash_command("dalle", {"prompt": "a cat"}, user=fake.add_user("mason"))
            await fake.wait_for(lambda f: inter.followups, timeout=5)

(in pytest, ``monkeypatch.setattr`` on the same two attributes does the same.)
Standalone, for running the bot offline: ``python -m bot.fakes.discord_server
--port 8082`` and a small control API (``POST /_fake/slash``; see
:func:`main`).

What it gets right for discord.py (see shared/reference/platform-apis.md Part 2)
--------------------------------------------------------------------------------
* JSON replies carry ``Content-Type: application/json`` exactly (discord.py's
  ``json_or_text`` parses nothing else) and ``Via: 1.1 google`` (without it a
  429 is taken for a Cloudflare ban and not retried), plus ``X-RateLimit-*``
  bucket headers.
* Login: ``GET /users/@me`` (401 for a wrong token becomes ``LoginFailure``)
  and ``GET /oauth2/applications/@me`` with every field ``AppInfo`` requires.
* Gateway: HELLO → (client heartbeats at once) HEARTBEAT_ACK, IDENTIFY (bad
  token: close 4004) → READY (guild stubs, ``session_id``,
  ``resume_gateway_url``, ``application``) then GUILD_CREATE per guild with
  channels, roles and members; sequence numbers per session; RESUME replays
  missed dispatches then sends RESUMED (unknown session: INVALID_SESSION);
  REQUEST_GUILD_MEMBERS answered with one GUILD_MEMBERS_CHUNK; with
  ``compress=zlib-stream`` frames are one shared zlib stream flushed with
  ``Z_SYNC_FLUSH`` like Discord's, otherwise plain TEXT frames.
* INTERACTION_CREATE payloads carry what discord.py requires (``id``, ``type``,
  ``token``, ``version``, ``application_id``, ``attachment_size_limit``) with
  real snowflakes, so ``Interaction.created_at``/``expires_at`` are right;
  option types come from the synced command schema.
* Interaction lifecycle: callback ``?with_response=1`` answers
  ``{"interaction": {...}, "resource": {...}}``; a second callback is 400/40060;
  a callback later than 3 s after dispatch or after expiry is 404/10062 (Unknown
  interaction); webhook calls with an expired token (15 min, or
  :meth:`FakeDiscord.expire`) are 401/50027 (Invalid Webhook Token); files over
  ``attachment_size_limit`` are 413/40005.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from aiohttp import WSMsgType, web

from bot.fakes.discord_records import (
    DiscordChannel,
    DiscordGuild,
    DiscordMember,
    DiscordRole,
    DiscordUser,
    FakeInteraction,
    Permissions,
    RecordedAttachment,
    RecordedMessage,
    RecordedRequest,
    snowflake,
)

__all__ = [
    "FakeDiscord",
    "FakeDiscordThread",
    "DiscordUser",
    "DiscordGuild",
    "DiscordChannel",
    "DiscordRole",
    "FakeInteraction",
    "RecordedMessage",
    "RecordedAttachment",
    "RecordedRequest",
    "Permissions",
    "snowflake",
]

_log = logging.getLogger(__name__)

API_PREFIX = "/api/v10"
TOKEN_LIFETIME_S = 15 * 60
INITIAL_RESPONSE_DEADLINE_S = 3.0
DEFAULT_ATTACHMENT_LIMIT = 10 * 1024 * 1024


@dataclasses.dataclass
class _Fault:
    route: str | Callable[[RecordedRequest], bool]
    status: int
    count: int
    body: dict[str, Any] | str
    headers: dict[str, str]
    hits: int = 0

    def matches(self, rec: RecordedRequest) -> bool:
        if self.hits >= self.count:
            return False
        if callable(self.route):
            return bool(self.route(rec))
        return self.route in ("*", rec.route)


@dataclasses.dataclass
class _LostAnswer:
    """Requests that are handled (a message is posted or edited) but whose answer is lost: the
    connection is dropped (``late`` None) or the answer held for ``late`` seconds."""

    route: str | Callable[[RecordedRequest], bool]
    count: int
    late: float | None
    hits: int = 0

    def matches(self, rec: RecordedRequest) -> bool:
        if self.hits >= self.count:
            return False
        return bool(self.route(rec)) if callable(self.route) else self.route in ("*", rec.route)


class _ApiError(Exception):
    def __init__(self, status: int, code: int, message: str, extra: dict[str, Any] | None = None) -> None:
        super().__init__(status, code, message)
        self.status = status
        self.body = {"message": message, "code": code, **(extra or {})}


def _unknown(what: str, code: int) -> _ApiError:
    return _ApiError(404, code, f"Unknown {what}")


@dataclasses.dataclass
class _GatewaySession:
    ws: web.WebSocketResponse
    session_id: str | None = None
    seq: int = 0
    zlib: Any = None
    identify: dict[str, Any] | None = None
    heartbeats: int = 0
    sent: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    async def send(self, payload: dict[str, Any]) -> None:
        data = json.dumps(payload, separators=(",", ":"))
        if self.zlib is not None:
            await self.ws.send_bytes(self.zlib.compress(data.encode()) + self.zlib.flush(zlib.Z_SYNC_FLUSH))
        else:
            await self.ws.send_str(data)


# ---------------------------------------------------------------------- the server


class FakeDiscord:
    """Fake Discord REST + gateway; see the module docstring.

    Use it on the event loop that runs the bot (``async with FakeDiscord() as
    fake``).  A default guild (``fake.guild``) with a text channel
    (``fake.channel``), an ``@everyone`` role, a ``Moderators`` role with
    Manage Messages (``fake.moderator_role``) and the bot as a member exists
    from the start.
    """

    def __init__(
        self,
        *,
        token: str = "fake-discord-bot-token",
        bot_username: str = "dallebot",
        heartbeat_interval: float = 41.25,
        zlib_stream: bool = True,
        initial_response_deadline: float | None = INITIAL_RESPONSE_DEADLINE_S,
        token_lifetime: float = TOKEN_LIFETIME_S,
        attachment_size_limit: int = DEFAULT_ATTACHMENT_LIMIT,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.token = token
        self.heartbeat_interval = heartbeat_interval
        self.zlib_stream = zlib_stream
        self.initial_response_deadline = initial_response_deadline
        self.token_lifetime = token_lifetime
        self.attachment_size_limit = attachment_size_limit
        self.host = host
        self.port = port
        self.started = time.time()

        self.application_id = snowflake()
        self.bot = DiscordUser(id=self.application_id, username=bot_username, bot=True)
        self.owner = DiscordUser(id=snowflake(), username="app_owner", global_name="App Owner")
        self.users: dict[str, DiscordUser] = {self.bot.id: self.bot, self.owner.id: self.owner}
        self.guilds: dict[str, DiscordGuild] = {}
        self.channels: dict[str, DiscordChannel] = {}
        self.messages: dict[str, RecordedMessage] = {}
        self.interactions: dict[str, FakeInteraction] = {}
        self.global_commands: list[dict[str, Any]] = []
        self.guild_commands: dict[str, list[dict[str, Any]]] = {}
        #: Bodies of every bulk-overwrite PUT, in order: ("global" or guild id, body).
        self.command_syncs: list[tuple[str, list[dict[str, Any]]]] = []
        self.requests: list[RecordedRequest] = []
        self.sessions: list[_GatewaySession] = []
        self.identifies: list[dict[str, Any]] = []
        #: The token the gateway takes at IDENTIFY when it differs from REST's (None: ``token``): a token
        #: reset between the login and the connection is closed with 4004.
        self.gateway_token: str | None = None
        #: False: the gateway answers 503 to websocket upgrades (a gateway outage; REST still works).
        self.gateway_available = True
        #: Gateway connections refused while it was unavailable.
        self.gateway_refused = 0
        self.resumes: list[dict[str, Any]] = []
        self._faults: list[_Fault] = []
        self._lost: list[_LostAnswer] = []
        self._incoming: dict[str, RecordedAttachment] = {}
        self._changed: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None

        self.guild = self.add_guild("Test Guild", owner=self.owner)
        self.channel = self.add_channel(self.guild, "image-gen")
        self.moderator_role = self.add_role(self.guild, "Moderators", Permissions.MANAGE_MESSAGES, position=1)

    # ------------------------------------------------------------------ lifecycle

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_base(self) -> str:
        """The value for ``discord.http.Route.BASE``."""
        return self.base_url + API_PREFIX

    @property
    def gateway_url(self) -> str:
        """The value (as ``yarl.URL``) for ``DiscordWebSocket.DEFAULT_GATEWAY``."""
        return f"ws://{self.host}:{self.port}/"

    async def start(self) -> FakeDiscord:
        self._changed = asyncio.Event()
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        self._add_routes(app.router)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        for session in list(self.sessions):
            if not session.ws.closed:
                await session.ws.close(code=1001)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeDiscord:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @contextlib.contextmanager
    def patch_discord_py(self) -> Iterator[None]:
        """Point discord.py's two seams here for the ``with`` block (process-wide)."""
        import yarl
        from discord.gateway import DiscordWebSocket
        from discord.http import Route

        old = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
        Route.BASE = self.api_base
        DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.gateway_url)
        try:
            yield
        finally:
            Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = old

    # ------------------------------------------------------------------ world building

    def add_user(self, username: str, *, global_name: str | None = None, guild: DiscordGuild | None = None,
                 roles: Sequence[DiscordRole] = (), dms_closed: bool = False) -> DiscordUser:
        """A user who is a member of ``guild`` (default: the default guild) with ``roles``."""
        user = DiscordUser(id=snowflake(), username=username, global_name=global_name or username.title(),
                           dms_closed=dms_closed)
        self.users[user.id] = user
        self.add_member(guild or self.guild, user, roles=roles)
        return user

    def add_member(self, guild: DiscordGuild, user: DiscordUser, *, roles: Sequence[DiscordRole] = ()) -> None:
        guild.members[user.id] = DiscordMember(user=user, role_ids=[r.id for r in roles], joined_at=time.time())

    def add_guild(self, name: str, *, owner: DiscordUser | None = None) -> DiscordGuild:
        gid = snowflake()
        guild = DiscordGuild(id=gid, name=name, owner_id=(owner or self.owner).id)
        guild.roles[gid] = DiscordRole(id=gid, name="@everyone", permissions=Permissions.EVERYONE_DEFAULT)
        bot_role = DiscordRole(id=snowflake(), name=self.bot.username, permissions=Permissions.BOT_DEFAULT,
                               position=1, managed=True)
        guild.roles[bot_role.id] = bot_role
        self.guilds[gid] = guild
        self.add_member(guild, self.bot, roles=[bot_role])
        self.add_member(guild, owner or self.owner)
        return guild

    def add_channel(self, guild: DiscordGuild, name: str) -> DiscordChannel:
        channel = DiscordChannel(id=snowflake(), name=name, guild_id=guild.id, position=len(guild.channels))
        guild.channels[channel.id] = channel
        self.channels[channel.id] = channel
        return channel

    def add_role(self, guild: DiscordGuild, name: str, permissions: int, *, position: int = 1) -> DiscordRole:
        role = DiscordRole(id=snowflake(), name=name, permissions=permissions, position=position)
        guild.roles[role.id] = role
        return role

    def dm_channel(self, user: DiscordUser) -> DiscordChannel:
        if user.dm_channel_id is None:
            channel = DiscordChannel(id=snowflake(), name=None, type=1, recipient=user)
            self.channels[channel.id] = channel
            user.dm_channel_id = channel.id
        return self.channels[user.dm_channel_id]

    # ------------------------------------------------------------------ scripting: events

    async def wait_until_identified(self, timeout: float = 5.0) -> _GatewaySession:
        """Wait for a gateway session that has IDENTIFYed (READY and GUILD_CREATEs sent)."""
        return await self.wait_for(lambda f: f._live_session(), timeout=timeout)

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        """Send a DISPATCH (op 0) to the live gateway session."""
        session = self._live_session()
        if session is None:
            raise RuntimeError("no identified gateway session: start the client and wait_until_identified()")
        await self._dispatch(session, event, data)

    async def send_slash_command(
        self,
        name: str,
        options: Mapping[str, Any] | None = None,
        *,
        user: DiscordUser,
        guild: DiscordGuild | None = None,
        channel: DiscordChannel | None = None,
        dm: bool = False,
        age: float = 0.0,
        locale: str = "en-US",
        require_registered: bool = True,
    ) -> FakeInteraction:
        """``user`` runs ``/name`` with ``options`` (``{"prompt": "a cat", "seed": 3}``).

        Option types come from the synced command (guild commands first, then
        global); an ATTACHMENT option takes ``(filename, bytes)`` and is served
        at a local CDN URL.  ``dm=True`` runs it in the user's DM with the bot.
        ``age`` backdates the interaction id by that many seconds (``age=16*60``:
        its token has already expired, as ``Interaction.is_expired()`` will say).
        """
        guild = None if dm else (guild or self.guild)
        channel = self.dm_channel(user) if dm else (channel or self.channel)
        command = self._find_command(name, guild)
        if command is None and require_registered:
            raise LookupError(f"/{name} is not registered (did the bot sync its command tree?)")
        data: dict[str, Any] = {"id": command["id"] if command else snowflake(), "name": name, "type": 1}
        if command is not None and command.get("guild_id"):
            data["guild_id"] = command["guild_id"]
        opts, resolved = self._build_options(command, dict(options or {}), channel)
        if opts:
            data["options"] = opts
        if resolved:
            data["resolved"] = resolved
        return await self._send_interaction(2, data, user=user, guild=guild, channel=channel, age=age,
                                            locale=locale)

    async def send_component(
        self,
        message: RecordedMessage,
        custom_id: str,
        *,
        user: DiscordUser,
        component_type: int = 2,
        values: list[str] | None = None,
        age: float = 0.0,
    ) -> FakeInteraction:
        """``user`` clicks the button ``custom_id`` (or picks ``values`` in a
        select menu) on ``message``, a message the bot sent."""
        if custom_id not in message.custom_ids:
            raise LookupError(f"message {message.id} has no component {custom_id!r} (has {message.custom_ids})")
        channel = self.channels[message.channel_id]
        guild = self.guilds.get(channel.guild_id) if channel.guild_id else None
        data: dict[str, Any] = {"custom_id": custom_id, "component_type": component_type}
        if values is not None:
            data["values"] = values
        return await self._send_interaction(3, data, user=user, guild=guild, channel=channel, age=age,
                                            message=message)

    async def redeliver(self, interaction: FakeInteraction) -> None:
        """Send the same INTERACTION_CREATE again: a duplicated gateway event."""
        await self.dispatch("INTERACTION_CREATE", interaction.payload)

    def expire(self, interaction: FakeInteraction) -> None:
        """Invalidate ``interaction``'s token: callbacks 404/10062, webhook
        calls (edit original, followups) 401/50027, as on Discord after 15 min."""
        interaction.expired = True

    async def force_reconnect(self) -> None:
        """Send op 7 RECONNECT: discord.py closes the socket and RESUMEs."""
        session = self._live_session()
        if session is not None:
            await session.send({"op": 7, "d": None, "s": None, "t": None})

    # ------------------------------------------------------------------ scripting: faults

    def inject_rate_limit(self, route: str | Callable[[RecordedRequest], bool] = "*", *, count: int = 1,
                          retry_after: float = 0.1, is_global: bool = False, scope: str = "user",
                          via: bool = True) -> _Fault:
        """Answer the next ``count`` requests on ``route`` (``"POST
        /channels/{channel_id}/messages"``, ``"*"`` or a predicate on
        :class:`RecordedRequest`) with 429 and ``retry_after`` seconds, as
        Discord does (JSON body, ``Retry-After``, ``X-RateLimit-*``, ``Via``).
        ``via=False`` mimics a Cloudflare ban: an HTML body and no ``Via``
        header, which discord.py raises on at once."""
        if via:
            body: dict[str, Any] | str = {"message": "You are being rate limited.", "retry_after": retry_after,
                                          "global": is_global}
            headers = {"Retry-After": str(max(1, round(retry_after))), "X-RateLimit-Scope": scope,
                       "X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "0",
                       "X-RateLimit-Reset-After": f"{retry_after:.3f}",
                       "X-RateLimit-Reset": f"{time.time() + retry_after:.3f}"}
            if is_global:
                headers["X-RateLimit-Global"] = "true"
        else:  # Cloudflare answers, not Discord: none of Discord's headers, Via included
            body, headers = "<html><body>error code: 1015</body></html>", {"Via": "", "X-RateLimit-Bucket": "",
                                                                          "X-RateLimit-Limit": "",
                                                                          "X-RateLimit-Remaining": "",
                                                                          "X-RateLimit-Reset": "",
                                                                          "X-RateLimit-Reset-After": ""}
        fault = _Fault(route, 429, count, body, headers)
        self._faults.append(fault)
        return fault

    def inject_server_error(self, route: str | Callable[[RecordedRequest], bool] = "*", *, status: int = 500,
                            count: int = 1) -> _Fault:
        """Answer the next ``count`` requests on ``route`` with ``status``.
        discord.py retries 500/502/504/524 after 1 + 2·try seconds."""
        fault = _Fault(route, status, count, {"message": "500: Internal Server Error", "code": 0}, {})
        self._faults.append(fault)
        return fault

    def inject_lost_answer(self, route: str | Callable[[RecordedRequest], bool] = "*", *, count: int = 1,
                           late: float | None = None) -> _LostAnswer:
        """Handle the next ``count`` requests on ``route`` as usual (the message is posted), then
        lose the answer: close the connection without one (a reset after the upload), or, with
        ``late`` seconds, answer only then (a client that gave up waiting never sees it)."""
        lost = _LostAnswer(route, count, late)
        self._lost.append(lost)
        return lost

    # ------------------------------------------------------------------ scripting: assertions

    async def wait_for(self, predicate: Callable[[FakeDiscord], Any], timeout: float = 5.0) -> Any:
        """Wait until ``predicate(self)`` is truthy (re-checked after each request
        and gateway message); return its value, or raise ``TimeoutError``."""
        assert self._changed is not None, "start() the fake first"

        async def poll() -> Any:
            while True:
                changed = self._changed
                assert changed is not None
                if result := predicate(self):
                    return result
                await changed.wait()

        return await asyncio.wait_for(poll(), timeout)

    def channel_messages(self, channel: DiscordChannel | str) -> list[RecordedMessage]:
        cid = channel if isinstance(channel, str) else channel.id
        return [m for m in self.messages.values() if m.channel_id == cid and not m.deleted]

    def requests_to(self, route: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.route == route]

    # ------------------------------------------------------------------ internals: helpers

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    def _live_session(self) -> _GatewaySession | None:
        return next((s for s in reversed(self.sessions) if s.session_id and not s.ws.closed), None)

    def _find_command(self, name: str, guild: DiscordGuild | None) -> dict[str, Any] | None:
        pools = ([self.guild_commands.get(guild.id, [])] if guild else []) + [self.global_commands]
        return next((c for pool in pools for c in pool if c["name"] == name and c.get("type", 1) == 1), None)

    def _build_options(self, command: dict[str, Any] | None, options: dict[str, Any],
                       channel: DiscordChannel) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        schema = {o["name"]: o for o in (command or {}).get("options", [])}
        if command is not None:
            unknown = set(options) - set(schema)
            missing = {n for n, o in schema.items() if o.get("required") and n not in options}
            if unknown or missing:
                raise ValueError(f"/{command['name']}: unknown options {sorted(unknown)}, missing {sorted(missing)}")
        out, resolved = [], {}
        for name, value in options.items():
            otype = schema.get(name, {}).get("type") or {str: 3, bool: 5, int: 4, float: 10}.get(type(value), 3)
            if otype == 11:  # ATTACHMENT
                filename, data = value
                att_id = snowflake()
                att = RecordedAttachment(id=att_id, filename=filename, data=data, content_type="image/png"
                                         if filename.endswith(".png") else "application/octet-stream",
                                         url=f"{self.base_url}/attachments/{channel.id}/{att_id}/{filename}")
                self._incoming[att_id] = att
                resolved.setdefault("attachments", {})[att_id] = {**att.payload(), "ephemeral": True}
                value = att_id
            elif otype == 6:  # USER
                member = self.users[value.id if isinstance(value, DiscordUser) else value]
                resolved.setdefault("users", {})[member.id] = member.payload()
                value = member.id
            out.append({"type": otype, "name": name, "value": value})
        return out, resolved

    async def _send_interaction(self, itype: int, data: dict[str, Any], *, user: DiscordUser,
                                guild: DiscordGuild | None, channel: DiscordChannel, age: float = 0.0,
                                locale: str = "en-US", message: RecordedMessage | None = None) -> FakeInteraction:
        created = time.time() - age
        iid = snowflake(created)
        payload: dict[str, Any] = {
            "id": iid, "application_id": self.application_id, "type": itype, "data": data,
            "token": "aW50ZXJhY3Rpb246" + secrets.token_urlsafe(48), "version": 1,
            "channel_id": channel.id, "channel": channel.payload(), "locale": locale, "entitlements": [],
            "attachment_size_limit": self.attachment_size_limit,
        }
        if guild is not None:
            member = guild.members.get(user.id)
            if member is None:
                raise LookupError(f"{user.username} is not a member of {guild.name}")
            payload.update({
                "guild_id": guild.id, "guild_locale": "en-US", "context": 0,
                "member": member.payload(permissions=guild.permissions_of(user.id)),
                "app_permissions": str(guild.permissions_of(self.bot.id)),
                "guild": {"id": guild.id, "locale": "en-US", "features": []},
                "authorizing_integration_owners": {"0": guild.id},
            })
        else:
            payload.update({"user": user.payload(), "context": 1, "app_permissions": str(Permissions.BOT_DEFAULT),
                            "authorizing_integration_owners": {"0": "0"}})
        if message is not None:
            payload["message"] = message.payload(self.users)
        inter = FakeInteraction(id=iid, token=payload["token"], type=itype, payload=payload, user=user,
                                guild_id=guild.id if guild else None, channel_id=channel.id, created=created)
        if message is not None:
            inter.original = message
        self.interactions[iid] = inter
        inter.dispatched_monotonic = time.monotonic()
        await self.dispatch("INTERACTION_CREATE", payload)
        return inter

    def _interaction_by_token(self, token: str, application_id: str) -> FakeInteraction:
        if application_id != self.application_id:
            raise _unknown("Webhook", 10015)
        inter = next((i for i in self.interactions.values() if i.token == token), None)
        if inter is None:
            raise _ApiError(401, 50027, "Invalid Webhook Token")
        if inter.expired or time.time() > inter.created + self.token_lifetime:
            raise _ApiError(401, 50027, "Invalid Webhook Token")
        if inter.missed_deadline:
            raise _unknown("Webhook", 10015)
        return inter

    # ------------------------------------------------------------------ internals: HTTP plumbing

    def _add_routes(self, router: web.UrlDispatcher) -> None:
        a = API_PREFIX
        table: list[tuple[str, str, Callable[..., Any]]] = [
            ("GET", "/gateway", self._get_gateway),
            ("GET", "/gateway/bot", self._get_gateway_bot),
            ("GET", "/users/@me", self._get_me),
            ("GET", "/users/{user_id}", self._get_user),
            ("POST", "/users/@me/channels", self._create_dm),
            ("GET", "/oauth2/applications/@me", self._get_application),
            ("GET", "/applications/@me", self._get_application),
            ("GET", "/applications/{application_id}/commands", self._get_commands),
            ("PUT", "/applications/{application_id}/commands", self._put_commands),
            ("GET", "/applications/{application_id}/guilds/{guild_id}/commands", self._get_commands),
            ("PUT", "/applications/{application_id}/guilds/{guild_id}/commands", self._put_commands),
            ("POST", "/interactions/{interaction_id}/{token}/callback", self._callback),
            ("GET", "/webhooks/{application_id}/{token}/messages/{message_id}", self._get_webhook_message),
            ("PATCH", "/webhooks/{application_id}/{token}/messages/{message_id}", self._edit_webhook_message),
            ("DELETE", "/webhooks/{application_id}/{token}/messages/{message_id}", self._delete_webhook_message),
            ("POST", "/webhooks/{application_id}/{token}", self._followup),
            ("GET", "/channels/{channel_id}", self._get_channel),
            ("POST", "/channels/{channel_id}/messages", self._post_channel_message),
            ("GET", "/channels/{channel_id}/messages", self._get_channel_messages),
            ("GET", "/channels/{channel_id}/messages/{message_id}", self._get_channel_message),
            ("PATCH", "/channels/{channel_id}/messages/{message_id}", self._edit_channel_message),
            ("DELETE", "/channels/{channel_id}/messages/{message_id}", self._delete_channel_message),
            ("GET", "/guilds/{guild_id}", self._get_guild),
            ("GET", "/guilds/{guild_id}/channels", self._get_guild_channels),
            ("GET", "/guilds/{guild_id}/roles", self._get_roles),
            ("GET", "/guilds/{guild_id}/members/{user_id}", self._get_member),
        ]
        for method, path, handler in table:
            router.add_route(method, a + path, self._rest(f"{method} {path}", handler))
        router.add_route("GET", "/", self._gateway)
        router.add_route("GET", "/attachments/{channel_id}/{attachment_id}/{filename}", self._cdn)
        router.add_route("POST", "/_fake/slash", self._control_slash)
        router.add_route("GET", "/_fake/state", self._control_state)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        try:
            return await handler(request)
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
            if request.path.startswith(API_PREFIX):
                _log.warning("fake Discord has no route for %s %s", request.method, request.path)
                self.requests.append(RecordedRequest(request.method, request.path[len(API_PREFIX):], "unhandled",
                                                     dict(request.query), None, [], 404))
                self._notify()
                return self._json(404, {"message": "404: Not Found", "code": 0})
            raise

    @staticmethod
    def _json(status: int, data: Any, headers: Mapping[str, str] | None = None,
              bucket: str = "fake") -> web.Response:
        now = time.time()
        base = {"Via": "1.1 google", "X-RateLimit-Bucket": bucket, "X-RateLimit-Limit": "5",
                "X-RateLimit-Remaining": "4", "X-RateLimit-Reset": f"{now + 1:.3f}",
                "X-RateLimit-Reset-After": "1.000"}
        base.update(headers or {})
        base = {k: v for k, v in base.items() if v}  # an empty value: leave that header out
        if status == 204:
            return web.Response(status=204, headers=base)
        if isinstance(data, str):
            return web.Response(status=status, text=data, content_type="text/html", headers=base)
        # Exactly "application/json": discord.py parses nothing else (no charset).
        return web.Response(status=status, body=json.dumps(data).encode(), content_type="application/json",
                            headers=base)

    def _rest(self, route: str, handler: Callable[..., Any]) -> Callable[[web.Request], Any]:
        bucket = format(abs(hash(route)) % (1 << 40), "x")

        async def endpoint(request: web.Request) -> web.Response:
            body: Any = None
            files: list[tuple[str, str, bytes]] = []
            ctype = request.headers.get("Content-Type", "")
            if ctype.startswith("multipart/form-data"):
                form = await request.post()
                for field, value in form.items():
                    if isinstance(value, web.FileField):
                        files.append((field, value.filename, value.file.read()))
                        value.file.close()  # (aiohttp closes it only for a handler that is not cancelled)
                    elif field == "payload_json":
                        body = json.loads(value)
            elif request.can_read_body:
                raw = await request.read()
                body = json.loads(raw) if raw else None
            rec = RecordedRequest(request.method, request.path[len(API_PREFIX):], route, dict(request.query),
                                  body, files)
            self.requests.append(rec)
            try:
                fault = next((f for f in self._faults if f.matches(rec)), None)
                if fault is not None:
                    fault.hits += 1
                    rec.status, rec.response = fault.status, fault.body
                    return self._json(fault.status, fault.body, fault.headers, bucket)
                if not route.split(" ")[1].startswith(("/interactions", "/webhooks")):
                    if request.headers.get("Authorization") != f"Bot {self.token}":
                        raise _ApiError(401, 0, "401: Unauthorized")
                status, data = handler(request, rec, **request.match_info)
            except _ApiError as e:
                status, data = e.status, e.body
            finally:
                self._notify()
            rec.status, rec.response = status, data
            lost = next((f for f in self._lost if f.matches(rec)), None)
            if lost is not None:
                lost.hits += 1
                if lost.late is None:  # handled, then the connection drops before any answer (aiohttp
                    assert request.transport is not None  # then finds it closed and sends nothing)
                    request.transport.abort()
                else:
                    await asyncio.sleep(lost.late)
            return self._json(status, data, bucket=bucket)

        return endpoint

    # ------------------------------------------------------------------ REST handlers

    def _get_gateway(self, request: web.Request, rec: RecordedRequest) -> tuple[int, Any]:
        return 200, {"url": self.gateway_url}

    def _get_gateway_bot(self, request: web.Request, rec: RecordedRequest) -> tuple[int, Any]:
        return 200, {"url": self.gateway_url, "shards": 1,
                     "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 14400000,
                                             "max_concurrency": 1}}

    def _get_me(self, request: web.Request, rec: RecordedRequest) -> tuple[int, Any]:
        return 200, {**self.bot.payload(), "verified": True, "mfa_enabled": False, "locale": "en-US"}

    def _get_user(self, request: web.Request, rec: RecordedRequest, user_id: str) -> tuple[int, Any]:
        user = self.users.get(user_id)
        if user is None:
            raise _unknown("User", 10013)
        return 200, user.payload()

    def _create_dm(self, request: web.Request, rec: RecordedRequest) -> tuple[int, Any]:
        user = self.users.get(str((rec.json or {}).get("recipient_id")))
        if user is None:
            raise _unknown("User", 10013)
        return 200, self.dm_channel(user).payload()

    def _get_application(self, request: web.Request, rec: RecordedRequest) -> tuple[int, Any]:
        return 200, {
            "id": self.application_id, "name": self.bot.username, "description": "fake application",
            "icon": None, "bot_public": True, "bot_require_code_grant": False, "owner": self.owner.payload(),
            "team": None, "verify_key": "0" * 64, "flags": 0, "summary": "", "type": None,
            "bot": self.bot.payload(), "interactions_endpoint_url": None, "redirect_uris": [],
            "approximate_guild_count": len(self.guilds), "tags": [],
        }

    def _check_app(self, application_id: str) -> None:
        if application_id != self.application_id:
            raise _ApiError(403, 50001, "Missing Access")

    def _get_commands(self, request: web.Request, rec: RecordedRequest, application_id: str,
                      guild_id: str | None = None) -> tuple[int, Any]:
        self._check_app(application_id)
        return 200, self.guild_commands.get(guild_id, []) if guild_id else self.global_commands

    def _put_commands(self, request: web.Request, rec: RecordedRequest, application_id: str,
                      guild_id: str | None = None) -> tuple[int, Any]:
        self._check_app(application_id)
        if guild_id is not None and guild_id not in self.guilds:
            raise _ApiError(403, 50001, "Missing Access")
        body = rec.json or []
        old = {(c["name"], c.get("type", 1)): c for c in
               (self.guild_commands.get(guild_id, []) if guild_id else self.global_commands)}
        stored = []
        for cmd in body:
            if not 1 <= len(cmd.get("name", "")) <= 32 or len(cmd.get("description", "")) > 100:
                raise _ApiError(400, 50035, "Invalid Form Body")
            key = (cmd["name"], cmd.get("type", 1))
            prev = old.get(key)
            new = {"type": 1, "description": "", "options": [], "default_member_permissions": None,
                   "dm_permission": True, "nsfw": False, **cmd, "application_id": self.application_id}
            comparable = {k: v for k, v in new.items() if k not in ("id", "version", "guild_id")}
            new["id"] = prev["id"] if prev else snowflake()
            same = prev is not None and comparable == {k: v for k, v in prev.items()
                                                     if k not in ("id", "version", "guild_id")}
            new["version"] = prev["version"] if same else snowflake()
            if guild_id is not None:
                new["guild_id"] = guild_id
            stored.append(new)
        if guild_id is None:
            self.global_commands = stored
        else:
            self.guild_commands[guild_id] = stored
        self.command_syncs.append((guild_id or "global", body))
        return 200, stored

    def _callback(self, request: web.Request, rec: RecordedRequest, interaction_id: str,
                  token: str) -> tuple[int, Any]:
        inter = self.interactions.get(interaction_id)
        if inter is None or inter.token != token:
            raise _unknown("interaction", 10062)
        late = (self.initial_response_deadline is not None
                and time.monotonic() - inter.dispatched_monotonic > self.initial_response_deadline)
        if inter.expired or time.time() > inter.created + self.token_lifetime or (late and not inter.acknowledged):
            inter.missed_deadline = inter.missed_deadline or (late and not inter.acknowledged)
            raise _unknown("interaction", 10062)
        if inter.acknowledged:
            raise _ApiError(400, 40060, "Interaction has already been acknowledged.")
        body = rec.json or {}
        rtype = body.get("type")
        data = body.get("data") or {}
        if rtype not in (4, 5, 6, 7, 8, 9, 10, 12):
            raise _ApiError(400, 50035, "Invalid Form Body")
        if rtype in (6, 7) and inter.type != 3:
            raise _ApiError(400, 40043, "Interaction has already been acknowledged.")
        inter.callbacks.append(body)
        inter.response_type = rtype
        result: dict[str, Any] = {"interaction": {"id": inter.id, "type": inter.type}}
        message: RecordedMessage | None = None
        if rtype in (4, 5):
            flags = int(data.get("flags", 0)) & RecordedMessage.EPHEMERAL
            message = self._new_message(inter.channel_id, "original", webhook=True, interaction=inter)
            message.flags = flags | (RecordedMessage.LOADING if rtype == 5 else 0)
            if rtype == 4:
                self._apply_message_body(message, data, rec.files)
            inter.original = message
            result["interaction"].update(response_message_id=message.id, response_message_loading=rtype == 5,
                                         response_message_ephemeral=bool(flags))
        elif rtype == 7 and inter.original is not None:
            message = inter.original
            self._edit(message, data, rec.files)
        elif rtype == 6:
            message = inter.original
        if message is not None:
            result["resource"] = {"type": rtype, "message": message.payload(self.users)}
        else:
            result["resource"] = {"type": rtype}
        return 200, result

    def _resolve_webhook_message(self, inter: FakeInteraction, message_id: str) -> RecordedMessage:
        if message_id == "@original":
            if inter.original is None or inter.original.deleted:
                raise _unknown("Message", 10008)
            return inter.original
        message = next((m for m in inter.followups if m.id == message_id and not m.deleted), None)
        if message is None:
            raise _unknown("Message", 10008)
        return message

    def _get_webhook_message(self, request: web.Request, rec: RecordedRequest, application_id: str, token: str,
                             message_id: str) -> tuple[int, Any]:
        inter = self._interaction_by_token(token, application_id)
        return 200, self._resolve_webhook_message(inter, message_id).payload(self.users)

    def _edit_webhook_message(self, request: web.Request, rec: RecordedRequest, application_id: str, token: str,
                              message_id: str) -> tuple[int, Any]:
        inter = self._interaction_by_token(token, application_id)
        message = self._resolve_webhook_message(inter, message_id)
        self._edit(message, rec.json or {}, rec.files)
        return 200, message.payload(self.users)

    def _delete_webhook_message(self, request: web.Request, rec: RecordedRequest, application_id: str,
                                token: str, message_id: str) -> tuple[int, Any]:
        inter = self._interaction_by_token(token, application_id)
        self._resolve_webhook_message(inter, message_id).deleted = True
        return 204, None

    def _followup(self, request: web.Request, rec: RecordedRequest, application_id: str,
                  token: str) -> tuple[int, Any]:
        inter = self._interaction_by_token(token, application_id)
        if not inter.acknowledged:
            raise _unknown("Webhook", 10015)
        body = rec.json or {}
        message = self._new_message(inter.channel_id, "followup", webhook=True, interaction=inter)
        message.flags = int(body.get("flags", 0)) & RecordedMessage.EPHEMERAL
        self._apply_message_body(message, body, rec.files)
        inter.followups.append(message)
        if rec.query.get("wait") in ("1", "true", "True"):
            return 200, message.payload(self.users)
        return 204, None

    def _channel(self, channel_id: str) -> DiscordChannel:
        channel = self.channels.get(channel_id)
        if channel is None:
            raise _unknown("Channel", 10003)
        return channel

    def _get_channel(self, request: web.Request, rec: RecordedRequest, channel_id: str) -> tuple[int, Any]:
        return 200, self._channel(channel_id).payload()

    def _post_channel_message(self, request: web.Request, rec: RecordedRequest,
                              channel_id: str) -> tuple[int, Any]:
        channel = self._channel(channel_id)
        if channel.deny_bot:
            raise _ApiError(403, 50013, "Missing Permissions")
        if channel.type == 1 and channel.recipient is not None and channel.recipient.dms_closed:
            raise _ApiError(403, 50007, "Cannot send messages to this user")
        if channel.guild_id is not None:
            perms = self.guilds[channel.guild_id].permissions_of(self.bot.id)
            needed = Permissions.VIEW_CHANNEL | Permissions.SEND_MESSAGES
            if rec.files:
                needed |= Permissions.ATTACH_FILES
            if perms & needed != needed:
                raise _ApiError(403, 50013, "Missing Permissions")
        message = self._new_message(channel_id, "channel")
        self._apply_message_body(message, rec.json or {}, rec.files)
        return 200, message.payload(self.users)

    def _get_channel_messages(self, request: web.Request, rec: RecordedRequest, channel_id: str) -> tuple[int, Any]:
        """Channel history, newest first (``limit`` 1-100, default 50; ``before``/``after`` ids). Only
        the bot's own messages exist here; ephemeral ones are never listed, as on Discord."""
        channel = self._channel(channel_id)
        if channel.deny_bot:
            raise _ApiError(403, 50013, "Missing Permissions")
        if channel.guild_id is not None:
            needed = Permissions.VIEW_CHANNEL | Permissions.READ_MESSAGE_HISTORY
            if self.guilds[channel.guild_id].permissions_of(self.bot.id) & needed != needed:
                raise _ApiError(403, 50013, "Missing Permissions")
        try:
            limit = int(rec.query.get("limit", 50))
        except ValueError:
            raise _ApiError(400, 50035, "Invalid Form Body") from None
        if not 1 <= limit <= 100:
            raise _ApiError(400, 50035, "Invalid Form Body")
        before, after = rec.query.get("before"), rec.query.get("after")
        found = [m for m in self.channel_messages(channel_id) if not m.ephemeral
                 and (before is None or int(m.id) < int(before)) and (after is None or int(m.id) > int(after))]
        found.sort(key=lambda m: int(m.id), reverse=True)
        return 200, [m.payload(self.users) for m in found[:limit]]

    def _channel_message(self, channel_id: str, message_id: str) -> RecordedMessage:
        message = self.messages.get(message_id)
        if message is None or message.deleted or message.channel_id != channel_id:
            raise _unknown("Message", 10008)
        return message

    def _get_channel_message(self, request: web.Request, rec: RecordedRequest, channel_id: str,
                             message_id: str) -> tuple[int, Any]:
        return 200, self._channel_message(channel_id, message_id).payload(self.users)

    def _edit_channel_message(self, request: web.Request, rec: RecordedRequest, channel_id: str,
                              message_id: str) -> tuple[int, Any]:
        message = self._channel_message(channel_id, message_id)
        self._edit(message, rec.json or {}, rec.files)
        return 200, message.payload(self.users)

    def _delete_channel_message(self, request: web.Request, rec: RecordedRequest, channel_id: str,
                                message_id: str) -> tuple[int, Any]:
        self._channel_message(channel_id, message_id).deleted = True
        return 204, None

    def _guild(self, guild_id: str) -> DiscordGuild:
        guild = self.guilds.get(guild_id)
        if guild is None:
            raise _unknown("Guild", 10004)
        return guild

    def _get_guild(self, request: web.Request, rec: RecordedRequest, guild_id: str) -> tuple[int, Any]:
        payload = self._guild(guild_id).payload(self.started)
        for key in ("channels", "members", "threads", "voice_states", "presences"):
            payload.pop(key)
        return 200, payload

    def _get_guild_channels(self, request: web.Request, rec: RecordedRequest, guild_id: str) -> tuple[int, Any]:
        return 200, [c.payload() for c in self._guild(guild_id).channels.values()]

    def _get_roles(self, request: web.Request, rec: RecordedRequest, guild_id: str) -> tuple[int, Any]:
        return 200, [r.payload() for r in self._guild(guild_id).roles.values()]

    def _get_member(self, request: web.Request, rec: RecordedRequest, guild_id: str,
                    user_id: str) -> tuple[int, Any]:
        member = self._guild(guild_id).members.get(user_id)
        if member is None:
            raise _unknown("Member", 10007)
        return 200, member.payload()

    # ---- message bodies

    def _new_message(self, channel_id: str, kind: str, *, webhook: bool = False,
                     interaction: FakeInteraction | None = None) -> RecordedMessage:
        channel = self.channels[channel_id]
        message = RecordedMessage(id=snowflake(), channel_id=channel_id, guild_id=channel.guild_id,
                                  author=self.bot, content="", created=time.time(), kind=kind,
                                  webhook_id=self.application_id if webhook else None,
                                  interaction_id=interaction.id if interaction else None)
        self.messages[message.id] = message
        return message

    def _attachments(self, message: RecordedMessage, body: dict[str, Any],
                     files: list[tuple[str, str, bytes]]) -> list[RecordedAttachment]:
        uploads = {field: (filename, data) for field, filename, data in files}
        if len(uploads) > 10:
            raise _ApiError(400, 50035, "Invalid Form Body")
        listed = body.get("attachments")
        if listed is None:  # a plain files upload: keep the ones already there
            listed = [{"id": i} for i in range(len(uploads))]
            keep = list(message.attachments)
        else:
            keep = []
        existing = {a.id: a for a in message.attachments}
        out = list(keep)
        for entry in listed:
            aid = str(entry.get("id"))
            if aid in existing:
                out.append(existing[aid])
                continue
            upload = uploads.get(f"files[{aid}]")
            if upload is None:
                raise _ApiError(400, 50035, "Invalid Form Body")
            filename, data = upload
            if len(data) > self.attachment_size_limit:
                raise _ApiError(413, 40005, "Request entity too large")
            new_id = snowflake()
            out.append(RecordedAttachment(
                id=new_id, filename=entry.get("filename", filename), data=data,
                content_type="image/png" if data.startswith(b"\x89PNG") else "application/octet-stream",
                url=f"{self.base_url}/attachments/{message.channel_id}/{new_id}/{filename}",
                description=entry.get("description")))
        return out

    def _apply_message_body(self, message: RecordedMessage, body: dict[str, Any],
                            files: list[tuple[str, str, bytes]]) -> None:
        content = body.get("content")
        if content is not None and len(content) > 2000:
            raise _ApiError(400, 50035, "Invalid Form Body")
        message.attachments = self._attachments(message, body, files)
        if content is not None:
            message.content = content
        for key in ("embeds", "components"):
            if key in body and body[key] is not None:
                setattr(message, key, body[key])

    def _edit(self, message: RecordedMessage, body: dict[str, Any], files: list[tuple[str, str, bytes]]) -> None:
        self._apply_message_body(message, body, files)
        message.flags &= ~RecordedMessage.LOADING
        message.edited = time.time()
        message.edits.append({"body": body, "files": [(f, n) for f, n, _ in files]})

    # ------------------------------------------------------------------ CDN and control API

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        aid = request.match_info["attachment_id"]
        att = self._incoming.get(aid) or next(
            (a for m in self.messages.values() for a in m.attachments if a.id == aid), None)
        if att is None:
            raise web.HTTPNotFound()
        return web.Response(body=att.data, content_type=att.content_type or "application/octet-stream")

    async def _control_slash(self, request: web.Request) -> web.Response:
        body = await request.json()
        user = next((u for u in self.users.values() if u.username == body["username"]), None)
        user = user or self.add_user(body["username"])
        inter = await self.send_slash_command(body.get("command", "dalle"), body.get("options", {}), user=user)
        return self._json(200, {"interaction_id": inter.id})

    async def _control_state(self, request: web.Request) -> web.Response:
        return self._json(200, {
            "commands": {"global": self.global_commands, **self.guild_commands},
            "messages": [{**m.payload(self.users), "kind": m.kind} for m in self.messages.values()],
            "interactions": [{"id": i.id, "callbacks": i.callbacks, "expired": i.expired}
                             for i in self.interactions.values()],
        })

    # ------------------------------------------------------------------ gateway

    async def _dispatch(self, session: _GatewaySession, event: str, data: dict[str, Any]) -> None:
        session.seq += 1
        payload = {"op": 0, "s": session.seq, "t": event, "d": data}
        session.sent.append(payload)
        await session.send(payload)
        self._notify()

    async def _gateway(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=0, autoping=True)
        if not self.gateway_available:
            self.gateway_refused += 1
            self._notify()
            return self._json(503, {"message": "gateway unavailable", "code": 0})
        if not ws.can_prepare(request).ok:
            return self._json(400, {"message": "expected a websocket upgrade", "code": 0})
        await ws.prepare(request)
        session = _GatewaySession(ws=ws)
        if self.zlib_stream and request.query.get("compress") == "zlib-stream":
            session.zlib = zlib.compressobj()
        self.sessions.append(session)
        await session.send({"op": 10, "d": {"heartbeat_interval": int(self.heartbeat_interval * 1000),
                                            "_trace": ["fake-gateway"]}, "s": None, "t": None})
        try:
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    continue
                await self._on_gateway_message(session, json.loads(msg.data))
        finally:
            self._notify()
        return ws

    async def _on_gateway_message(self, session: _GatewaySession, msg: dict[str, Any]) -> None:
        op, data = msg.get("op"), msg.get("d")
        if op == 1:  # HEARTBEAT
            session.heartbeats += 1
            await session.send({"op": 11, "d": None, "s": None, "t": None})
        elif op == 2:  # IDENTIFY
            self.identifies.append(data)
            if data.get("token") != (self.gateway_token or self.token):
                await session.ws.close(code=4004, message=b"Authentication failed.")
                return
            session.identify = data
            session.session_id = secrets.token_hex(16)
            await self._dispatch(session, "READY", {
                "v": 10, "user": {**self.bot.payload(), "verified": True, "mfa_enabled": False},
                "guilds": [{"id": g, "unavailable": True} for g in self.guilds],
                "session_id": session.session_id, "resume_gateway_url": self.gateway_url,
                "session_type": "normal", "private_channels": [], "relationships": [],
                "application": {"id": self.application_id, "flags": 0}, "shard": [0, 1], "_trace": [],
            })
            for guild in self.guilds.values():
                await self._dispatch(session, "GUILD_CREATE", guild.payload(self.started))
        elif op == 6:  # RESUME
            self.resumes.append(data)
            old = next((s for s in self.sessions if s.session_id == data.get("session_id")), None)
            if old is None or data.get("token") != self.token:
                await session.send({"op": 9, "d": False, "s": None, "t": None})
                return
            session.session_id, session.seq, session.sent = old.session_id, old.seq, old.sent
            session.identify = old.identify
            old.session_id = None
            for payload in [p for p in session.sent if p["s"] > (data.get("seq") or 0)]:
                await session.send(payload)
            await self._dispatch(session, "RESUMED", {"_trace": ["fake-gateway"]})
        elif op == 8:  # REQUEST_GUILD_MEMBERS
            guild = self.guilds.get(str(data.get("guild_id")))
            if guild is not None:
                await self._dispatch(session, "GUILD_MEMBERS_CHUNK", {
                    "guild_id": guild.id, "members": [m.payload() for m in guild.members.values()],
                    "chunk_index": 0, "chunk_count": 1, "nonce": data.get("nonce"), "not_found": [],
                })
        self._notify()


class FakeDiscordThread:
    """Run a :class:`FakeDiscord` on its own event loop in a daemon thread, for
    a bot that owns its event loop (run in another thread or driven by code
    the test does not control)::

        with FakeDiscordThread() as handle:
            fake = handle.fake
            user = handle.call(lambda: fake.add_user("mason"))
            interaction = handle.call(fake.send_slash_command("dalle", {"prompt": "a cat"}, user=user))

    :meth:`call` runs a coroutine, or a plain callable, on the fake's loop and
    returns its result; use it for every scripting call, since the fake's
    state belongs to that loop.
    """

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fake-discord", daemon=True)
        self.fake: FakeDiscord

    def call(self, work: Any, timeout: float = 10.0) -> Any:
        async def run() -> Any:
            return await work if asyncio.iscoroutine(work) else work()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def __enter__(self) -> FakeDiscordThread:
        self._thread.start()
        self.fake = self.call(FakeDiscord(**self._kwargs).start())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call(self.fake.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


def main(argv: list[str] | None = None) -> None:
    """Run the fake standalone.  Point the bot at it with ``Route.BASE =
    http://127.0.0.1:PORT/api/v10`` and ``DEFAULT_GATEWAY =
    yarl.URL("ws://127.0.0.1:PORT/")`` and the printed token; then::

        curl -X POST localhost:PORT/_fake/slash \\
             -d '{"username": "mason", "options": {"prompt": "a red fox"}}'
        curl localhost:PORT/_fake/state
    """
    parser = argparse.ArgumentParser(description="Run the fake Discord REST + gateway on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=8082)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    async def serve() -> None:
        async with FakeDiscord(port=args.port, initial_response_deadline=None) as fake:
            print(f"fake Discord REST at {fake.api_base}, gateway at {fake.gateway_url}")
            print(f"bot token {fake.token!r}, application id {fake.application_id}, guild {fake.guild.id}")
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
