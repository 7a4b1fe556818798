"""Security of the dashboard, on SQLite and PostgreSQL, through the real ASGI app (no socket):
login required, CSRF, escaping, headers, cookies, login throttling, image paths, no secret leaks."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from starlette.routing import Route
from starlette.testclient import TestClient

from bot.app import App, open_app
from bot.web import create_web_app
from storage import db as dbmod
from storage.moderators import LoginPolicy, Moderators
from storage.queue import Queue
from tests.conftest import FakeClock
from tests.dashboard.conftest import (
    PASSWORD,
    SESSION_SECRET,
    cheap_hasher,
    csrf_of,
    login,
    make_held,
    settings_for,
)

PUBLIC = {"/login", "/healthz", "/metrics"}
PATH_PARAMS = {"rid": "1", "n": "0", "action": "ban"}
HOSTILE_PROMPT = ('<script>alert(1)</script> "><img src=x onerror=alert(2)> '
                  "javascript:alert(3) <a href=\"javascript:alert(4)\">x</a>")
HOSTILE_NAME = '"><img src=x onerror=alert(5)><script>alert(6)</script>'
HOSTILE_USER = "javascript:alert(7)//"


class Inspector(HTMLParser):
    """Collects what would run in a browser: script elements, event-handler attributes, URLs."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.scripts: list[dict[str, str | None]] = []
        self.handlers: list[tuple[str, str]] = []
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self.scripts.append(dict(attrs))
        for k, v in attrs:
            if k.startswith("on"):
                self.handlers.append((tag, k))
            if k in ("href", "src", "action", "formaction") and v is not None:
                self.urls.append(v)


def assert_inert(html: str) -> None:
    p = Inspector()
    p.feed(html)
    assert p.scripts == [{"src": "/static/dashboard.js", "defer": None}], p.scripts
    assert p.handlers == [], p.handlers
    for url in p.urls:
        assert not url.strip().lower().startswith(("javascript:", "data:", "vbscript:")), url
        assert url.startswith("/") and not url.startswith("//") or url.startswith("http"), url
    assert "<script>alert" not in html and "<img src=x" not in html


def dashboard_routes(web) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    out = []
    for r in web.routes:
        if isinstance(r, Route) and r.path not in PUBLIC:
            for m in sorted(r.methods or ()):
                if m != "HEAD":
                    path = re.sub(r"\{(\w+)(:\w+)?\}", lambda m: PATH_PARAMS[m.group(1)], r.path)
                    out.append((m, path))
    return out


# ---- login required ----------------------------------------------------------------------------

def test_pages_without_a_session_redirect_to_login(app: App, client: TestClient) -> None:
    make_held(app)
    routes = dashboard_routes(client.app)
    assert ("GET", "/") in routes and ("POST", "/requests/1/act") in routes and len(routes) >= 10
    for method, path in routes:
        r = client.request(method, path, data={"action": "approve"} if method == "POST" else None)
        if method == "GET" and path.startswith("/api/"):
            assert r.status_code == 401, path
        elif method == "GET":
            assert r.status_code == 303, path
            assert r.headers["location"].startswith("/login?next="), (path, r.headers["location"])
        else:
            assert r.status_code == 403, (method, path)
    assert app.queue.get(1).status.value == "held_for_review"  # nothing changed
    # a forged cookie is no session either
    client.cookies.set("dallebot_session", "forged-token.forged-signature")
    assert client.get("/").status_code == 303
    # the public endpoints answer without login
    assert client.get("/healthz").status_code == 200 and client.get("/metrics").status_code == 200
    assert client.get("/login").status_code == 200 and client.get("/static/dashboard.css").status_code == 200


def test_login_redirects_back_but_never_off_site(app: App, client: TestClient) -> None:
    r = client.get("/held")
    assert r.headers["location"] == "/login?next=%2Fheld"
    assert login(client, next_path="/held").headers["location"] == "/held"
    client.post("/logout", data={"csrf_token": csrf_of(client.get("/held").text)})
    for evil in ("//evil.example/x", "https://evil.example/", "javascript:alert(1)", "/\\evil.example"):
        assert login(client, next_path=evil).headers["location"] == "/", evil
        client.post("/logout", data={"csrf_token": csrf_of(client.get("/").text)})


# ---- CSRF -------------------------------------------------------------------------------------------

def test_a_post_without_a_valid_csrf_token_is_refused(app: App, logged_in: TestClient) -> None:
    held = make_held(app)
    token = csrf_of(logged_in.get(f"/requests/{held.id}").text)
    url = f"/requests/{held.id}/act"
    attempts = [
        ({"action": "approve"}, {}),  # no token
        ({"action": "approve", "csrf_token": ""}, {}),
        ({"action": "approve", "csrf_token": "x" * len(token)}, {}),
        ({"action": "approve", "csrf_token": token[:-2]}, {}),
        ({"action": "approve", "csrf_token": token}, {"Origin": "https://evil.example"}),
        ({"action": "approve", "csrf_token": token}, {"Sec-Fetch-Site": "cross-site"}),
        ({"action": "approve", "csrf_token": token}, {"Sec-Fetch-Site": "same-site"}),
    ]
    for data, headers in attempts:
        r = logged_in.post(url, data=data, headers=headers)
        assert r.status_code == 403, (data, headers)
    assert app.queue.get(held.id).status.value == "held_for_review"
    # another session's token does not work either
    with TestClient(logged_in.app, follow_redirects=False) as other:
        assert login(other).status_code == 303
        other_token = csrf_of(other.get("/").text)
        assert other_token != token
        assert logged_in.post(url, data={"action": "approve", "csrf_token": other_token}).status_code == 403
    # the real token from our own page, same origin: accepted
    r = logged_in.post(url, data={"action": "approve", "csrf_token": token},
                       headers={"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"})
    assert r.status_code == 303
    assert app.queue.get(held.id).status.value == "generated"
    # the header form works for scripts
    r = logged_in.post("/switches", data={"name": "intake_paused", "value": "on"}, headers={"X-CSRF-Token": token})
    assert r.status_code == 303


def test_the_login_form_needs_its_csrf_token_too(client: TestClient) -> None:
    r = client.post("/login", data={"name": "alice", "password": PASSWORD})
    assert r.status_code == 403
    assert "dallebot_session" not in r.cookies


# ---- escaping -----------------------------------------------------------------------------------

def test_hostile_prompts_names_and_urls_render_inert(app: App, logged_in: TestClient) -> None:
    held = make_held(app, HOSTILE_PROMPT, user=HOSTILE_USER, user_name=HOSTILE_NAME)
    # a posted request whose reply URL is a javascript: URL (as a hostile platform might return)
    posted = app.local.submit(app.queue, HOSTILE_PROMPT + " two", user="mallory", user_name=HOSTILE_NAME).request
    claim = app.queue.claim("w", 1)
    app.queue.complete(claim, posted.id, [])
    d = app.queue.claim_deliveries("w", 1)
    app.queue.mark_posted(d, posted.id, HOSTILE_NAME, "javascript:alert(8)")
    app.queue.set_ban(f"local:{HOSTILE_USER}", True, actor="moderator:alice", reason=HOSTILE_NAME)
    pages = {
        "queue": logged_in.get("/"),
        "search": logged_in.get("/", params={"q": "<script>", "user": HOSTILE_USER}),
        "filter echo": logged_in.get("/", params={"q": HOSTILE_PROMPT, "platform": HOSTILE_NAME,
                                                  "since": HOSTILE_NAME, "status": HOSTILE_NAME}),
        "held": logged_in.get("/held"),
        "detail": logged_in.get(f"/requests/{held.id}"),
        "posted": logged_in.get(f"/requests/{posted.id}"),
    }
    for name, r in pages.items():
        # the bad date and status in "filter echo" are filter errors (400), shown on the page
        assert r.status_code == (400 if name == "filter echo" else 200), name
        assert_inert(r.text)
    assert "unknown status" in pages["filter echo"].text
    detail = pages["detail"].text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in detail  # shown, as text
    assert "&#34;&gt;&lt;img src=x onerror=alert(5)&gt;" in detail
    assert 'href="javascript' not in pages["posted"].text and "javascript:alert(8)" in pages["posted"].text
    # the flash message after an action echoes user text, escaped too
    token = csrf_of(detail)
    logged_in.post(f"/requests/{held.id}/act", data={"action": "reject", "reason": HOSTILE_NAME, "csrf_token": token})
    assert_inert(logged_in.get(f"/requests/{held.id}").text)
    # and the login page echoes the name after a failed attempt
    with TestClient(logged_in.app, follow_redirects=False) as anon:
        page = anon.get("/login", params={"next": "javascript:alert(9)"})
        assert_inert(page.text)
        r = anon.post("/login", data={"name": HOSTILE_NAME, "password": "x", "csrf_token": csrf_of(page.text),
                                      "next": "javascript:alert(9)"})
        assert r.status_code == 401
        assert_inert(r.text)


def test_invisible_characters_are_shown_visibly(app: App, logged_in: TestClient) -> None:
    held = make_held(app, "a red\u200b circle\u202e")
    html = logged_in.get(f"/requests/{held.id}").text
    assert '<span class="ctl">U+200B</span>' in html and '<span class="ctl">U+202E</span>' in html


# ---- headers and cookies ------------------------------------------------------------------------

def test_security_headers_on_every_response(app: App, logged_in: TestClient) -> None:
    make_held(app)
    for path in ("/", "/held", "/requests/1", "/requests/1/images/0", "/requests/999", "/nope", "/healthz",
                 "/metrics", "/static/dashboard.js", "/api/counters", "/login"):
        r = logged_in.get(path)
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp, path
        assert "object-src 'none'" in csp and "base-uri 'none'" in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["referrer-policy"] == "same-origin"
        if not path.startswith("/static/"):
            assert r.headers["cache-control"] == "no-store" or path.endswith("/images/0"), path


def test_cookies_are_httponly_strict_and_secure_over_https(app: App, moderator: str) -> None:
    web = create_web_app(app, hasher=cheap_hasher())
    with TestClient(web, base_url="https://dash.example", follow_redirects=False) as c:
        page = c.get("/login")
        pre = page.headers["set-cookie"]
        assert pre.startswith("dallebot_pre=")
        for flag in ("HttpOnly", "SameSite=strict", "Secure", "Path=/"):
            assert flag.lower() in pre.lower(), flag
        r = c.post("/login", data={"name": "alice", "password": PASSWORD, "csrf_token": csrf_of(page.text)})
        assert r.status_code == 303
        cookies = r.headers.get_list("set-cookie")
        session = next(h for h in cookies if h.startswith("dallebot_session="))
        for flag in ("HttpOnly", "SameSite=strict", "Secure", "Path=/", "Max-Age="):
            assert flag.lower() in session.lower(), flag
        # the pre-session cookie is dropped and the session token is new (no fixation)
        assert any(h.startswith("dallebot_pre=") and "max-age=0" in h.lower() for h in cookies)
        assert session.split("=", 1)[1].split(".")[0] != pre.split("=", 1)[1].split(".")[0]


def test_logout_and_removal_end_the_session(app: App, logged_in: TestClient) -> None:
    cookie = logged_in.cookies.get("dallebot_session")
    assert logged_in.get("/").status_code == 200
    logged_in.post("/logout", data={"csrf_token": csrf_of(logged_in.get("/").text)})
    logged_in.cookies.set("dallebot_session", cookie)  # replay the old cookie
    assert logged_in.get("/").status_code == 303
    assert login(logged_in).status_code == 303
    assert logged_in.get("/").status_code == 200
    Moderators(app.queue, hasher=cheap_hasher()).remove("alice", actor="cli")
    assert logged_in.get("/").status_code == 303
    actions = [(a.action, a.actor) for a in app.queue.audit(limit=50) if a.request_id is None]
    assert ("login", "moderator:alice") in actions and ("logout", "moderator:alice") in actions
    assert ("moderator_removed", "cli") in actions


def test_sessions_expire_when_idle(app: App, moderator: str) -> None:
    clock = FakeClock()
    web = create_web_app(app, clock=clock, hasher=cheap_hasher())
    with TestClient(web, follow_redirects=False) as c:
        assert login(c).status_code == 303
        clock.advance(3600)
        assert c.get("/").status_code == 200  # active: the idle timer restarts
        clock.advance(2 * 3600 + 1)
        assert c.get("/").status_code == 303


# ---- login throttling ---------------------------------------------------------------------------------

def test_five_wrong_passwords_in_a_row_slow_down_the_next_login(app: App, moderator: str) -> None:
    clock = FakeClock()
    web = create_web_app(app, clock=clock, hasher=cheap_hasher())
    with TestClient(web, follow_redirects=False) as c:
        for i in range(5):
            r = login(c, password=f"wrong-{i}")
            assert r.status_code == 401, i
            assert "Wrong name or password" in r.text
            clock.advance(1)
        # the sixth try is refused without even checking the password, right one included
        r = login(c)
        assert r.status_code == 429
        wait = int(r.headers["retry-after"])
        assert 20 <= wait <= 31 and "Too many failed attempts" in r.text
        assert "dallebot_session" not in c.cookies
        clock.advance(wait - 2)
        assert login(c).status_code == 429
        clock.advance(3)
        assert login(c).status_code == 303  # waited: the right password works, and resets the count
        c.post("/logout", data={"csrf_token": csrf_of(c.get("/").text)})
        assert login(c, password="wrong-again").status_code == 401
        # each further failure in a row doubles the wait
        for _ in range(4):
            clock.advance(1)
            login(c, password="wrong")
        clock.advance(31)
        assert login(c, password="wrong").status_code == 401  # 6th failure, after the first wait
        r = login(c)
        assert r.status_code == 429 and 50 <= int(r.headers["retry-after"]) <= 61


def test_unknown_names_are_throttled_alike_and_per_address(app: App, moderator: str) -> None:
    clock = FakeClock()
    web = create_web_app(app, clock=clock, hasher=cheap_hasher(),
                         login_policy=LoginPolicy(ip_free_failures=7))
    with TestClient(web, follow_redirects=False) as c:
        for i in range(5):
            assert login(c, name="nobody", password="x").status_code == 401
        assert login(c, name="nobody", password="x").status_code == 429
        # many names from one address: the per-address limit
        for i in range(3):
            assert login(c, name=f"guess{i}", password="x").status_code == 401
        assert login(c, name="alice").status_code == 429


def test_a_password_typed_into_the_name_field_is_not_stored(app: App, moderator: str) -> None:
    """Login attempts are kept for throttling; their names are keyed hashes, still throttled per name."""
    clock = FakeClock()
    web = create_web_app(app, clock=clock, hasher=cheap_hasher())
    with TestClient(web, follow_redirects=False) as c:
        for _ in range(5):
            assert login(c, name=PASSWORD, password="").status_code == 401
        assert login(c, name="alice").status_code == 303  # another name is not held back by those
        c.post("/logout", data={"csrf_token": csrf_of(c.get("/").text)})
        assert login(c, name=PASSWORD, password="").status_code == 429  # the same name still is
    with app.queue.db.read.connect() as conn:
        names = conn.execute(sa.text("SELECT name FROM login_attempts")).scalars().all()
    assert len(names) == 6
    assert not [n for n in names if "horse" in n or n == "alice"], names


class SlowHasher:
    """The cheap test hasher, with a slow verify (as argon2 is) that counts how often it ran."""

    def __init__(self, seconds: float = 0.05) -> None:
        self.inner, self.seconds, self.verified = cheap_hasher(), seconds, 0
        self.lock = threading.Lock()

    def hash(self, password: str) -> str:
        return self.inner.hash(password)

    def verify(self, hash: str, password: str) -> bool:
        with self.lock:
            self.verified += 1
        time.sleep(self.seconds)
        return self.inner.verify(hash, password)

    def check_needs_rehash(self, hash: str) -> bool:
        return self.inner.check_needs_rehash(hash)


async def guess_together(web, guesses: list[tuple[str, str]], ip: str) -> list[int]:  # type: ignore[no-untyped-def]
    """Send all the login ``guesses`` (name, password) at once from ``ip``; their status codes."""
    transport = httpx.ASGITransport(app=web, client=(ip, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        token = csrf_of((await c.get("/login")).text)

        async def guess(name: str, password: str) -> int:
            r = await c.post("/login", data={"name": name, "password": password, "csrf_token": token})
            return r.status_code

        return list(await asyncio.gather(*(guess(n, p) for n, p in guesses)))


async def test_guesses_sent_together_are_throttled_like_guesses_in_a_row(app: App, moderator: str) -> None:
    """The throttle counts an attempt before its (slow) password check: 40 wrong passwords sent at
    once get no more checks than 40 in a row, per name and per address."""
    hasher = SlowHasher()
    policy = LoginPolicy()  # 4 free failures per name, 20 per address
    web = create_web_app(app, clock=FakeClock(), hasher=hasher, login_policy=policy)
    codes = await guess_together(web, [("alice", f"wrong-{i}") for i in range(40)], "10.0.0.1")
    assert set(codes) <= {401, 429}
    assert codes.count(401) == hasher.verified == policy.free_failures + 1, codes
    # the right password now waits, as after five wrong ones in a row
    codes = await guess_together(web, [("alice", PASSWORD)], "10.0.0.9")
    assert codes == [429] and hasher.verified == policy.free_failures + 1
    # many names from one address
    hasher.verified = 0
    codes = await guess_together(web, [(f"guess{i}", "x") for i in range(40)], "10.0.0.2")
    assert codes.count(401) == hasher.verified == policy.ip_free_failures + 1, codes
    assert codes.count(429) == 40 - hasher.verified
    # another address and name are not held up, and a right password still logs in
    Moderators(app.queue, hasher=cheap_hasher()).add("bea", PASSWORD, actor="test")
    assert await guess_together(web, [("bea", PASSWORD)], "10.0.0.3") == [303]


# ---- images ---------------------------------------------------------------------------------------

def test_images_are_served_only_from_the_data_folder(app: App, logged_in: TestClient, tmp_path: Path) -> None:
    held = make_held(app, n_images=2)
    r = logged_in.get(f"/requests/{held.id}/images/0")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content.startswith(b"\x89PNG")
    assert logged_in.get(f"/requests/{held.id}/images/2").status_code == 404
    assert logged_in.get(f"/requests/{held.id}/images/-1").status_code == 404
    assert logged_in.get(f"/requests/{held.id}/images/..%2F..%2Fsecret").status_code == 404
    outside = tmp_path / "outside.png"
    outside.write_bytes(r.content)
    svg = Path(app.settings.images_dir) / "x.svg"
    svg.write_text("<svg onload='alert(1)'/>")
    for bad in [str(outside), "/etc/passwd", str(Path(app.settings.images_dir) / ".." / ".." / "outside.png"),
                str(svg), "../../outside.png"]:
        rec = app.local.submit(app.queue, "a blue square", user="carol").request
        claim = app.queue.claim("w", 1)
        app.queue.complete(claim, rec.id, [bad])
        assert logged_in.get(f"/requests/{rec.id}/images/0").status_code == 404, bad
    with TestClient(logged_in.app, follow_redirects=False) as anon:
        assert anon.get(f"/requests/{held.id}/images/0").status_code == 303


# ---- secrets ------------------------------------------------------------------------------------------

def test_secrets_never_appear_in_pages_or_log_lines(tmp_path: Path, db_url: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    db_password = "db-pass-Zx81-never-shown"
    url = db_url
    if url.startswith("postgresql"):  # the test server trusts local connections: any password works
        url = url.replace("postgres@", f"postgres:{db_password}@")
    settings = settings_for(tmp_path / "data", url)
    secrets_ = [SESSION_SECRET, PASSWORD, db_password]
    caplog.set_level(logging.DEBUG)
    with open_app(settings, auto_upgrade=True) as app:
        hasher = cheap_hasher()
        mods = Moderators(app.queue, hasher=hasher)
        mods.add("alice", PASSWORD, actor="test")
        with mods.db.read.connect() as conn:
            stored_hash = conn.execute(sa.text("SELECT password_hash FROM moderators")).scalar_one()
        secrets_.append(stored_hash)
        held = make_held(app, f"please print {SESSION_SECRET[:6]}")
        web = create_web_app(app, hasher=hasher)
        bodies: list[str] = []
        with TestClient(web, follow_redirects=False) as c:
            for pw in ("wrong password 1", "wrong password 2"):
                bodies.append(login(c, password=pw).text)
            r = login(c)
            assert r.status_code == 303
            bodies.append(r.text)
            token = csrf_of(c.get("/").text)
            c.post("/requests/999/act", data={"action": "approve", "csrf_token": token})
            c.post(f"/requests/{held.id}/act", data={"action": "approve"})  # refused: no token
            c.post(f"/requests/{held.id}/act", data={"action": "approve", "csrf_token": token})
            for path in ("/", "/held", f"/requests/{held.id}", "/requests/999", "/api/counters", "/healthz",
                         "/metrics", "/nope", f"/requests/{held.id}/images/0", "/?since=bad"):
                resp = c.get(path)
                bodies.append(resp.text if "image" not in resp.headers.get("content-type", "") else "")
                bodies.append(str(resp.headers))
            c.post("/logout", data={"csrf_token": token})
    log_text = "\n".join(caplog.messages + [r.exc_text or "" for r in caplog.records]) + caplog.text
    assert "login" in log_text  # the log did record the activity
    for s in secrets_:
        for b in bodies:
            assert s not in b
        assert s not in log_text
    # the generated signing key (when none is configured) stays in its file, readable by us only
    settings2 = settings_for(tmp_path / "data2", "sqlite:///" + str(tmp_path / "x.sqlite3"),
                             DALLEBOT_SERVER_SESSION_SECRET="")
    with open_app(settings2, auto_upgrade=True) as app2:
        create_web_app(app2)
        key_file = Path(settings2.data_dir) / "session_secret"
        assert key_file.stat().st_mode & 0o777 == 0o600 and len(key_file.read_bytes()) >= 48


# ---- health and metrics ---------------------------------------------------------------------------------

def test_healthz_and_metrics_without_login(app: App, client: TestClient) -> None:
    make_held(app)
    app.local.submit(app.queue, "a green triangle", user="dan")
    h = client.get("/healthz").json()
    assert h == {"ok": True, "database": "ok", "model_loaded": False, "queue_depth": 1, "queued": 1,
                 "running": 0, "held_for_review": 1}
    m = client.get("/metrics").text
    assert 'dallebot_requests{status="held_for_review"} 1.0' in m
    assert 'dallebot_paused{switch="intake_paused"} 0.0' in m and "dallebot_images_per_second" in m
    assert "a green triangle" not in m and "dan" not in m


def test_healthz_and_metrics_say_503_when_the_database_is_down(tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "data", "postgresql+psycopg://postgres@127.0.0.1:1/test")  # nothing listens
    db = dbmod.connect(settings.database_url, check=False)
    app = App(settings=settings, db=db, queue=Queue(db))
    try:
        with TestClient(create_web_app(app, hasher=cheap_hasher())) as c:
            r = c.get("/healthz")
            assert r.status_code == 503 and r.json()["database"] == "unreachable"
            r = c.get("/metrics")
            assert r.status_code == 503 and r.text == "database unreachable\n"
    finally:
        app.close()

