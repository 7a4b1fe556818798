"""Property-based: random text through the platforms' intake (prompt extraction, validation, storing
in the real database) never raises, and what is stored is either a clean, valid prompt or a refusal."""

from __future__ import annotations

import itertools
import json
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.intake import PromptRejected, validate_prompt
from bot.metrics import Metrics
from bot.platforms import text as texts
from bot.platforms.admission import IntakeEvent, admit
from bot.platforms.local import LocalPlatform
from bot.safety import PromptFilter
from bot.worker import Worker
from storage.queue import Queue
from storage.states import Status
from tests.e2e.adapter_support import LetterGenerator

MAX_CHARS = 280
_ids = itertools.count()

# Nasty pieces mixed into arbitrary Unicode: NUL and lone surrogates (neither database stores them
# as text), bidi overrides, zero-width characters, mentions, URLs, HTML entities, SQL, long runs.
PIECES = ["\x00", "\ud800", "\udfff", "\u202e", "\u2066", "\u200b", "\ufeff", "\u00ad", "\u3164", "\uffa0",
          "@dalle_mini_bot ",
          "@x ", "<@123>", "<@&9>", "@everyone", "https://t.co/abc", "www.example.com", "&amp;", "&lt;b&gt;",
          "'; DROP TABLE requests; --", "\r\n", "\t", "🐱", "é", "ﬁ", "Ａ", "猫", "a" * 300]
TEXT = st.lists(st.one_of(st.characters(codec=None, exclude_categories=()), st.sampled_from(PIECES),
                          st.text(max_size=20)), max_size=40).map("".join)
INVISIBLE = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff\u00ad\x00-\x1f\x7f\u115f\u1160\u3164\uffa0]")


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


# ---- the local platform (CLI and dashboard intake, outbox delivery) ---------------------------------

def test_local_prompt_filter_refusals_are_counted_like_the_other_platforms(queue: Queue, tmp_path: Path) -> None:
    """``dallebot_refusals{reason="prompt_filter"}`` counts a refusal of the local platform (CLI,
    dashboard prompt box) as the X and Discord intakes count theirs; a repeat of a stored request
    (the same external id) and an accepted prompt do not count."""
    metrics = Metrics()
    local = LocalPlatform(tmp_path / "outbox", prompt_filter=PromptFilter(), metrics=metrics)

    def counted() -> float:
        return metrics.registry.get_sample_value("dallebot_refusals_total", {"reason": "prompt_filter"}) or 0.0

    assert local.submit(queue, "a n.u.d.e figure", user="u1", external_id="e1").request.status == Status.REJECTED
    assert counted() == 1
    local.submit(queue, "a n.u.d.e figure", user="u1", external_id="e1")  # the same request again
    assert local.submit(queue, "a red circle", user="u1").request.status == Status.QUEUED
    assert counted() == 1
    local.submit(queue, "a nude figure", user="u2")
    assert counted() == 2


def _posting(queue: Queue, tmp_path: Path, prompt: str) -> tuple[LocalPlatform, Worker, int]:
    """A local request generated (two images) and claimed for delivery by worker "a"."""
    local = LocalPlatform(tmp_path / "outbox")
    rid = local.submit(queue, prompt, user="u1", n_images=2).request.id
    worker = Worker(queue, LetterGenerator(), {"local": local}, tmp_path / "images", owner="b")
    assert worker.generate_batch() == 1
    return local, worker, rid


def test_a_torn_outbox_record_left_by_a_crash_is_written_again(queue: Queue, clock, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A worker died while the outbox record was being written (an empty or half-written reply.json,
    as a power cut could leave without fsync): the worker that takes the delivery over finds no
    complete reply and writes it again, where it used to fail on the unreadable record until dead."""
    local, worker, rid = _posting(queue, tmp_path, "a torn record")
    assert queue.claim_deliveries("a", 5).ids == [rid]  # worker "a" starts posting, then dies
    folder = tmp_path / "outbox" / str(rid)
    folder.mkdir(parents=True)
    (folder / "reply.json").write_text('{"request_id": ', encoding="utf-8")
    clock.advance(queue.policy.lease_seconds + 1)
    assert worker.deliver_batch() == 1
    rec = queue.get(rid)
    assert rec.status == Status.POSTED and rec.reply_id == f"local-{rid}"
    record = json.loads((folder / "reply.json").read_text(encoding="utf-8"))
    assert record["images"] == ["0.png", "1.png"] and record["reply_id"] == f"local-{rid}"
    assert all((folder / name).read_bytes().startswith(b"\x89PNG") for name in record["images"])


def test_the_outbox_is_on_disk_before_the_record_says_delivered(queue: Queue, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Every outbox file is flushed (fsync) under a temporary name before it is renamed into place,
    the folder is flushed after the renames, and reply.json is renamed into place only once the
    images it lists are on disk: a crash or power cut cannot leave a record that looks delivered
    next to missing or truncated images, or a truncated record."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        real_fsync(fd)
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))

    def replace(src, dst) -> None:  # type: ignore[no-untyped-def]
        real_replace(src, dst)
        events.append(("rename", f"{os.fspath(src)} -> {os.fspath(dst)}"))

    local, worker, rid = _posting(queue, tmp_path, "a durable reply")
    rec = queue.get(rid)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    local.deliver(rec, [tmp_path / p for p in rec.image_paths])
    monkeypatch.undo()

    folder = str((tmp_path / "outbox" / str(rid)).resolve())
    renames = [i for i, (kind, _) in enumerate(events) if kind == "rename"]
    assert [events[i][1].rsplit(" -> ", 1)[1] for i in renames] == [f"{folder}/0.png", f"{folder}/1.png",
                                                                     f"{folder}/reply.json"]
    for i in renames:  # the file was flushed under its temporary name just before the rename
        tmp = events[i][1].split(" -> ")[0]
        assert events[i - 1] == ("fsync", str(Path(tmp).resolve())), events
    record_at = renames[-1]
    assert ("fsync", folder) in events[renames[1]:record_at]  # the images' names before the record
    assert events[record_at + 1:] == [("fsync", folder)]  # and the record's own name after it
    assert sorted(os.listdir(folder)) == ["0.png", "1.png", "reply.json"]  # no temporary files left


def test_local_text_that_the_database_cannot_store_is_cleaned_or_refused(queue: Queue, tmp_path: Path) -> None:
    """A non-UTF-8 byte in a command-line argument (`dallebot queue add $'a red\\xff circle'`) arrives as
    a lone surrogate, which neither database can store: it crashed `queue add` with a
    UnicodeEncodeError traceback. It is stored as the other platforms store text; a user id longer
    than the database column is a one-line refusal (it was a DataError on PostgreSQL)."""
    local = LocalPlatform(tmp_path / "outbox")
    rec = local.submit(queue, "a red\udcff circle\x00", user="u\udcff", user_name="Ann\ud800").request
    again = queue.get(rec.id)
    assert again.status == Status.QUEUED and again.prompt == validate_prompt(again.prompt, max_chars=MAX_CHARS)
    assert "\udcff" not in again.prompt_raw and "\x00" not in again.prompt_raw and "red" in again.prompt
    assert again.author_id.startswith("u") and again.author_id.encode("utf-8")
    with pytest.raises(PromptRejected, match="user id is too long"):
        local.submit(queue, "a cat", user="u" * 200)
    with pytest.raises(PromptRejected, match="too long \\(5000 characters"):
        local.submit(queue, "a" * 5000)
    long_blank = local.submit(queue, "a cat" + " " * 10_000).request  # accepted: the raw text is capped
    assert queue.get(long_blank.id).prompt == "a cat" and len(queue.get(long_blank.id).prompt_raw) <= 4000


def test_blank_looking_prompts_are_refused_as_empty(queue: Queue) -> None:
    """Hangul fillers are "letters" that show as blank space (the usual way to send an empty-looking
    Discord message): a prompt of nothing else was queued and drawn from nothing. They read as
    spaces now, so such a prompt gets the "empty" refusal, and between words they separate them."""
    for platform, raw in [("discord", "\u3164"), ("x", "@dalle_mini_bot \u3164 \uffa0"), ("discord", "\u115f\u1160")]:
        prompt = texts.extract_x_prompt(raw) if platform == "x" else texts.extract_discord_prompt(raw)
        adm = admit(queue, IntakeEvent(platform=platform, external_id=f"blank-{next(_ids)}", author_id="42",
                                       prompt_raw=prompt), max_chars=MAX_CHARS)
        assert adm.request.status == Status.REJECTED, raw
        assert adm.refusal == "Please give me something to draw: the prompt is empty.", raw
    assert validate_prompt("a\u3164red\uffa0cat", max_chars=MAX_CHARS) == "a red cat"
