"""The dashboard behind a reverse proxy (``[server] public_url``), through a real uvicorn on 127.0.0.1.

A proxy such as nginx's plain ``proxy_pass http://127.0.0.1:8080;`` or a TLS-terminating load
balancer hands the app its own Host (``127.0.0.1:8080``, an upstream name) and scheme (http), while
the browser's ``Origin`` is the public address. The requests below are what such a proxy forwards:
the browser's Origin, Referer and cookies, with the proxy's Host. Cookies are carried by hand, as
the browser does for the public origin (an https cookie is not sent by a client to http://127.0.0.1).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bot.app import App, open_app
from bot.config import ConfigError, load_settings
from bot.web import create_web_app
from storage.moderators import Moderators
from tests.dashboard.conftest import (PASSWORD, SESSION_SECRET, cheap_hasher, csrf_of, listen, make_held,
                                      run_uvicorn)

PUBLIC = "https://mod.example.org"


def settings(tmp_path: Path, db_url: str, public_url: str):  # type: ignore[no-untyped-def]
    cfg = tmp_path / "dallebot.toml"
    cfg.write_text(f'[server]\npublic_url = "{public_url}"\n', encoding="utf-8")
    return load_settings(cfg, env={"DALLEBOT_DATA_DIR": str(tmp_path / "data"), "DALLEBOT_DATABASE_URL": db_url,
                                   "DALLEBOT_SERVER_SESSION_SECRET": SESSION_SECRET})


class Served:
    """An app with a moderator, served by a real uvicorn on 127.0.0.1."""

    def __init__(self, app: App, base: str) -> None:
        self.app, self.base = app, base
        self.http = httpx.Client(base_url=base, follow_redirects=False)

    def cookie(self, response: httpx.Response, name: str) -> str:
        """The ``Set-Cookie`` header for ``name`` (its flags included)."""
        return next(h for h in response.headers.get_list("set-cookie") if h.startswith(name + "="))

    def login(self, origin: str, host: str | None = None) -> tuple[httpx.Response, str]:
        """GET the form and POST it as a browser on ``origin`` would; the response and the cookie pair."""
        headers = {"Host": host} if host else {}
        self.http.cookies.clear()  # only the cookies given by hand, as the browser sends them
        page = self.http.get("/login", headers=headers)
        assert page.status_code == 200
        pre = self.cookie(page, "dallebot_pre").split(";", 1)[0]
        r = self.http.post("/login", data={"name": "alice", "password": PASSWORD, "csrf_token": csrf_of(page.text),
                                           "next": "/held"},
                           headers={**headers, "Origin": origin, "Referer": origin + "/login?next=%2Fheld",
                                    "Sec-Fetch-Site": "same-origin", "Cookie": pre})
        session = self.cookie(r, "dallebot_session").split(";", 1)[0] if r.status_code == 303 else ""
        return r, session


def serve(app: App) -> Iterator[Served]:
    Moderators(app.queue, hasher=cheap_hasher()).add("alice", PASSWORD, actor="test")
    web = create_web_app(app, hasher=cheap_hasher())
    sock, port = listen()
    for _ in run_uvicorn(web, sock):
        s = Served(app, f"http://127.0.0.1:{port}")
        try:
            yield s
        finally:
            s.http.close()


def reverse_proxy(upstream: str) -> Starlette:
    """What nginx's plain ``proxy_pass http://127.0.0.1:PORT;`` does: everything forwarded as it
    came, but with the upstream's Host (and nginx's default X-Forwarded-* headers: none)."""
    hop = {b"host", b"connection", b"content-length", b"transfer-encoding", b"accept-encoding",
           b"content-encoding", b"keep-alive"}

    async def forward(request: Request) -> Response:
        headers = [(k, v) for k, v in request.headers.raw if k.lower() not in hop]
        async with httpx.AsyncClient(base_url=upstream) as client:
            r = await client.request(request.method, request.url.path, params=request.url.query or None,
                                     headers=headers, content=await request.body())
        response = Response(r.content, status_code=r.status_code)
        response.raw_headers = [(k, v) for k, v in r.headers.raw if k.lower() not in hop] + [
            (b"content-length", str(len(r.content)).encode())]
        return response

    methods = ["GET", "HEAD", "POST"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)])


def test_a_real_browser_logs_in_and_approves_through_a_host_rewriting_proxy(tmp_path: Path, db_url: str) -> None:
    """Chromium opens http://mod.example.test:PORT (mapped to a proxy on 127.0.0.1), which passes
    everything to the dashboard with Host 127.0.0.1:UPSTREAM: the login, the approve and the cookies
    (not Secure: the public address is plain http, and Chromium drops a Secure cookie there) work."""
    proxy_sock, proxy_port = listen()
    public = f"http://mod.example.test:{proxy_port}"
    with open_app(settings(tmp_path, db_url, public), auto_upgrade=True) as app:
        held = make_held(app)
        for served in serve(app):
            for _ in run_uvicorn(reverse_proxy(served.base), proxy_sock):
                with sync_playwright() as p:
                    browser = p.chromium.launch(
                        executable_path=os.environ.get("DALLEBOT_CHROMIUM", "/usr/bin/chromium"),
                        args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              "--disable-background-networking", "--disable-component-update",
                              "--host-resolver-rules=MAP mod.example.test 127.0.0.1"])
                    try:
                        page = browser.new_page()
                        page.set_default_timeout(10_000)
                        page.goto(f"{public}/held")
                        expect(page).to_have_url(f"{public}/login?next=%2Fheld")
                        page.fill("#name", "alice")
                        page.fill("#password", PASSWORD)
                        page.click("#login-button")
                        expect(page).to_have_url(f"{public}/held")
                        page.goto(f"{public}/requests/{held.id}")
                        page.click("#act-approve")
                        expect(page.locator("#flash")).to_have_text(f"Request {held.id} is now generated.")
                    finally:
                        browser.close()
        assert app.queue.get(held.id).status.value == "generated"


@pytest.fixture
def proxied(tmp_path: Path, db_url: str) -> Iterator[Served]:
    with open_app(settings(tmp_path, db_url, PUBLIC + "/"), auto_upgrade=True) as app:
        yield from serve(app)


@pytest.fixture
def direct(tmp_path: Path, db_url: str) -> Iterator[Served]:
    with open_app(settings(tmp_path, db_url, ""), auto_upgrade=True) as app:
        yield from serve(app)


def test_login_and_approve_through_the_public_origin(proxied: Served) -> None:
    held = make_held(proxied.app)
    r, session = proxied.login(PUBLIC)
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/held"
    page = proxied.http.get(f"/requests/{held.id}", headers={"Cookie": session})
    assert page.status_code == 200
    r = proxied.http.post(f"/requests/{held.id}/act",
                          data={"action": "approve", "csrf_token": csrf_of(page.text), "back": f"/requests/{held.id}"},
                          headers={"Origin": PUBLIC, "Sec-Fetch-Site": "same-origin", "Cookie": session})
    assert r.status_code == 303, r.text
    assert proxied.app.queue.get(held.id).status.value == "generated"


def test_other_origins_are_still_refused_behind_the_proxy(proxied: Served) -> None:
    held = make_held(proxied.app)
    for origin in ("https://evil.example", "http://mod.example.org", "https://mod.example.org:8443",
                   "https://mod.example.org.evil.example", "null"):
        r, _ = proxied.login(origin)
        assert r.status_code == 403, origin
        assert "dallebot_session" not in r.headers.get("set-cookie", "")
    r, session = proxied.login(PUBLIC)
    assert r.status_code == 303
    page = proxied.http.get(f"/requests/{held.id}", headers={"Cookie": session})
    token = csrf_of(page.text)
    for headers in ({"Origin": "https://evil.example"}, {"Origin": PUBLIC, "Sec-Fetch-Site": "cross-site"},
                    {"Origin": PUBLIC, "Sec-Fetch-Site": "same-site"}):
        r = proxied.http.post(f"/requests/{held.id}/act", data={"action": "approve", "csrf_token": token},
                              headers={**headers, "Cookie": session})
        assert r.status_code == 403, headers
    # X-Forwarded-Host names no origin of ours: it is not trusted
    r = proxied.http.post(f"/requests/{held.id}/act", data={"action": "approve", "csrf_token": token},
                          headers={"Origin": "https://evil.example", "X-Forwarded-Host": "evil.example",
                                   "X-Forwarded-Proto": "https", "Cookie": session})
    assert r.status_code == 403
    assert proxied.app.queue.get(held.id).status.value == "held_for_review"


def test_the_address_the_app_listens_on_still_works(proxied: Served) -> None:
    """An ssh tunnel or a health check straight to 127.0.0.1:port: its own origin is still ours."""
    r, _ = proxied.login(proxied.base)
    assert r.status_code == 303


@pytest.mark.parametrize(("public_url", "host", "secure"), [
    # a TLS load balancer forwarding to an upstream name: the app sees http and a non-loopback Host
    ("https://mod.example.org", "dallebot.internal:8080", True),
    # a plain-http proxy in front of 127.0.0.1: a Secure cookie would be dropped by the browser
    ("http://mod.lan:8000", None, False),
])
def test_the_secure_flag_follows_the_public_url(tmp_path: Path, db_url: str, public_url: str, host: str | None,
                                                secure: bool) -> None:
    with open_app(settings(tmp_path, db_url, public_url), auto_upgrade=True) as app:
        for served in serve(app):
            page = served.http.get("/login", headers={"Host": host} if host else {})
            flags = [f.strip().lower() for f in served.cookie(page, "dallebot_pre").split(";")]
            assert ("secure" in flags) is secure, flags
            r, _ = served.login(public_url, host=host)
            assert r.status_code == 303, r.text
            for name in ("dallebot_session", "dallebot_pre"):
                flags = [f.strip().lower() for f in served.cookie(r, name).split(";")]
                assert ("secure" in flags) is secure, (name, flags)


def test_without_public_url_the_request_origin_alone_is_ours(direct: Served) -> None:
    held = make_held(direct.app)
    r, _ = direct.login(PUBLIC)
    assert r.status_code == 403
    r, session = direct.login(direct.base)
    assert r.status_code == 303
    assert "secure" in direct.cookie(r, "dallebot_session").lower()  # loopback, as before
    page = direct.http.get(f"/requests/{held.id}", headers={"Cookie": session})
    r = direct.http.post(f"/requests/{held.id}/act", data={"action": "approve", "csrf_token": csrf_of(page.text)},
                         headers={"Origin": direct.base, "Cookie": session})
    assert r.status_code == 303
    assert direct.app.queue.get(held.id).status.value == "generated"


def test_a_form_posted_after_logout_leads_back_to_its_public_page(proxied: Served) -> None:
    r, session = proxied.login(PUBLIC)
    page = proxied.http.get("/held", headers={"Cookie": session})
    proxied.http.post("/logout", data={"csrf_token": csrf_of(page.text)},
                      headers={"Origin": PUBLIC, "Cookie": session})
    r = proxied.http.post("/switches", data={"name": "intake_paused", "value": "on"},
                          headers={"Origin": PUBLIC, "Referer": PUBLIC + "/held?before=5", "Cookie": session})
    assert r.status_code == 403
    assert re.search(r'href="/login\?next=%2Fheld%3Fbefore%3D5"', r.text), r.text


@pytest.mark.parametrize(("value", "why"), [
    ("mod.example.org", "must be an http"),
    ("ftp://mod.example.org", "must be an http"),
    ("https://", "must be an http"),
    ("https://mod.example.org/dashboard", "path prefix"),
    ("https://mod.example.org/?x=1", "path prefix"),
    ("https://alice:pw@mod.example.org", "user name or password"),
    ("https://mod.example.org:99999", "port"),
    ("https://mod.example.org:0", "port"),
    ("https://münchen.example", "xn--"),
])
def test_a_bad_public_url_is_a_config_error_naming_the_key(tmp_path: Path, value: str, why: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[server]\npublic_url = "{value}"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^server\.public_url in .*c\.toml .*{re.escape(why)}") as e:
        load_settings(cfg, env={})
    assert "\n" not in str(e.value)
