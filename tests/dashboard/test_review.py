"""Findings of a review of the dashboard, moderator accounts and moderator actions, each a moderator's
flow on SQLite and PostgreSQL: through the real ASGI app (forms are posted with the fields the page put
in them, as a browser would), the CLI as a process, or the real Discord adapter against the fake."""

from __future__ import annotations

import asyncio
import re
import threading
from html.parser import HTMLParser
from pathlib import Path

from starlette.testclient import TestClient

from bot import moderation
from bot.app import App
from bot.fakes.discord_server import FakeDiscord
from bot.platforms.discord import DiscordPlatform
from bot.web import create_web_app
from storage.moderators import Moderators
from storage.queue import Queue
from tests.bot.test_cli import assert_one_line_error, run
from tests.conftest import FakeClock
from tests.e2e.test_discord_adapter import EDIT_ORIGINAL, adapter, dalle, fake, stored  # noqa: F401 (fixtures)
from tests.dashboard.conftest import PASSWORD, cheap_hasher, csrf_of, login, make_held

FLASH = re.compile(r'id="flash">([^<]*)<')


class Forms(HTMLParser):
    """The POST forms of a page: their action and the values of their inputs."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[tuple[str, dict[str, str]]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form" and a.get("method") == "post":
            self.forms.append((a["action"], {}))
        elif tag == "input" and self.forms and "name" in a:
            self.forms[-1][1][a["name"]] = a.get("value", "")

    def find(self, url: str, action: str) -> dict[str, str]:
        found = [fields for act, fields in self.forms if act == url and fields.get("action") == action]
        assert len(found) == 1, (url, action, self.forms)
        return dict(found[0])


def two_moderators(app: App) -> tuple[TestClient, TestClient]:
    Moderators(app.queue, hasher=cheap_hasher()).add("bob", PASSWORD, actor="test")
    web = create_web_app(app, hasher=cheap_hasher())
    alice, bob = TestClient(web, follow_redirects=False), TestClient(web, follow_redirects=False)
    assert login(alice, "alice").status_code == 303 and login(bob, "bob").status_code == 303
    return alice, bob


def test_a_stale_reject_does_not_overturn_another_moderators_approval(app: App, moderator: str) -> None:
    """Two moderators on the held inbox: Bob approves, then Alice rejects from her older page. The
    reject went through (generated -> rejected is allowed), overturned the approval and sent the
    requester a refusal; now nothing is done and Alice is told who changed it."""
    held = make_held(app, "a red circle", user="carl")
    alice, bob = two_moderators(app)
    with alice, bob:
        # both have the held inbox open; Bob approves first, then Alice rejects from her (old) page
        alice_form = Forms(alice.get("/held").text).find(f"/requests/{held.id}/act", "reject")
        bob_form = Forms(bob.get("/held").text).find(f"/requests/{held.id}/act", "approve")
        assert bob.post(f"/requests/{held.id}/act", data=bob_form).status_code == 303
        assert app.queue.get(held.id).status.value == "generated"
        r = alice.post(f"/requests/{held.id}/act", data={**alice_form, "reason": "too dark"})
        assert r.status_code == 303 and r.headers["location"] == "/held"
        message = FLASH.search(alice.get("/held").text).group(1)  # type: ignore[union-attr]
        assert re.fullmatch(f"cannot reject request {held.id}: it is generated, and moderator:bob approved it "
                            r"after your page showed it \(\d\d:\d\d:\d\d UTC\): nothing was done, look again",
                            message), message
        # the approval stands and the requester is not told a refusal
        assert app.queue.get(held.id).status.value == "generated"
        assert not (Path(app.settings.outbox_dir) / str(held.id) / "refusal.json").exists()
        assert "rejected" not in [a.action for a in app.queue.audit(held.id)]

        # the same from the request page: a cancel chosen while it was queued does not cancel it
        # once another moderator has put it on hold
        rec = app.local.submit(app.queue, "a blue square", user="dora").request
        cancel = Forms(alice.get(f"/requests/{rec.id}").text).find(f"/requests/{rec.id}/act", "cancel")
        hold = Forms(bob.get(f"/requests/{rec.id}").text).find(f"/requests/{rec.id}/act", "hold")
        assert bob.post(f"/requests/{rec.id}/act", data={**hold, "reason": "checking"}).status_code == 303
        alice.post(f"/requests/{rec.id}/act", data=cancel)
        assert app.queue.get(rec.id).status.value == "held_for_review"
        assert "and moderator:bob held it after your page showed it" in alice.get(f"/requests/{rec.id}").text
        # acting on what the page shows still works
        fresh = Forms(alice.get(f"/requests/{rec.id}").text).find(f"/requests/{rec.id}/act", "cancel")
        alice.post(f"/requests/{rec.id}/act", data=fresh)
        assert app.queue.get(rec.id).status.value == "cancelled"

        # a worker's progress is no one's decision: a hold chosen while the request was queued still
        # stops it once a worker has taken it
        moving = app.local.submit(app.queue, "a green star", user="erik").request
        hold = Forms(alice.get(f"/requests/{moving.id}").text).find(f"/requests/{moving.id}/act", "hold")
        assert app.queue.claim("test-worker", 1).ids == [moving.id]
        alice.post(f"/requests/{moving.id}/act", data={**hold, "reason": "looks odd"})
        assert app.queue.get(moving.id).status.value == "held_for_review"



def test_two_moderators_pausing_at_once_both_get_an_answer(app: App, moderator: str) -> None:
    """Two moderators press Pause (then Resume) at the same moment. On PostgreSQL, the first time
    (no switch row yet) both found no row and both inserted one, so one of them got a 500; later both
    could be told they paused it, and the queue log said so twice."""
    alice, bob = two_moderators(app)
    with alice, bob:
        tokens = {id(c): csrf_of(c.get("/").text) for c in (alice, bob)}
        for _ in range(6):
            for value, state in (("on", "paused"), ("off", "running")):
                barrier = threading.Barrier(2)
                answers: list[str] = []

                def press(c: TestClient) -> None:
                    barrier.wait()
                    r = c.post("/switches", data={"csrf_token": tokens[id(c)], "name": "generation_paused",
                                                  "value": value, "back": "/held"})
                    assert r.status_code == 303, r.text
                    answers.append(FLASH.search(c.get("/held").text).group(1))  # type: ignore[union-attr]

                threads = [threading.Thread(target=press, args=(c,)) for c in (alice, bob)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                assert sorted(answers) == [f"Generation is {state}.", f"Generation was already {state}."]
        log = [a.action for a in app.queue.audit(limit=1000) if a.action in ("paused", "resumed")]
        assert log == ["paused", "resumed"] * 6


def test_a_ban_for_a_user_no_platform_can_have_is_refused(app: App, logged_in: TestClient, tmp_path: Path,
                                                          db_url: str) -> None:
    """A typo in the platform or an @handle for an id banned nobody while the moderator was told the
    user was banned; a platform name past 16 characters was a 500 (PostgreSQL) or a traceback."""
    token = csrf_of(logged_in.get("/").text)
    for user, why in [("discrod:123", "unknown platform 'discrod' in user 'discrod:123': "
                                      "write local:ID, x:ID, discord:ID"),
                      ("x:@mallory", "x user ids are numbers: 'x:@mallory' is not one"),
                      ("discord-typo-platform:1", "unknown platform 'discord-typo-platform'"),
                      ("discord:", "no user id in 'discord:'")]:
        r = logged_in.post("/users/ban", data={"user": user, "note": "spam", "csrf_token": token, "back": "/held"})
        assert r.status_code == 303, r.text
        shown = FLASH.search(logged_in.get("/held").text).group(1)  # type: ignore[union-attr]
        assert why in shown.replace("&#39;", "'"), shown
    with app.db.read.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM users").scalar_one() == 0
    assert [a.action for a in app.queue.audit(limit=100) if a.action == "banned"] == []
    # real users are banned as before, on every platform
    for user in ("local:zed", "zed2", "x:1490000000000000000", "discord:80351110224678912"):
        logged_in.post("/users/ban", data={"user": user, "csrf_token": token})
        assert app.queue.get_user(user).banned
    # the CLI says the same in one line
    cli_data = tmp_path / "cli"
    assert_one_line_error(run("queue", "ban", "discrod:123", data=cli_data), "unknown platform 'discrod'")
    assert_one_line_error(run("queue", "unban", "x:@mallory", data=cli_data), "x user ids are numbers")


def test_a_moderator_name_ending_in_a_newline_is_refused(tmp_path: Path) -> None:
    """`moderator add "$NAME"` with a stray newline made an account nobody could log in to (the
    login form strips the name) and printed a broken line: the name rule's "$" matched before it."""
    p = run("moderator", "add", "carol\n", data=tmp_path, stdin="a long enough password\n")
    assert_one_line_error(p, "a moderator name is 1-64 letters, digits")
    listed = run("moderator", "list", data=tmp_path)
    assert listed.returncode == 0 and listed.stdout.startswith("(no moderators")


def test_a_cookie_with_a_non_ascii_signature_is_no_session_not_a_500(app: App, client: TestClient) -> None:
    """hmac.compare_digest refuses str with non-ASCII characters (TypeError): such a cookie (set by
    anything else on the host: cookies do not keep to ports) made every page, the login form
    included, a 500 until the browser's cookies were cleared."""
    for name in ("dallebot_session", "dallebot_pre"):
        cookie = f"{name}=token.sig\xe9".encode("latin-1")
        assert client.get("/", headers={"cookie": cookie}).status_code == 303
        r = client.get("/login", headers={"cookie": cookie})
        assert r.status_code == 200 and "Moderator login" in r.text


def test_an_open_queue_page_does_not_keep_an_unattended_session_alive(app: App, moderator: str) -> None:
    """The queue page polls /api/counters every few seconds; each poll restarted the 2-hour idle
    timer, so a dashboard left open on an unattended screen stayed logged in for the full 12 hours."""
    clock = FakeClock()
    web = create_web_app(app, clock=clock, hasher=cheap_hasher())
    with TestClient(web, follow_redirects=False) as c:
        assert login(c).status_code == 303
        assert c.get("/").status_code == 200
        for _ in range(2 * 60 + 1):  # the page's poll, for two hours (a minute apart here)
            clock.advance(60)
            r = c.get("/api/counters")
            if r.status_code != 200:
                break
        assert r.status_code == 401 and r.json() == {"error": "login required"}
        assert c.get("/").status_code == 303  # the session is over: the screen shows the login form
        # real use restarts the idle timer as before
        assert login(c).status_code == 303
        for _ in range(3):
            clock.advance(3600)
            assert c.get("/held").status_code == 200


def test_the_request_page_shows_a_heavy_users_latest_ban(app: App, logged_in: TestClient) -> None:
    """The "User" box listed the oldest 100 queue-log entries naming the user, and every request
    names its user: for someone with over 100 requests (a flooder, the user a moderator looks at) it
    was 100 lines of "received by intake:local", and their ban and its note never showed."""
    for i in range(105):
        rec = app.local.submit(app.queue, f"a red circle number {i}", user="flood").request
    token = csrf_of(logged_in.get(f"/requests/{rec.id}").text)
    logged_in.post("/users/ban", data={"user": "local:flood", "note": "flooding the queue", "csrf_token": token})
    logged_in.post("/users/unban", data={"user": "local:flood", "note": "appeal", "csrf_token": token})
    logged_in.post("/users/ban", data={"user": "local:flood", "note": "again", "csrf_token": token})
    page = logged_in.get(f"/requests/{rec.id}").text
    trail = re.findall(r"<li>[^<]*</li>", page.split('id="user-trail"', 1)[1].split("</ul>", 1)[0])
    assert [t.split(" · ", 1)[1] for t in trail] == [
        "banned by moderator:alice: flooding the queue</li>", "unbanned by moderator:alice: appeal</li>",
        "banned by moderator:alice: again</li>"]


async def test_a_refusal_discord_fails_to_take_is_in_the_queue_log(fake: FakeDiscord, adapter: DiscordPlatform,
                                                                   queue: Queue) -> None:
    """A moderator's rejection of a Discord request meets a passing Discord failure (a 429): it was
    left "owed", as on X, but only X's poller sends owed refusals, so the requester was never told and
    the queue log said nothing about it. Now the log says the refusal failed."""
    inter = await dalle(fake, fake.add_user("ivan"), prompt="something to refuse")
    rec = stored(queue, inter)
    # the refusal's edit of the requester's message meets a Cloudflare rate limit (a passing failure)
    fake.inject_rate_limit(lambda r: r.route == EDIT_ORIGINAL and (r.json or {}).get("content") == "not this one",
                           via=False)
    done = await asyncio.to_thread(moderation.act, queue, "reject", rec.id, actor="moderator:alice",
                                   reason="not this one", platforms={"discord": adapter})
    assert done.status.value == "rejected"
    last = queue.audit(rec.id)[-1]
    assert (last.action, last.actor) == ("refusal_failed", "moderator:alice")
    assert last.reason is not None and last.reason.startswith("Discord rate limit (429)")


def test_a_form_posted_after_the_session_ended_leads_back_through_the_login(app: App, moderator: str) -> None:
    """Approve, clicked on a page left open past the idle timeout, answered a bare "Log in first."
    text page; it now says nothing was done and links to the login form, which leads back to the page."""
    held = make_held(app)
    clock = FakeClock()
    web = create_web_app(app, clock=clock, hasher=cheap_hasher())
    with TestClient(web, follow_redirects=False) as c:
        assert login(c).status_code == 303
        form = Forms(c.get("/held?before=999").text).find(f"/requests/{held.id}/act", "approve")
        clock.advance(2 * 3600 + 1)
        r = c.post(f"/requests/{held.id}/act", data=form, headers={"Referer": "http://testserver/held?before=999"})
        assert r.status_code == 403 and r.headers["content-type"].startswith("text/html")
        assert "Your session has ended" in r.text and "nothing was done" in r.text
        link = re.search(r'<a href="([^"]*)" id="error-link">Log in</a>', r.text)
        assert link is not None and link.group(1) == "/login?next=%2Fheld%3Fbefore%3D999"
        assert app.queue.get(held.id).status.value == "held_for_review"
        assert login(c, next_path="/held?before=999").headers["location"] == "/held?before=999"
        # a page of another site is never the way back
        c.cookies.clear()
        r = c.post(f"/requests/{held.id}/act", data=form, headers={"Referer": "https://evil.example/held"})
        assert r.status_code == 403 and 'href="/login?next=%2F"' in r.text
