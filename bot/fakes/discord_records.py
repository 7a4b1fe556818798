"""Records of the fake Discord's world and of what the bot sent it.

Plain dataclasses with the ``payload()`` each renders as Discord's JSON, used
by :mod:`bot.fakes.discord_server` and read by tests (``FakeInteraction``,
``RecordedMessage``, ``RecordedAttachment``, ``RecordedRequest``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import re
import struct
import time
from collections.abc import Mapping
from typing import Any

__all__ = [
    "DiscordUser",
    "DiscordRole",
    "DiscordChannel",
    "DiscordMember",
    "DiscordGuild",
    "RecordedAttachment",
    "RecordedMessage",
    "FakeInteraction",
    "RecordedRequest",
    "Permissions",
    "snowflake",
    "DISCORD_EPOCH_MS",
]

DISCORD_EPOCH_MS = 1420070400000
_seq = itertools.count(1)

def snowflake(unix_s: float | None = None) -> str:
    """A Discord snowflake for ``unix_s`` (default now): discord.py derives
    ``created_at`` (and an interaction's ``expires_at``) from it."""
    ms = int((time.time() if unix_s is None else unix_s) * 1000) - DISCORD_EPOCH_MS
    return str((ms << 22) | (next(_seq) & 0x3FFFFF))


def _iso(unix_s: float) -> str:
    return dt.datetime.fromtimestamp(unix_s, dt.UTC).isoformat()


class Permissions:
    """The permission bits the bot cares about (Discord's values)."""

    ADMINISTRATOR = 1 << 3
    MANAGE_CHANNELS = 1 << 4
    VIEW_CHANNEL = 1 << 10
    SEND_MESSAGES = 1 << 11
    MANAGE_MESSAGES = 1 << 13
    EMBED_LINKS = 1 << 14
    ATTACH_FILES = 1 << 15
    READ_MESSAGE_HISTORY = 1 << 16
    USE_APPLICATION_COMMANDS = 1 << 31
    SEND_MESSAGES_IN_THREADS = 1 << 38
    ALL = (1 << 51) - 1
    EVERYONE_DEFAULT = (VIEW_CHANNEL | SEND_MESSAGES | EMBED_LINKS | ATTACH_FILES | READ_MESSAGE_HISTORY
                        | USE_APPLICATION_COMMANDS)
    BOT_DEFAULT = EVERYONE_DEFAULT | SEND_MESSAGES_IN_THREADS


# ---------------------------------------------------------------------- records


@dataclasses.dataclass
class DiscordUser:
    id: str
    username: str
    global_name: str | None = None
    bot: bool = False
    #: ``POST /channels/{dm}/messages`` to this user fails with 403/50007.
    dms_closed: bool = False
    dm_channel_id: str | None = None

    @property
    def mention(self) -> str:
        return f"<@{self.id}>"

    def payload(self) -> dict[str, Any]:
        return {"id": self.id, "username": self.username, "global_name": self.global_name, "discriminator": "0",
                "avatar": None, "bot": self.bot, "public_flags": 0, "flags": 0, "banner": None,
                "accent_color": None, "avatar_decoration_data": None}


@dataclasses.dataclass
class DiscordRole:
    id: str
    name: str
    permissions: int
    position: int = 0
    managed: bool = False

    def payload(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "permissions": str(self.permissions), "position": self.position,
                "color": 0, "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
                "hoist": False, "managed": self.managed, "mentionable": False, "flags": 0, "icon": None,
                "unicode_emoji": None, "description": None}


@dataclasses.dataclass
class DiscordChannel:
    id: str
    name: str | None
    type: int = 0  # 0 guild text, 1 DM
    guild_id: str | None = None
    position: int = 0
    recipient: DiscordUser | None = None
    #: Posting here fails with 403/50013 Missing Permissions.
    deny_bot: bool = False

    def payload(self) -> dict[str, Any]:
        if self.type == 1:
            assert self.recipient is not None
            return {"id": self.id, "type": 1, "last_message_id": None, "flags": 0,
                    "recipients": [self.recipient.payload()]}
        return {"id": self.id, "type": self.type, "guild_id": self.guild_id, "name": self.name,
                "position": self.position, "permission_overwrites": [], "nsfw": False, "parent_id": None,
                "topic": None, "last_message_id": None, "rate_limit_per_user": 0, "flags": 0}


@dataclasses.dataclass
class DiscordMember:
    user: DiscordUser
    role_ids: list[str]
    joined_at: float
    nick: str | None = None

    def payload(self, permissions: int | None = None) -> dict[str, Any]:
        out = {"user": self.user.payload(), "roles": list(self.role_ids), "joined_at": _iso(self.joined_at),
               "nick": self.nick, "avatar": None, "premium_since": None, "deaf": False, "mute": False,
               "pending": False, "flags": 0, "communication_disabled_until": None}
        if permissions is not None:
            out["permissions"] = str(permissions)
        return out


@dataclasses.dataclass
class DiscordGuild:
    id: str
    name: str
    owner_id: str
    channels: dict[str, DiscordChannel] = dataclasses.field(default_factory=dict)
    roles: dict[str, DiscordRole] = dataclasses.field(default_factory=dict)
    members: dict[str, DiscordMember] = dataclasses.field(default_factory=dict)

    @property
    def everyone(self) -> DiscordRole:
        return self.roles[self.id]

    def permissions_of(self, user_id: str) -> int:
        if user_id == self.owner_id:
            return Permissions.ALL
        member = self.members.get(user_id)
        perms = self.everyone.permissions
        for rid in member.role_ids if member else ():
            perms |= self.roles[rid].permissions
        return Permissions.ALL if perms & Permissions.ADMINISTRATOR else perms

    def payload(self, joined_at: float) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "icon": None, "splash": None, "discovery_splash": None,
            "banner": None, "description": None, "owner_id": self.owner_id, "afk_channel_id": None,
            "afk_timeout": 300, "verification_level": 0, "default_message_notifications": 0,
            "explicit_content_filter": 0, "features": [], "mfa_level": 0, "system_channel_id": None,
            "system_channel_flags": 0, "rules_channel_id": None, "vanity_url_code": None, "premium_tier": 0,
            "premium_subscription_count": 0, "preferred_locale": "en-US", "nsfw_level": 0,
            "premium_progress_bar_enabled": False, "joined_at": _iso(joined_at), "large": False,
            "unavailable": False, "member_count": len(self.members),
            "roles": [r.payload() for r in self.roles.values()],
            "channels": [c.payload() for c in self.channels.values()],
            "members": [m.payload() for m in self.members.values()],
            "emojis": [], "stickers": [], "threads": [], "voice_states": [], "presences": [],
            "stage_instances": [], "guild_scheduled_events": [], "soundboard_sounds": [],
        }


@dataclasses.dataclass
class RecordedAttachment:
    id: str
    filename: str
    data: bytes
    content_type: str | None
    url: str
    description: str | None = None

    def payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "filename": self.filename, "size": len(self.data), "url": self.url,
                               "proxy_url": self.url, "content_type": self.content_type,
                               "description": self.description}
        if self.data.startswith(b"\x89PNG\r\n\x1a\n") and len(self.data) >= 24:
            out["width"], out["height"] = struct.unpack(">II", self.data[16:24])
        return out


@dataclasses.dataclass
class RecordedMessage:
    """A message the bot created (channel post, interaction response or followup)."""

    id: str
    channel_id: str
    guild_id: str | None
    author: DiscordUser
    content: str
    created: float
    kind: str  # "channel", "original" (interaction response) or "followup"
    attachments: list[RecordedAttachment] = dataclasses.field(default_factory=list)
    embeds: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    components: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    flags: int = 0
    webhook_id: str | None = None
    interaction_id: str | None = None
    edits: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    edited: float | None = None
    deleted: bool = False

    EPHEMERAL = 1 << 6
    LOADING = 1 << 7

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & self.EPHEMERAL)

    @property
    def loading(self) -> bool:
        return bool(self.flags & self.LOADING)

    @property
    def custom_ids(self) -> list[str]:
        return [c["custom_id"] for row in self.components for c in row.get("components", []) if "custom_id" in c]

    def payload(self, users: Mapping[str, DiscordUser]) -> dict[str, Any]:
        mentioned = [users[u].payload() for u in dict.fromkeys(re.findall(r"<@!?(\d+)>", self.content))
                     if u in users]
        out: dict[str, Any] = {
            "id": self.id, "channel_id": self.channel_id, "type": 20 if self.kind == "original" else 0,
            "content": self.content, "author": self.author.payload(),
            "attachments": [a.payload() for a in self.attachments], "embeds": self.embeds,
            "mentions": mentioned, "mention_roles": [], "mention_everyone": False, "pinned": False, "tts": False,
            "timestamp": _iso(self.created), "edited_timestamp": None if self.edited is None else _iso(self.edited),
            "flags": self.flags, "components": self.components,
        }
        if self.guild_id is not None:
            out["guild_id"] = self.guild_id
        if self.webhook_id is not None:
            out["webhook_id"] = self.webhook_id
            out["application_id"] = self.webhook_id
        return out


@dataclasses.dataclass
class FakeInteraction:
    """An interaction the fake sent, and everything the bot did with it."""

    id: str
    token: str
    type: int  # 2 application command, 3 component
    payload: dict[str, Any]
    user: DiscordUser
    guild_id: str | None
    channel_id: str
    created: float
    dispatched_monotonic: float = 0.0
    #: Callback bodies, in order ({"type": 5, "data": {...}}).
    callbacks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    response_type: int | None = None
    original: RecordedMessage | None = None
    followups: list[RecordedMessage] = dataclasses.field(default_factory=list)
    #: Set by :meth:`FakeDiscord.expire` (token invalid before 15 minutes).
    expired: bool = False
    missed_deadline: bool = False

    @property
    def acknowledged(self) -> bool:
        return self.response_type is not None

    @property
    def deferred(self) -> bool:
        return self.response_type in (5, 6)


@dataclasses.dataclass
class RecordedRequest:
    method: str
    path: str  # without /api/v10
    route: str  # "POST /channels/{channel_id}/messages"
    query: dict[str, str]
    json: Any
    files: list[tuple[str, str, bytes]]  # (field, filename, bytes)
    status: int = 0
    response: Any = None
