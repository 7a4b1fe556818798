"""Prompt extraction from platform text, and the texts the bot sends back. Pure functions, no I/O.

X replies never contain URLs (a post with a URL costs 20x more) and never echo the prompt (it could
carry @mentions or links the bot would then spread); every X reply carries the request id, which
also keeps two replies from having the same text (X refuses duplicate content).
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence

# ---- prompt extraction ------------------------------------------------------------------------

_LEADING_MENTIONS = re.compile(r"^(?:[\s\u200b-\u200f\u2060\ufeff]*[@＠]\w{1,15}\b[:,]?)+")
_URL = re.compile(r"(?i)\b(?:https?://|www\.)\S+")


def extract_x_prompt(text: str, display_text_range: Sequence[int] | None = None) -> str:
    """The prompt of a mention: the displayed text (without X's ``@parent`` reply prefix) with the
    leading @mentions and every URL removed and HTML entities decoded. The rest is kept as written
    (normalising is :func:`bot.intake.normalize_prompt`'s job)."""
    start = 0
    if display_text_range and len(display_text_range) == 2:
        start = max(0, min(int(display_text_range[0]), len(text)))
        end = max(start, min(int(display_text_range[1]), len(text)))
        # X counts code points like Python does; the range may end early (attached media links).
        text = text[start:end] if end > start else text[start:]
    text = html.unescape(text)  # X escapes &, < and > in post text
    text = _LEADING_MENTIONS.sub("", text)
    text = _URL.sub(" ", text)
    return text.strip()


_DISCORD_MARKUP = re.compile(r"<(?:@[!&]?|#)\d+>|(?<!\w)@(?:everyone|here)\b")


def extract_discord_prompt(text: str) -> str:
    """The prompt of a ``/dalle``: without user, role and channel mentions, @everyone/@here, the
    leading @names and URLs (nothing to draw in them, and nothing the bot should repeat)."""
    text = _DISCORD_MARKUP.sub(" ", text)
    text = _LEADING_MENTIONS.sub("", text)
    return _URL.sub(" ", text).strip()


def mentions_in_display(text: str, display_text_range: Sequence[int] | None, username: str) -> bool:
    """Whether ``@username`` appears in the displayed part of the text (not only in X's reply prefix,
    which lists everyone in the thread: a reply to the bot's own reply is not a new request)."""
    if display_text_range and len(display_text_range) == 2:
        text = text[int(display_text_range[0]): int(display_text_range[1])]
    return re.search(rf"(?i)(?<![\w@])[@＠]{re.escape(username)}\b", text) is not None


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(0, limit - 1)].rstrip() + "…"


# ---- refusals --------------------------------------------------------------------------------

PAUSED = "The bot is paused right now and is not taking new requests; please try again later."
BANNED = "Sorry, I can't take requests from this account."
DAILY_LIMIT = "I've reached today's limit of replies; please try again tomorrow."
CHANNEL_NOT_ALLOWED = "Sorry, I don't draw in this channel."
NOT_IN_GUILD = "This command only works in a server."
NOT_A_MODERATOR = "Only moderators can use this command."
INTAKE_UNAVAILABLE = "Sorry, I can't take requests right now. Please try again in a few minutes."
QUEUE_UNAVAILABLE = "Sorry, I can't reach the request queue right now. Please try again in a few minutes."
NOT_A_MODERATION_GUILD = ("This server does not moderate this bot. Its operator lists the servers that do "
                          "in [discord] moderator_guild_ids.")
GENERIC_REFUSAL = "Sorry, I can't draw that."


def refusal_text(reason: str | None) -> str:
    """What to tell the user about a request stored as rejected with ``reason`` (as the intake or the
    queue wrote it); reasons written for people are passed through."""
    if not reason:
        return GENERIC_REFUSAL
    if reason == "user is banned":
        return BANNED
    return reason


def x_refusal(message: str, request_id: int) -> str:
    """A refusal reply on X: the message plus the request id (unique text), at most 280 characters."""
    tail = f" (#{request_id})"
    return shorten(_URL.sub("", message).strip(), 280 - len(tail)) + tail


def x_result(request_id: int, n_images: int, seed: int | None) -> str:
    what = "Here is your image" if n_images == 1 else f"Here are your {n_images} images"
    seed_part = f", seed {seed}" if seed is not None else ""
    return f"{what}! (#{request_id}{seed_part})"


# ---- Discord ----------------------------------------------------------------------------------

def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 90:
        return f"about {max(1, round(seconds))} s"
    if seconds < 5400:
        return f"about {round(seconds / 60)} min"
    return f"about {seconds / 3600:.1f} h"


def discord_status_line(status: str, position: int | None, eta: float | None) -> str:
    """The text of the message that follows a Discord request through the queue."""
    if status == "queued":
        where = "next in line" if position == 0 else f"position {(position or 0) + 1} in the queue"
        return f"Queued: {where} (ETA {eta_text(eta)})."
    return {
        "running": "Drawing your images now…",
        "generated": "Done drawing, sending the images…",
        "posting": "Sending the images…",
        "held_for_review": "Your request is waiting for a moderator to look at it.",
        "cancelled": "Cancelled.",
        "failed": "Sorry, something went wrong with this request.",
        "dead": "Sorry, I could not finish this request.",
        "rejected": "This request was not accepted.",
        "posted": "Done.",
    }.get(status, f"Status: {status}.")


def cannot_cancel(status: str) -> str:
    """Why a Cancel click did nothing, from the request's status at that moment."""
    return {
        "generated": "Too late to cancel: the images are already done.",
        "posting": "Too late to cancel: the images are already done.",
        "posted": "Too late to cancel: the images are already done.",
        "cancelled": "This request is already cancelled.",
        "rejected": "This request was not accepted, so there is nothing to cancel.",
        "failed": "This request already ended without images.",
        "dead": "This request already ended without images.",
    }.get(status, f"This request cannot be cancelled now (it is {status.replace('_', ' ')}).")


def discord_result(prompt: str, seed: int | None, mention: str | None = None) -> str:
    """The caption of a delivered result: the prompt in a code span (no markdown, no mentions)."""
    safe = shorten(prompt.replace("`", "ˋ"), 1500)
    head = f"{mention} " if mention else ""
    seed_part = f" (seed {seed})" if seed is not None else ""
    return f"{head}`{safe}`{seed_part}"
