"""Prompt checks at intake, shared by every platform: pure functions, no I/O."""

from __future__ import annotations

import re
import unicodedata

# Zero-width and bidirectional control characters: invisible, and used to disguise text.
_INVISIBLE = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff\u00ad]")
# Hangul fillers: "letters" (isalnum) that show as blank space, the usual way to send an empty-looking
# message on Discord. Read as spaces, so a prompt of nothing but them is empty.
_BLANK_LETTERS = re.compile("[\u115f\u1160\u3164\uffa0]")
_SPACES = re.compile(r"\s+")


class PromptRejected(Exception):
    """The prompt cannot be accepted; the message is polite and can be shown to the user."""


def normalize_prompt(raw: str) -> str:
    """NFKC, drop control and invisible characters, collapse whitespace."""
    text = unicodedata.normalize("NFKC", raw)
    text = _INVISIBLE.sub("", text)
    text = _BLANK_LETTERS.sub(" ", text)
    text = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in text)
    return _SPACES.sub(" ", text).strip()


def validate_prompt(raw: str, *, max_chars: int) -> str:
    """The normalised prompt, or :class:`PromptRejected` saying what is wrong."""
    text = normalize_prompt(raw)
    if not text:
        raise PromptRejected("Please give me something to draw: the prompt is empty.")
    if len(text) > max_chars:
        raise PromptRejected(f"That prompt is too long ({len(text)} characters; the limit is {max_chars}).")
    if not any(ch.isalnum() for ch in text):
        raise PromptRejected("Please describe the picture in words: the prompt has no letters or digits.")
    return text
