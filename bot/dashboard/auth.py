"""Dashboard security: the signing key, cookies, CSRF tokens, request guards and security headers.

Cookies
    ``dallebot_session`` holds a random session token (its SHA-256 is the row id in
    ``moderator_sessions``) followed by an HMAC of it under the signing key, so forged cookies are
    refused without a database read. ``dallebot_pre`` is the same for a visitor not logged in yet; it
    only seeds the login form's CSRF token. Both are ``HttpOnly``, ``SameSite=Strict``, ``Path=/``, and
    ``Secure`` over HTTPS and on loopback addresses (which browsers treat as secure origins). Logging in
    always issues a new session token (no session fixation). With ``[server] public_url`` set (behind a
    reverse proxy, where the scheme and host the app sees are the proxy's), ``Secure`` follows that
    URL instead: a TLS-terminating proxy still gets Secure cookies, a plain-http one still gets cookies.

CSRF
    A synchronizer token: ``HMAC(key, "csrf|" + token)`` of the session (or pre-session) token, put in
    every form as ``csrf_token`` (or sent as an ``X-CSRF-Token`` header) and compared in constant time.
    Unsafe requests must also not come from another site: ``Origin`` must be ours when present and
    ``Sec-Fetch-Site`` must be ``same-origin`` when present. "Ours" is the request's own scheme and
    ``Host``, or the origin of ``[server] public_url``: a proxy that rewrites ``Host`` (nginx's default
    ``proxy_pass``) would otherwise make every form look foreign. ``X-Forwarded-Host`` is never trusted
    (anyone can send it). Nothing changes state on GET.

The signing key is ``[server] session_secret`` (or ``DALLEBOT_SERVER_SESSION_SECRET``); when empty,
a random key is created once in ``<data dir>/session_secret`` (mode 0600) and reused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path
from urllib.parse import urlsplit

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_log = logging.getLogger(__name__)

SESSION_COOKIE = "dallebot_session"
PRE_COOKIE = "dallebot_pre"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
SECRET_FILE = "session_secret"
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    # same-origin, not no-referrer: with no-referrer Chromium sends "Origin: null" on our own form POSTs
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=(), payment=()",
}


def load_secret(configured: str, data_dir: Path) -> bytes:
    """The cookie signing key: the configured one, else a random one kept in the data folder."""
    if configured:
        if len(configured) < 32:
            _log.warning("[server] session_secret is shorter than 32 characters; use a long random value")
        return configured.encode("utf-8")
    path = Path(data_dir) / SECRET_FILE
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(48).encode("ascii")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as f:
        f.write(value)
    _log.info("created a session signing key in %s", path)
    return value


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class Signer:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def mac(self, purpose: str, value: str) -> str:
        return _b64(hmac.new(self._key, f"{purpose}|{value}".encode(), hashlib.sha256).digest())

    def sign(self, token: str) -> str:
        return f"{token}.{self.mac('cookie', token)}"

    def unsign(self, cookie: str | None) -> str | None:
        if not cookie or "." not in cookie or len(cookie) > 200:
            return None
        token, _, sig = cookie.rpartition(".")
        # bytes: compare_digest raises TypeError for a str with non-ASCII characters (a 500)
        given = sig.encode("utf-8", "replace")
        return token if hmac.compare_digest(given, self.mac("cookie", token).encode("ascii")) else None

    def csrf_token(self, seed: str) -> str:
        return self.mac("csrf", seed)

    def csrf_ok(self, seed: str | None, given: str | None) -> bool:
        if not seed or not given:
            return False
        return hmac.compare_digest(given.encode("utf-8", "replace"), self.csrf_token(seed).encode())


def cookie_secure(request: Request, public: str | None = None) -> bool:
    """Whether cookies get ``Secure``: from ``public`` (the ``[server] public_url`` origin) when set,
    else from the request as received."""
    url = urlsplit(public) if public else request.url
    return url.scheme == "https" or (url.hostname or "") in LOOPBACK


def set_cookie(response: Response, request: Request, name: str, value: str, max_age: int | None,
               public: str | None = None) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/", secure=cookie_secure(request, public),
                        httponly=True, samesite="strict")


def clear_cookie(response: Response, request: Request, name: str, public: str | None = None) -> None:
    response.delete_cookie(name, path="/", secure=cookie_secure(request, public), httponly=True,
                           samesite="strict")


def own_origins(request: Request, public: str | None = None) -> tuple[str, ...]:
    """The origins this site has: the request's own, and the public URL's when one is configured."""
    own = f"{request.url.scheme}://{request.url.netloc}"
    return (own, public) if public else (own,)


def same_origin(request: Request, public: str | None = None) -> bool:
    """False when the browser says an unsafe request comes from another site."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is not None and origin not in own_origins(request, public):
        return False
    return True


def local_path(target: str | None, default: str = "/") -> str:
    """``target`` if it is a path on this site (for ``next=`` redirects), else ``default``."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return default
    return target


def client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


class SecurityHeaders:
    """ASGI middleware: security headers on every response; ``no-store`` on everything but static."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope.get("path", "").startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for k, v in SECURITY_HEADERS.items():
                    headers[k] = v
                if not static:
                    headers["cache-control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)
