"""Property-based: random text through the platforms' intake (prompt extraction, validation, storing
in the real database) never raises, and what is stored is either a clean, valid prompt or a refusal."""

from __future__ import annotations

import itertools
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.intake import validate_prompt
from bot.platforms import text as texts
from bot.platforms.admission import IntakeEvent, admit
from storage.queue import Queue
from storage.states import Status

MAX_CHARS = 280
_ids = itertools.count()

# Nasty pieces mixed into arbitrary Unicode: NUL and lone surrogates (neither database stores them
# as text), bidi overrides, zero-width characters, mentions, URLs, HTML entities, SQL, long runs.
PIECES = ["\x00", "\ud800", "\udfff", "\u202e", "\u2066", "\u200b", "\ufeff", "\u00ad", "@dalle_mini_bot ",
          "@x ", "<@123>", "<@&9>", "@everyone", "https://t.co/abc", "www.example.com", "&amp;", "&lt;b&gt;",
          "'; DROP TABLE requests; --", "\r\n", "\t", "🐱", "é", "ﬁ", "Ａ", "猫", "a" * 300]
TEXT = st.lists(st.one_of(st.characters(codec=None, exclude_categories=()), st.sampled_from(PIECES),
                          st.text(max_size=20)), max_size=40).map("".join)
INVISIBLE = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff\u00ad\x00-\x1f\x7f]")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=TEXT, platform=st.sampled_from(["x", "discord"]),
       display=st.one_of(st.none(), st.tuples(st.integers(-5, 400), st.integers(-5, 400))))
def test_random_text_through_intake_never_raises(queue: Queue, raw: str, platform: str,
                                                 display: tuple[int, int] | None) -> None:
    if platform == "x":
        prompt = texts.extract_x_prompt(raw, display)
        texts.mentions_in_display(raw, display, "dalle_mini_bot")
    else:
        prompt = texts.extract_discord_prompt(raw)
    event = IntakeEvent(platform=platform, external_id=f"prop-{next(_ids)}", author_id="42", author_name=raw[:50],
                        prompt_raw=prompt)
    adm = admit(queue, event, max_chars=MAX_CHARS)

    rec = queue.get(adm.request.id)  # it round-trips through the database
    assert adm.created
    assert not INVISIBLE.search(rec.prompt)
    if rec.status == Status.QUEUED:
        assert adm.refusal is None and 0 < len(rec.prompt) <= MAX_CHARS
        assert validate_prompt(rec.prompt, max_chars=MAX_CHARS) == rec.prompt  # already normal
    else:
        assert rec.status == Status.REJECTED and adm.owes_refusal
        assert adm.refusal and rec.error == adm.refusal
        assert texts.x_refusal(adm.refusal, rec.id).endswith(f"(#{rec.id})")
        assert len(texts.x_refusal(adm.refusal, rec.id)) <= 280
    again = admit(queue, event, max_chars=MAX_CHARS)  # the same event again: the same request
    assert again.request.id == rec.id and not again.created and not again.owes_refusal
