"""Bad input to the dashboard, on SQLite and PostgreSQL, through the real ASGI app: numbers that are
not ASCII digits or do not fit the database, dates that overflow in UTC, and NUL characters get a
specific 400 or 404 (or a message on the page they come back to), never a 500."""

from __future__ import annotations

from starlette.testclient import TestClient

from bot.app import App
from storage.moderators import Switches
from tests.dashboard.conftest import csrf_of, make_held

MAX_ID = 2**63 - 1
PAST_MAX = str(2**63)  # one more than a BIGINT holds
MANY_DIGITS = "9" * 5000  # more digits than Python's int() reads by default


def flash_after(c: TestClient, r) -> str:  # type: ignore[no-untyped-def]
    assert r.status_code == 303, r.text
    return c.get(r.headers["location"]).text


def test_bad_numbers_are_refused_or_not_found(app: App, logged_in: TestClient) -> None:
    held = make_held(app)
    token = csrf_of(logged_in.get("/").text)
    for before in ("%C2%B2", "%D9%A3", "99999999999999999999999", PAST_MAX, "0", "-1", "abc", MANY_DIGITS):
        r = logged_in.get(f"/?before={before}")
        assert r.status_code == 400 and "before: not a request id" in r.text, before
        assert f'<tr data-id="{held.id}">' in r.text  # the page is still there, unpaged
        r = logged_in.get(f"/held?before={before}")
        assert r.status_code == 400 and "before: not a request id" in r.text, before
    assert logged_in.get(f"/?before={MAX_ID}").status_code == 200  # the largest id is fine
    assert f'<article class="card" data-id="{held.id}">' in logged_in.get(f"/held?before={MAX_ID}").text
    for rid in (PAST_MAX, "9" * 19, MANY_DIGITS):
        r = logged_in.get(f"/requests/{rid}")
        assert r.status_code == 404, rid
        assert logged_in.get(f"/requests/{rid}/images/0").status_code == 404, rid
    assert f"No request {PAST_MAX}." in logged_in.get(f"/requests/{PAST_MAX}").text
    assert f"No request {MAX_ID}." in logged_in.get(f"/requests/{MAX_ID}").text
    for n in (PAST_MAX, MANY_DIGITS):
        assert logged_in.get(f"/requests/{held.id}/images/{n}").status_code == 404, n
    r = logged_in.post(f"/requests/{PAST_MAX}/act", data={"action": "cancel", "csrf_token": token})
    assert f"no request with id {PAST_MAX}" in flash_after(logged_in, r)
    assert logged_in.post(f"/requests/{MANY_DIGITS}/act",
                          data={"action": "cancel", "csrf_token": token}).status_code == 404
    before = app.queue.stats()
    for n in ("²", "٣", "0", "abc", "-1", "99", MANY_DIGITS):
        r = logged_in.post("/submit", data={"prompt": "a red circle", "n": n, "csrf_token": token})
        assert f"Ask for 1 to {app.settings.queue.max_images} images." in flash_after(logged_in, r), n
    assert app.queue.stats() == before  # nothing was queued
    r = logged_in.post("/submit", data={"prompt": "a red circle", "n": "3", "csrf_token": token})
    assert app.queue.get(int(r.headers["location"].rsplit("/", 1)[1])).n_images == 3


def test_dates_out_of_range_in_utc_are_filter_errors(app: App, logged_in: TestClient) -> None:
    rec = app.local.submit(app.queue, "a red circle", user="amy").request
    for query in ("since=0001-01-01T00:00%2B01:00", "until=9999-12-31T23:59-01:00"):
        r = logged_in.get(f"/?{query}")
        key = query.split("=")[0]
        assert r.status_code == 400 and f"{key}: out of range" in r.text, query
    # the ends of the range themselves are fine
    r = logged_in.get("/?since=0001-01-01T00:00%2B00:00&until=9999-12-31T23:59")
    assert r.status_code == 200 and f'<tr data-id="{rec.id}">' in r.text
    r = logged_in.get("/?since=yesterday")
    assert r.status_code == 400 and "since: not a date and time" in r.text


def test_a_nul_character_in_any_text_is_refused(app: App, logged_in: TestClient) -> None:
    held = make_held(app)
    token = csrf_of(logged_in.get("/").text)
    for query in ("q=a%00b", "user=%00", "platform=%00", "since=%00", "status=%00", "a%00=1"):
        r = logged_in.get(f"/?{query}")
        assert r.status_code == 400 and "NUL character" in r.text, query
    assert logged_in.get("/held?before=%00").status_code == 400
    stats = app.queue.stats()
    posts = [
        ("/submit", {"prompt": "a red\x00 circle"}),
        ("/users/ban", {"user": "local:bob\x00", "note": "spam"}),
        ("/users/ban", {"user": "local:bob", "note": "spam\x00"}),
        (f"/requests/{held.id}/act", {"action": "reject", "reason": "no\x00"}),
        ("/switches", {"name": "intake_paused", "value": "on", "reason": "\x00"}),
    ]
    for path, data in posts:
        r = logged_in.post(path, data={**data, "csrf_token": token})
        assert r.status_code == 400 and "NUL character" in r.text, (path, data)
    # nothing happened
    assert app.queue.stats() == stats and app.queue.get(held.id).status.value == "held_for_review"
    assert not app.queue.get_user("local:bob").banned
    assert Switches(app.queue).all() == {"intake_paused": False, "generation_paused": False}
    # the same forms without the NUL work
    r = logged_in.post(f"/requests/{held.id}/act", data={"action": "reject", "reason": "no", "csrf_token": token})
    assert f"Request {held.id} is now rejected." in flash_after(logged_in, r)


def test_a_nul_character_in_the_login_form_is_refused(app: App, client: TestClient) -> None:
    token = csrf_of(client.get("/login").text)
    r = client.post("/login", data={"name": "ali\x00ce", "password": "whatever", "csrf_token": token})
    assert r.status_code == 400 and "NUL character" in r.text
    # a password is never stored: one with a NUL is just a wrong password
    r = client.post("/login", data={"name": "alice", "password": "pass\x00word", "csrf_token": token})
    assert r.status_code == 401 and "Wrong name or password" in r.text
    r = client.post("/login", data={"name": "alice", "password": "correct horse battery staple",
                                    "csrf_token": token})
    assert r.status_code == 303 and "dallebot_session" in r.cookies
