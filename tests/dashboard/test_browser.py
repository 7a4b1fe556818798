"""The dashboard in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright), served
by a real uvicorn on 127.0.0.1 with an ephemeral port, on SQLite and PostgreSQL.

Screenshots go to ``$DALLEBOT_SCREENSHOTS`` when set (``docs/screenshots`` holds the README's copy),
else to the test's temporary folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from bot.app import App
from bot.web import create_web_app
from bot.worker import Worker
from storage.moderators import Moderators, Switches
from tests.dashboard.conftest import PASSWORD, cheap_hasher, listen, make_held, run_uvicorn

CHROMIUM = os.environ.get("DALLEBOT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def server(app: App, moderator: str) -> Iterator[str]:
    """The dashboard on a real uvicorn, on 127.0.0.1 and a port the OS picks."""
    web = create_web_app(app, hasher=cheap_hasher(), refresh_ms=300)
    sock, port = listen()
    for _ in run_uvicorn(web, sock):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(10_000)
    problems: list[str] = []

    def on_console(msg: ConsoleMessage) -> None:
        # the browser's own line for the counters poll answered 401 (see on_response) is expected too
        if msg.type == "error" and not (msg.location.get("url", "").endswith("/api/counters")
                                        and "status of 401" in msg.text):
            problems.append(msg.text)

    pg.on("console", on_console)
    pg.on("pageerror", lambda exc: problems.append(str(exc)))
    def on_response(r) -> None:  # type: ignore[no-untyped-def]
        # A counters poll already in flight when the test logs out is answered 401: that race is
        # expected (the poller stops on the next page), every other error response is a problem.
        if r.status >= 400 and not (r.status == 401 and r.url.endswith("/api/counters")):
            problems.append(f"HTTP {r.status} {r.url}")

    pg.on("response", on_response)
    yield pg
    context.close()
    # no CSP violation, no script error, no failed load on any page the test opened
    assert problems == []


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    out = Path(os.environ.get("DALLEBOT_SCREENSHOTS") or tmp_path / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


def log_in(page: Page, base: str, path: str = "/") -> None:
    page.goto(base + path)
    expect(page).to_have_url(f"{base}/login?next={path.replace('/', '%2F')}")
    page.fill("#name", "alice")
    page.fill("#password", PASSWORD)
    page.click("#login-button")
    expect(page).to_have_url(base + path)


def test_approve_a_held_request_see_it_posted_then_ban_the_user(
        app: App, server: str, page: Page, shots: Path, db_url: str) -> None:
    backend = "pg" if db_url.startswith("postgresql") else "sqlite"
    held = make_held(app, "a red circle above a blue square", user="bob", user_name="Bob")

    # pages need a session: the held inbox sends us to the login form first
    page.goto(server + "/held")
    expect(page.locator("h1")).to_have_text("Moderator login")
    page.screenshot(path=str(shots / f"login-{backend}.png"))
    log_in(page, server, "/held")
    cookie = next(c for c in page.context.cookies() if c["name"] == "dallebot_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["secure"]

    # find the held request in the inbox, with its images
    card = page.locator(f'article.card[data-id="{held.id}"]')
    expect(card).to_contain_text("a red circle above a blue square")
    expect(card.locator("img")).to_have_count(2)
    assert card.locator("img").first.evaluate("img => img.complete && img.naturalWidth") == 8
    page.screenshot(path=str(shots / f"held-inbox-{backend}.png"), full_page=True)
    card.locator("a").first.click()
    expect(page).to_have_url(f"{server}/requests/{held.id}")
    expect(page.locator("#request-status")).to_have_text("held_for_review")
    expect(page.locator("#audit")).to_contain_text("nsfw score 0.91 over 0.5")
    expect(page.locator(".images figcaption").first).to_have_text("NSFW score: 0.910")

    # approve it: it goes to delivery, and the local platform posts it
    page.fill(".act-approve input[name=reason]", "a harmless drawing")
    page.click("#act-approve")
    expect(page.locator("#flash")).to_have_text(f"Request {held.id} is now generated.")
    expect(page.locator("#request-status")).to_have_text("generated")
    assert Worker(app.queue, None, app.platforms, app.settings.images_dir, owner="browser-test").deliver_batch() == 1
    page.reload()
    expect(page.locator("#request-status")).to_have_text("posted")
    expect(page.locator("#reply-id")).to_have_text(f"local-{held.id}")
    reply = json.loads((Path(app.settings.outbox_dir) / str(held.id) / "reply.json").read_text())
    assert reply["prompt"] == "a red circle above a blue square" and len(reply["images"]) == 2
    expect(page.locator("#audit")).to_contain_text("moderator:alice")
    page.screenshot(path=str(shots / f"request-posted-{backend}.png"), full_page=True)

    # ban the requester with a note; their next request is refused
    page.fill("#ban-note", "posting the same prompt 500 times")
    page.click("#ban")
    expect(page.locator("#flash")).to_have_text("User local:bob is banned.")
    expect(page.locator("#user-banned")).to_be_visible()
    expect(page.locator("#user-trail")).to_contain_text("banned by moderator:alice: posting the same prompt 500 times")
    refused = app.local.submit(app.queue, "a green triangle", user="bob").request
    assert refused.status.value == "rejected" and refused.error == "user is banned"
    page.goto(server + "/")
    page.fill("#f-user", "local:bob")
    page.click("#f-apply")
    rows = page.locator("#queue-table tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.first).to_contain_text("rejected")
    expect(rows.first).to_contain_text("a green triangle")
    expect(rows.nth(1)).to_contain_text("posted")
    rows.first.locator("a").first.click()
    expect(page.locator("#request-error")).to_have_text("user is banned")

    actions = {(a.action, a.actor, a.reason) for a in app.queue.audit(limit=100)}
    assert ("approved", "moderator:alice", "a harmless drawing") in actions
    assert ("banned", "moderator:alice", "posting the same prompt 500 times") in actions


def test_prompt_box_live_counters_and_pause_switches(app: App, server: str, page: Page, shots: Path,
                                                     db_url: str) -> None:
    backend = "pg" if db_url.startswith("postgresql") else "sqlite"
    make_held(app, "a small cat on a mountain", user="erin", user_name="Erin")
    log_in(page, server, "/")

    # a new moderator tries the bot from the prompt box
    page.fill("#prompt", "a blue   square\u200b")
    page.click("#prompt-submit")
    expect(page.locator("#flash")).to_contain_text("is queued")
    expect(page.locator("#prompt-raw")).to_contain_text("U+200B")
    expect(page.locator("#prompt-normalised")).to_have_text("a blue square")
    rid = int(page.url.rsplit("/", 1)[1])
    assert app.queue.get(rid).user_ref == "local:dashboard-alice"
    assert [a.actor for a in app.queue.audit(rid)] == ["moderator:alice"]

    # the counters refresh without a reload
    page.goto(server + "/")
    page.evaluate("window.__stillHere = true")
    expect(page.locator("#count-queued")).to_have_text("1")
    expect(page.locator("#count-held")).to_have_text("1")
    app.local.submit(app.queue, "a red triangle", user="frank")
    app.local.submit(app.queue, "a green circle", user="frank")
    expect(page.locator("#count-queued")).to_have_text("3")
    assert page.evaluate("window.__stillHere") is True
    page.screenshot(path=str(shots / f"queue-log-{backend}.png"), full_page=True)

    # pause intake: the prompt box (the local platform) tells the user to come back later
    page.click("#pause-intake_paused")
    expect(page.locator("#flash")).to_have_text("Intake is paused.")
    expect(page.locator("#paused-banner")).to_contain_text("Intake is paused")
    page.fill("#prompt", "a yellow star")
    page.click("#prompt-submit")
    expect(page.locator("#flash")).to_contain_text("paused right now")
    assert app.queue.list(text="yellow star") == []
    page.click("#resume-intake_paused")
    expect(page.locator("#flash")).to_have_text("Intake is running.")

    # pause generation: requests queue up
    page.click("#pause-generation_paused")
    expect(page.locator("#paused-banner")).to_contain_text("Generation is paused")
    assert Switches(app.queue).get("generation_paused") is True
    page.screenshot(path=str(shots / f"paused-{backend}.png"))
    page.click("#resume-generation_paused")
    expect(page.locator("#paused-banner")).to_have_count(0)
    assert [(a.action, a.actor, a.reason) for a in app.queue.audit(limit=100) if a.action in ("paused", "resumed")] == [
        ("paused", "moderator:alice", "intake"), ("resumed", "moderator:alice", "intake"),
        ("paused", "moderator:alice", "generation"), ("resumed", "moderator:alice", "generation")]

    # log out: the pages need a session again
    page.click("header .logout button")
    expect(page.locator("h1")).to_have_text("Moderator login")
    page.goto(server + "/held")
    expect(page.locator("h1")).to_have_text("Moderator login")


def test_a_link_from_another_site_while_logged_in_leads_through_the_login_form(
        app: App, server: str, page: Page) -> None:
    """A moderator follows a link to the dashboard from a chat or an e-mail (another site). The
    SameSite=Strict session cookie is not sent on that navigation, so the login form shows; logging in
    there must work (its CSRF token came from the pre-session cookie, but the POST carried the session
    cookie too, and was refused as a forged form) and must end the session it replaces."""
    held = make_held(app, "a purple star", user="gina")
    log_in(page, server, "/held")
    first = next(c["value"] for c in page.context.cookies() if c["name"] == "dallebot_session")
    page.context.route("http://chat.example/", lambda route: route.fulfill(
        body=f'<a id="go" href="{server}/requests/{held.id}">request {held.id}</a>', content_type="text/html"))
    page.goto("http://chat.example/")
    page.click("#go")
    expect(page).to_have_url(f"{server}/login?next=%2Frequests%2F{held.id}")
    page.fill("#name", "alice")
    page.fill("#password", PASSWORD)
    page.click("#login-button")
    expect(page).to_have_url(f"{server}/requests/{held.id}")
    expect(page.locator("#request-status")).to_have_text("held_for_review")
    second = next(c["value"] for c in page.context.cookies() if c["name"] == "dallebot_session")
    assert second != first
    # the replaced session is over, not left valid until it expires
    mods = Moderators(app.queue, hasher=cheap_hasher())
    assert mods.session(first.rpartition(".")[0]) is None
    assert mods.session(second.rpartition(".")[0]) is not None


def test_when_the_session_ends_the_queue_page_goes_to_the_login_form_and_back(
        app: App, server: str, page: Page) -> None:
    """The counters poll sees the session end (idle timeout, logout elsewhere, account removed) and
    sends the page to the login form; after logging in the moderator is back on the same filtered
    page (it went to "/" and the filters were lost)."""
    app.local.submit(app.queue, "a red circle", user="hana")
    log_in(page, server, "/")
    page.fill("#f-q", "circle")
    page.click("#f-apply")
    expect(page).to_have_url(f"{server}/?status=&platform=&user=&q=circle&since=&until=")
    with app.db.write.begin() as conn:
        conn.exec_driver_sql("DELETE FROM moderator_sessions")
    expect(page).to_have_url(f"{server}/login?next=%2F%3Fstatus%3D%26platform%3D%26user%3D%26q%3Dcircle"
                             "%26since%3D%26until%3D")
    page.fill("#name", "alice")
    page.fill("#password", PASSWORD)
    page.click("#login-button")
    expect(page).to_have_url(f"{server}/?status=&platform=&user=&q=circle&since=&until=")
    expect(page.locator("#f-q")).to_have_value("circle")
