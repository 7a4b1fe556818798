"""Dashboard features through the ASGI app on SQLite and PostgreSQL: the queue log's filters and
paging, moderator actions (through bot.moderation, audited with the moderator's name), bans, the
pause switches as the worker and intake see them, the prompt box and the live counters."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
from PIL import Image
from starlette.testclient import TestClient

from bot.app import App
from bot.generation import GenerationJob
from bot.intake import PromptRejected
from bot.worker import Worker
from storage.moderators import Switches, login_wait
from tests.dashboard.conftest import csrf_of, make_held

ROW_ID = re.compile(r'<tr data-id="(\d+)">')


def ids_on(html: str) -> list[int]:
    return [int(x) for x in ROW_ID.findall(html)]


class TinyGenerator:
    def __init__(self) -> None:
        self.calls = 0

    def generate(self, jobs: Sequence[GenerationJob]) -> list[list[Image.Image]]:
        self.calls += 1
        return [[Image.new("RGB", (8, 8), (10, 20, 30)) for _ in range(j.n_images)] for j in jobs]


def test_queue_log_filters_and_keyset_paging(app: App, logged_in: TestClient) -> None:
    q = app.queue
    base = dt.datetime(2026, 1, 1, 12, 0, 0)
    for i in range(60):
        q.clock = lambda i=i: base + dt.timedelta(minutes=i)  # type: ignore[misc]
        app.local.submit(q, f"prompt number {i} {'lighthouse' if i % 10 == 0 else 'forest'}",
                         user=f"u{i % 3}", user_name=f"Name{i % 3}")
    q.clock = lambda: base + dt.timedelta(hours=2)
    q.cancel(5, actor="moderator:test")
    first = logged_in.get("/")
    assert ids_on(first.text) == list(range(60, 10, -1))
    older = re.search(r'href="/\?([^"]*)" id="page-older"', first.text)
    assert older and "before=11" in older.group(1)
    second = logged_in.get("/?" + older.group(1).replace("&amp;", "&"))
    assert ids_on(second.text) == list(range(10, 0, -1)) and 'id="page-older"' not in second.text
    assert 'id="page-newest"' in second.text
    assert ids_on(logged_in.get("/?status=cancelled").text) == [5]
    assert ids_on(logged_in.get("/?user=local:u1").text) == [i + 1 for i in range(59, -1, -1) if i % 3 == 1]
    assert ids_on(logged_in.get("/?user=u2&q=lighthouse").text) == [51, 21]
    assert ids_on(logged_in.get("/?q=Name0&status=queued&before=20").text) == [19, 16, 13, 10, 7, 4, 1]
    assert ids_on(logged_in.get("/?platform=x").text) == []
    # since is inclusive, until exclusive
    assert ids_on(logged_in.get("/?platform=local&since=2026-01-01T12:10&until=2026-01-01T12:13").text) == [
        13, 12, 11]
    r = logged_in.get("/?since=yesterday&status=nonsense")
    assert "since: not a date and time" in r.text and "unknown status" in r.text and len(ids_on(r.text)) == 50
    # the filters stay in the form and in the paging link
    r = logged_in.get("/?q=prompt&platform=local")
    assert 'value="prompt"' in r.text and 'href="/?platform=local&amp;q=prompt&amp;before=11"' in r.text


def test_moderator_actions_are_audited_with_the_name(app: App, logged_in: TestClient) -> None:
    held = make_held(app)
    token = csrf_of(logged_in.get(f"/requests/{held.id}").text)

    def act(rid: int, action: str, reason: str = "") -> str:
        r = logged_in.post(f"/requests/{rid}/act", data={"action": action, "reason": reason, "csrf_token": token})
        assert r.status_code == 303 and r.headers["location"] == f"/requests/{rid}"
        return logged_in.get(r.headers["location"]).text

    page = act(held.id, "reject")
    assert "Give a reason to reject" in page and app.queue.get(held.id).status.value == "held_for_review"
    assert 'id="act-approve"' in page and 'id="act-reject"' in page and 'id="act-requeue"' not in page
    page = act(held.id, "reject", "not appropriate")
    assert f"Request {held.id} is now rejected." in page
    assert app.queue.get(held.id).error == "not appropriate"
    page = act(held.id, "approve")
    assert "cannot approve request" in page  # IllegalTransition, shown as a message
    assert 'id="act-requeue"' in page
    act(held.id, "requeue", "second look")
    assert app.queue.get(held.id).status.value == "queued"
    act(held.id, "hold", "checking")
    act(held.id, "cancel", "duplicate")
    assert "Unknown action" in act(held.id, "delete")
    trail = [(a.action, a.actor, a.reason) for a in app.queue.audit(held.id)][3:]
    assert trail == [("rejected", "moderator:alice", "not appropriate"),
                     ("refusal_posted", "moderator:alice", f"local-refusal-{held.id}"),  # the requester was told
                     ("requeued", "moderator:alice", "second look"),
                     ("held", "moderator:alice", "checking"), ("cancelled", "moderator:alice", "duplicate")]
    r = logged_in.get("/requests/424242")
    assert r.status_code == 404 and "No request 424242" in r.text
    assert logged_in.post("/requests/424242/act", data={"action": "cancel", "csrf_token": token}).status_code == 303
    assert "no request with id 424242" in logged_in.get("/requests/424242").text  # the flash message


def test_a_rejection_from_the_dashboard_tells_the_requester(app: App, logged_in: TestClient) -> None:
    held = make_held(app, user="bob")
    token = csrf_of(logged_in.get(f"/requests/{held.id}").text)
    r = logged_in.post(f"/requests/{held.id}/act",
                       data={"action": "reject", "reason": "Not this one, sorry.", "csrf_token": token})
    assert r.status_code == 303 and app.queue.get(held.id).status.value == "rejected"
    refusal = json.loads((Path(app.settings.outbox_dir) / str(held.id) / "refusal.json").read_text())
    assert (refusal["user"], refusal["refusal"]) == ("local:bob", "Not this one, sorry.")
    trail = [(a.action, a.actor, a.reason) for a in app.queue.audit(held.id)]
    assert trail[-2:] == [("rejected", "moderator:alice", "Not this one, sorry."),
                          ("refusal_posted", "moderator:alice", f"local-refusal-{held.id}")]
    assert "refusal_posted" in logged_in.get(f"/requests/{held.id}").text  # in the audit trail on the page
    # other actions tell nobody
    other = app.local.submit(app.queue, "a blue square", user="bob").request
    logged_in.post(f"/requests/{other.id}/act", data={"action": "cancel", "reason": "dup", "csrf_token": token})
    assert not (Path(app.settings.outbox_dir) / str(other.id)).exists()


def test_ban_and_unban_with_a_note(app: App, logged_in: TestClient) -> None:
    rec = app.local.submit(app.queue, "a red circle", user="zed").request
    token = csrf_of(logged_in.get(f"/requests/{rec.id}").text)
    back = f"/requests/{rec.id}"
    r = logged_in.post("/users/ban", data={"user": "local:zed", "note": "spam", "back": back, "csrf_token": token})
    assert r.status_code == 303 and r.headers["location"] == back
    page = logged_in.get(back).text
    assert "User local:zed is banned." in page and 'id="unban"' in page and "Banned: spam" in page
    assert app.local.submit(app.queue, "again", user="zed").request.status.value == "rejected"
    logged_in.post("/users/unban", data={"user": "local:zed", "note": "appeal accepted", "csrf_token": token})
    assert app.local.submit(app.queue, "again 2", user="zed").request.status.value == "queued"
    user_actions = [(a.action, a.actor, a.reason) for a in app.queue.audit(user_ref="local:zed")
                    if a.request_id is None]
    assert user_actions == [("banned", "moderator:alice", "spam"), ("unbanned", "moderator:alice", "appeal accepted")]
    assert logged_in.post("/users/delete", data={"user": "local:zed", "csrf_token": token}).status_code == 404
    r = logged_in.post("/users/ban", data={"user": "", "csrf_token": token})
    assert "Which user?" in logged_in.get(r.headers["location"]).text


def test_pause_switches_stop_intake_and_generation(app: App, logged_in: TestClient) -> None:
    gen = TinyGenerator()
    worker = Worker(app.queue, gen, app.platforms, app.settings.images_dir, owner="w1")
    token = csrf_of(logged_in.get("/").text)

    def switch(name: str, value: str) -> str:
        r = logged_in.post("/switches", data={"name": name, "value": value, "csrf_token": token})
        return logged_in.get(r.headers["location"]).text

    app.local.submit(app.queue, "a blue square", user="amy")
    assert "Generation is paused." in switch("generation_paused", "on")
    assert "Generation was already paused." in switch("generation_paused", "on")
    assert worker.generate_batch() == 0 and gen.calls == 0  # requests wait in the queue
    app.local.submit(app.queue, "a red square", user="amy")  # intake still takes requests
    assert app.queue.stats()["queued"] == 2
    assert "Intake is paused." in switch("intake_paused", "on")
    with pytest.raises(PromptRejected, match="paused"):
        app.local.submit(app.queue, "a green square", user="amy")
    r = logged_in.post("/submit", data={"prompt": "a green square", "csrf_token": token})
    assert "paused right now" in logged_in.get(r.headers["location"]).text
    counters = logged_in.get("/api/counters").json()
    assert counters["intake_paused"] is True and counters["generation_paused"] is True and counters["queued"] == 2
    switch("generation_paused", "off")
    switch("intake_paused", "off")
    assert worker.generate_batch() == 2 and gen.calls == 1
    assert app.queue.stats()["generated"] == 2
    assert "Unknown switch" in switch("everything", "on")
    assert [(a.action, a.actor, a.reason) for a in app.queue.audit(limit=100) if a.request_id is None
            and a.action in ("paused", "resumed")] == [
        ("paused", "moderator:alice", "generation"), ("paused", "moderator:alice", "intake"),
        ("resumed", "moderator:alice", "generation"), ("resumed", "moderator:alice", "intake")]
    assert Switches(app.queue).all() == {"intake_paused": False, "generation_paused": False}
    with pytest.raises(ValueError):
        Switches(app.queue).set("nope", True, actor="x")


def test_prompt_box_and_counters(app: App, logged_in: TestClient) -> None:
    token = csrf_of(logged_in.get("/").text)
    r = logged_in.post("/submit", data={"prompt": "a tiny robot", "n": "2", "csrf_token": token})
    rid = int(r.headers["location"].rsplit("/", 1)[1])
    rec = app.queue.get(rid)
    assert (rec.platform, rec.author_id, rec.n_images, rec.prompt) == ("local", "dashboard-alice", 2, "a tiny robot")
    for bad, msg in (({"prompt": "   "}, "something to draw"), ({"prompt": "x" * 400}, "too long"),
                     ({"prompt": "ok", "n": "99"}, "Ask for 1 to")):
        r = logged_in.post("/submit", data={**bad, "csrf_token": token})
        assert msg in logged_in.get(r.headers["location"]).text
    gen = TinyGenerator()
    worker = Worker(app.queue, gen, app.platforms, app.settings.images_dir, owner="w1")
    assert worker.generate_batch() == 1
    rejected = app.local.submit(app.queue, "another", user="bob").request
    app.queue.reject(rejected.id, actor="moderator:alice", reason="no")
    c = logged_in.get("/api/counters").json()
    assert c["queued"] == 0 and c["images_per_s"] == pytest.approx(2 / 60, abs=1e-3) and c["refusals"] == 1
    assert c["failures"] == 0 and c["held"] == 0
    page = logged_in.get("/").text
    assert 'id="count-refusals">1<' in page and 'data-refresh-ms="3000"' in page


def test_login_wait_policy_is_pure() -> None:
    t = dt.datetime(2026, 1, 1)
    kw = dict(free=4, base=30.0, cap=900.0)
    assert login_wait(4, t, t, **kw) == 0
    assert login_wait(5, t, t, **kw) == 30
    assert login_wait(6, t, t + dt.timedelta(seconds=10), **kw) == 50
    assert login_wait(20, t, t, **kw) == 900
    assert login_wait(5, None, t, **kw) == 0


def test_account_rules(app: App) -> None:
    from storage.moderators import BadCredentials, ModeratorExists, Moderators
    from tests.dashboard.conftest import cheap_hasher

    mods = Moderators(app.queue, hasher=cheap_hasher())
    for bad in ("", "<b>", "a b", "x" * 65, "ünï"):
        with pytest.raises(BadCredentials, match="moderator name"):
            mods.add(bad, "long enough pw", actor="test")
    with pytest.raises(BadCredentials, match="at least 8"):
        mods.add("ok", "short", actor="test")
    mods.add("ok", "long enough pw", actor="test")
    with pytest.raises(ModeratorExists):
        mods.add("ok", "long enough pw 2", actor="test")
    assert [m.name for m in mods.list()] == ["ok"]


def test_text_search_reads_the_log_in_bounded_windows(app: App, moderator: str) -> None:
    from bot.web import create_web_app
    from tests.dashboard.conftest import cheap_hasher, login

    q = app.queue
    base = dt.datetime(2026, 1, 1, 12, 0, 0)
    for i in range(60):
        q.clock = lambda i=i: base + dt.timedelta(minutes=i)  # type: ignore[misc]
        app.local.submit(q, f"prompt {i} {'lighthouse' if i % 10 == 0 else 'forest'}", user=f"u{i % 3}")
    web = create_web_app(app, hasher=cheap_hasher(), search_window=20)
    with TestClient(web, follow_redirects=False) as c:
        assert login(c).status_code == 303
        pages, url = [], "/?q=lighthouse"
        while url:
            html = c.get(url).text
            window = re.search(r'id="search-window">([^<]*)<', html)
            pages.append((ids_on(html), window.group(1) if window else None))
            older = re.search(r'href="/\?([^"]*)" id="page-older"', html)
            url = "/?" + older.group(1).replace("&amp;", "&") if older else ""
        assert pages == [([51, 41], "Searched requests #40 to #60."), ([31, 21], "Searched requests #19 to #39."),
                         ([11, 1], None)]
        # more than a page of matches inside one window: ordinary paging
        assert len(ids_on(c.get("/?q=prompt").text)) == 21
        # a user filter is an index range already: no window
        assert ids_on(c.get("/?q=lighthouse&user=u0").text) == [31, 1]
