"""Shared fixtures for the end-to-end tests against the local fake platforms.

``offline_guard`` (autouse) makes any attempt to resolve or connect to a
non-loopback address fail the test, so nothing here can reach the real X or
Discord even if a seam was missed: it patches ``socket.getaddrinfo`` (used by
urllib3 and by aiohttp's default threaded resolver) and ``socket.socket.connect``
(plain and asyncio connections), records the attempt, raises ``OSError`` and
fails the test at teardown even if a library swallowed the error.
"""

from __future__ import annotations

import io
import ipaddress
import socket
from collections.abc import Iterator

import pytest
from PIL import Image

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain"}


def _loopback(host: object) -> bool:
    if isinstance(host, bytes):
        host = host.decode()
    if not isinstance(host, str):
        return False
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def offline_guard(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    attempts: list[str] = []
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect

    def guarded_getaddrinfo(host, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host is not None and not _loopback(host):
            attempts.append(f"resolve {host!r}")
            raise socket.gaierror(socket.EAI_NONAME, f"offline test: refusing to resolve {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    def guarded_connect(self, address):  # type: ignore[no-untyped-def]
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
            attempts.append(f"connect {address!r}")
            raise OSError(f"offline test: refusing to connect to {address!r}")
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    yield attempts
    assert not attempts, f"a test tried to reach the network: {attempts}"


def make_png(color: str = "red", size: int = 256) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def png() -> bytes:
    return make_png()
