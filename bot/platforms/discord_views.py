"""Persistent buttons of the Discord adapter: Cancel (on the queued message) and Re-roll (on the result).

Both are ``discord.ui.DynamicItem`` subclasses: the request id lives in the ``custom_id``
(``dallebot:cancel:<id>``, ``dallebot:reroll:<id>``), they never time out, and registering the classes
once (``client.add_dynamic_items``) makes clicks work after a restart too. The callbacks hand the
click to the adapter (``interaction.client.adapter``), which decides what it means.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import discord

if TYPE_CHECKING:
    from bot.platforms.discord import DiscordPlatform


def _adapter(interaction: discord.Interaction) -> DiscordPlatform:
    return interaction.client.adapter  # type: ignore[attr-defined]


class CancelButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=r"dallebot:cancel:(?P<id>[0-9]{1,18})"):
    def __init__(self, request_id: int) -> None:
        super().__init__(discord.ui.Button(label="Cancel", style=discord.ButtonStyle.secondary,
                                           custom_id=f"dallebot:cancel:{request_id}"))
        self.request_id = request_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Item[Any],
                             match: re.Match[str]) -> CancelButton:
        return cls(int(match["id"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await _adapter(interaction).on_cancel(interaction, self.request_id)


class RerollButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=r"dallebot:reroll:(?P<id>[0-9]{1,18})"):
    def __init__(self, request_id: int) -> None:
        super().__init__(discord.ui.Button(label="Re-roll", emoji="🎲", style=discord.ButtonStyle.primary,
                                           custom_id=f"dallebot:reroll:{request_id}"))
        self.request_id = request_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Item[Any],
                             match: re.Match[str]) -> RerollButton:
        return cls(int(match["id"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await _adapter(interaction).on_reroll(interaction, self.request_id)


def cancel_view(request_id: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(CancelButton(request_id))
    return view


def result_view(request_id: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(RerollButton(request_id))
    return view
