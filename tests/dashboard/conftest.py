"""Fixtures for the dashboard tests: an App on a real database, the ASGI app, logged-in clients.

Passwords are hashed with argon2id at a low cost here (the production default is argon2-cffi's
64 MiB, 3 passes; `test_cli_moderator.py` exercises it) so the suite stays fast.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from argon2 import PasswordHasher
from starlette.applications import Starlette
from starlette.testclient import TestClient

from bot.app import App, open_app
from bot.config import load_settings
from bot.web import create_web_app
from storage.moderators import Moderators
from storage.records import RequestRecord
from tests.conftest import FakeClock

SESSION_SECRET = "test-session-secret-0123456789-abcdefghijklmnop"
PASSWORD = "correct horse battery staple"
CSRF_RE = re.compile(r'name="csrf_token" value="([^"]*)"')


def cheap_hasher() -> PasswordHasher:
    return PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


def png_bytes(size: int = 8, rgb: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    """A tiny valid PNG (solid colour), written without Pillow."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    raw = b"".join(b"\x00" + bytes(rgb) * size for _ in range(size))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def settings_for(data_dir: Path, db_url: str, **env: str):  # type: ignore[no-untyped-def]
    return load_settings(env={"DALLEBOT_DATA_DIR": str(data_dir), "DALLEBOT_DATABASE_URL": db_url,
                              "DALLEBOT_SERVER_SESSION_SECRET": SESSION_SECRET, **env})


@pytest.fixture
def app(tmp_path: Path, db_url: str) -> Iterator[App]:
    with open_app(settings_for(tmp_path / "data", db_url), auto_upgrade=True) as a:
        yield a


@pytest.fixture
def web_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def moderator(app: App) -> str:
    Moderators(app.queue, hasher=cheap_hasher()).add("alice", PASSWORD, actor="test")
    return "alice"


@pytest.fixture
def client(app: App, moderator: str) -> Iterator[TestClient]:
    web = create_web_app(app, hasher=cheap_hasher())
    with TestClient(web, follow_redirects=False) as c:
        yield c


def csrf_of(html: str) -> str:
    m = CSRF_RE.search(html)
    assert m, "no CSRF token in the page"
    return m.group(1)


def login(c: TestClient, name: str = "alice", password: str = PASSWORD, *, next_path: str = "/"):  # type: ignore[no-untyped-def]
    page = c.get("/login", params={"next": next_path})
    assert page.status_code == 200
    return c.post("/login", data={"name": name, "password": password, "csrf_token": csrf_of(page.text),
                                  "next": next_path})


@pytest.fixture
def logged_in(client: TestClient) -> TestClient:
    r = login(client)
    assert r.status_code == 303, r.text
    return client


def make_held(app: App, prompt: str = "a red circle", *, user: str = "bob", user_name: str = "",
              reason: str = "nsfw score 0.91 over 0.5", n_images: int = 2) -> RequestRecord:
    """A request held for review with real PNG files, made through the queue API (no model)."""
    rec = app.local.submit(app.queue, prompt, user=user, user_name=user_name, n_images=n_images).request
    claim = app.queue.claim("test-worker", 1)
    assert claim.ids == [rec.id], "make_held expects an otherwise empty queue"
    folder = Path(app.settings.images_dir) / str(rec.id)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n_images):
        p = folder / f"{k}.png"
        p.write_bytes(png_bytes(rgb=(200, 40 + 80 * k, 40)))
        paths.append(str(p))
    return app.queue.complete(claim, rec.id, paths, [0.91, 0.12][:n_images], hold_reason=reason)


def listen() -> tuple[socket.socket, int]:
    """A socket bound to 127.0.0.1 on a port the OS picks, and the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


def run_uvicorn(web: Starlette, sock: socket.socket) -> Iterator[None]:
    """Serve ``web`` on a real uvicorn in a thread while the (one-item) generator is open."""
    srv = uvicorn.Server(uvicorn.Config(web, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        sock.close()
