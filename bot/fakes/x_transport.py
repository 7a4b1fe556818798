"""A ``requests`` transport adapter that sends X API traffic to a local fake.

tweepy 4.17 hard-codes its hosts: ``Client.request()`` builds every URL from a
local ``host = "https://api.twitter.com"``, ``tweepy.API`` uses
``api.twitter.com``/``upload.twitter.com``, and X's own docs use ``api.x.com``.
None of these can be configured, but every tweepy client keeps a
``requests.Session`` in ``.session``, and ``requests`` picks the adapter for a
request by URL prefix.  Mounting :class:`FakeXAdapter` on that session is the
supported seam: tweepy's code runs unchanged, including OAuth 1.0a signing,
which happens before the adapter sees the request.

Usage::

    from bot.fakes.x_server import FakeX
    from bot.fakes.x_transport import mount_fake_x

    with FakeX() as fake:
        client = tweepy.Client(bearer_token=..., consumer_key=..., ...)
        mount_fake_x(client.session, fake.base_url)

The adapter

* rewrites ``https://api.twitter.com``, ``https://api.x.com``,
  ``https://upload.twitter.com`` and ``https://upload.x.com`` to the fake's
  ``http://127.0.0.1:<port>``;
* adds an ``X-Fake-Original-Url`` header holding the URL the client signed, so
  the fake can verify OAuth 1.0a signatures (a signature covers the URL);
* refuses (``requests.ConnectionError``) any other non-loopback host, so a test
  that forgot a rewrite fails instead of reaching the internet;
* ignores proxy settings from the environment for the rewritten requests.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

__all__ = ["FakeXAdapter", "mount_fake_x", "X_HOSTS", "ORIGINAL_URL_HEADER"]

#: Hosts whose traffic goes to the fake.
X_HOSTS = frozenset({"api.twitter.com", "api.x.com", "upload.twitter.com", "upload.x.com"})

#: Header carrying the URL as the client built (and signed) it.
ORIGINAL_URL_HEADER = "X-Fake-Original-Url"

_LOOPBACK_NAMES = frozenset({"localhost"})


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class FakeXAdapter(HTTPAdapter):
    """Send X API requests to ``base_url`` (``http://127.0.0.1:PORT``) instead."""

    def __init__(self, base_url: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.base_url = base_url.rstrip("/")
        target = urlsplit(self.base_url).hostname or ""
        if not _is_loopback(target):
            raise ValueError(f"FakeXAdapter only targets loopback servers, not {base_url!r}")

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        url = request.url or ""
        parts = urlsplit(url)
        host = parts.hostname or ""
        if host in X_HOSTS:
            request.headers[ORIGINAL_URL_HEADER] = url
            rest = url[len(f"{parts.scheme}://{parts.netloc}") :]
            request.url = self.base_url + rest
        elif not _is_loopback(host):
            raise requests.ConnectionError(f"FakeXAdapter refuses to contact {host!r}: tests stay offline")
        kwargs["proxies"] = {}
        return super().send(request, *args, **kwargs)


def mount_fake_x(session: requests.Session, base_url: str) -> FakeXAdapter:
    """Route all of ``session``'s HTTP(S) traffic through a :class:`FakeXAdapter`.

    Mounting on the bare ``https://`` and ``http://`` prefixes (rather than on
    each X host) means a request to any unexpected host is refused too.
    Returns the adapter so callers can close it.
    """
    adapter = FakeXAdapter(base_url)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.trust_env = False
    return adapter
