"""A fake X API v2 server on 127.0.0.1 for tests and offline runs.

It is a Starlette app served by uvicorn in a background thread, with all state
in memory.  The real ``tweepy.Client`` talks to it through
:func:`bot.fakes.x_transport.mount_fake_x` (see that module for why a transport
adapter is the seam); code that calls the API directly can use
:attr:`FakeX.base_url`.

Starting it from a test::

    from bot.fakes.x_server import FakeX
    from bot.fakes.x_transport import mount_fake_x

    with FakeX() as fake:                       # binds 127.0.0.1:<ephemeral>
        client = tweepy.Client(**fake.credentials())
        mount_fake_x(client.session, fake.base_url)
        alice = fake.add_user("alice")
        mention = fake.add_mention(alice, "an astronaut riding a horse")
        page = client.get_users_mentions(fake.bot.id, since_id=...)

Standalone (for trying the bot offline)::

    python -m bot.fakes.x_server --port 8081 --mention "alice: a cat made of sushi"

It then serves a small control API for adding mentions while the bot runs::

    curl -X POST localhost:8081/_fake/mentions -d '{"username": "bob", "text": "a red fox"}'
    curl localhost:8081/_fake/state

Endpoints (paths as on api.x.com):

* ``GET  /2/users/{id}/mentions``  since_id/until_id/start_time/end_time,
  max_results (5-100), pagination_token, tweet.fields, user.fields,
  media.fields, expansions; newest first, ``meta`` as X sends it.
* ``GET  /2/users/{id}/tweets``    the same parameters plus ``exclude``.
* ``POST /2/tweets``               text, reply.in_reply_to_tweet_id, media.media_ids
  (user context only); 201.  Rejects duplicate text, replies to deleted or
  invisible tweets and, like self-serve access, replies to authors who did not
  mention the bot (403).
* ``GET/DELETE /2/tweets/{id}``, ``GET /2/users/me``, ``GET /2/users/{id}``,
  ``GET /2/users/by/username/{username}``.
* ``POST /2/media/upload``         one-shot upload, multipart (``media`` bytes) or
  JSON (``media`` base64); ``media_category`` required; OAuth 1.0a user
  context required.  ``POST /1.1/media/upload.json`` (v1.1 simple upload) too.

Authentication: the configured Bearer token (app context) or an OAuth 1.0a
``Authorization`` header whose HMAC-SHA1 signature is checked against the
configured consumer and token secrets (over ``X-Fake-Original-Url`` when the
transport adapter supplied it, else over the URL the request arrived at).

Every response carries ``x-rate-limit-limit/-remaining/-reset`` from per-route,
per-identity 15-minute windows (limits from X's 2026 rate-limit table);
exhausting a window gives a real 429.  Routes given ``daily_limits`` (``POST /2/tweets``
on X) also carry ``x-user-limit-24hour-*`` and ``x-app-limit-24hour-*`` from 24-hour
windows per user and for the whole app; a spent day is a 429 whose 15-minute
headers still show requests left, as X answers it.  Faults can be injected on top: see
:meth:`FakeX.inject_rate_limit` (also without rate-limit headers),
:meth:`FakeX.inject_server_error`, :meth:`FakeX.inject_hang` (a server that does not answer),
:meth:`FakeX.inject_late_answer` (a request acted on, its answer held) and
:meth:`FakeX.inject_partial_error` (status 200 with only ``errors``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import dataclasses
import datetime as dt
import hmac
import itertools
import json
import logging
import re
import socket
import struct
import threading
import time
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import uvicorn
from oauthlib.oauth1.rfc5849 import signature as oauth_signature
from oauthlib.oauth1.rfc5849 import utils as oauth_utils
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bot.fakes.x_transport import ORIGINAL_URL_HEADER

__all__ = ["FakeX", "XUser", "XTweet", "XMedia", "RecordedXRequest", "XFault", "XHang", "snowflake"]

_log = logging.getLogger(__name__)

TWITTER_EPOCH_MS = 1288834974657
RATE_WINDOW_S = 15 * 60
DAY_WINDOW_S = 24 * 3600
MAX_MENTIONS_VISIBLE = 800
MAX_IMAGE_BYTES = 5 * 1024 * 1024

#: (per-user limit, per-app limit) per 15 minutes; None: that context is not allowed.
RATE_LIMITS: dict[str, tuple[int, int | None]] = {
    "GET /2/users/:id/mentions": (300, 450),
    "GET /2/users/:id/tweets": (900, 1500),
    "GET /2/users/me": (75, None),
    "GET /2/users/:id": (900, 300),
    "GET /2/users/by/username/:username": (900, 300),
    "GET /2/tweets/:id": (900, 450),
    "POST /2/tweets": (100, None),
    "DELETE /2/tweets/:id": (50, None),
    "POST /2/media/upload": (500, None),
    "POST /1.1/media/upload.json": (500, None),
}

TWEET_FIELDS = frozenset(
    "attachments article author_id card_uri community_id context_annotations conversation_id created_at "
    "display_text_range edit_controls edit_history_tweet_ids entities geo id in_reply_to_user_id lang "
    "media_metadata non_public_metrics note_tweet organic_metrics possibly_sensitive promoted_metrics "
    "public_metrics referenced_tweets reply_settings scopes source text withheld".split()
)
USER_FIELDS = frozenset(
    "affiliation connection_status created_at description entities id location most_recent_tweet_id name "
    "pinned_tweet_id profile_banner_url profile_image_url protected public_metrics receives_your_dm "
    "subscription_type url username verified verified_type withheld".split()
)
MEDIA_FIELDS = frozenset(
    "alt_text duration_ms height media_key non_public_metrics organic_metrics preview_image_url "
    "promoted_metrics public_metrics type url variants width".split()
)
EXPANSIONS = frozenset(
    "attachments.media_keys attachments.poll_ids author_id edit_history_tweet_ids entities.mentions.username "
    "geo.place_id in_reply_to_user_id referenced_tweets.id referenced_tweets.id.author_id".split()
)
USER_EXPANSIONS = frozenset({"pinned_tweet_id", "affiliation.user_id", "most_recent_tweet_id"})

_MENTION_RE = re.compile(r"(?<![\w@])@(\w{1,15})")
_seq = itertools.count(1)


def snowflake(unix_s: float) -> str:
    """An X-style id for ``unix_s``: time in the high bits, a counter below."""
    ms = int(unix_s * 1000) - TWITTER_EPOCH_MS
    return str((ms << 22) | (next(_seq) & 0x3FFFFF))


def _iso(unix_s: float) -> str:
    return dt.datetime.fromtimestamp(unix_s, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.") + (
        f"{int(unix_s * 1000) % 1000:03d}Z"
    )


def _parse_time(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


@dataclasses.dataclass
class XUser:
    id: str
    username: str
    name: str
    protected: bool = False
    verified: bool = False
    created_at: float = 0.0
    description: str = ""

    def render(self, fields: Iterable[str]) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "name": self.name, "username": self.username}
        for f in fields:
            if f in ("protected", "verified", "description"):
                out[f] = getattr(self, f)
            elif f == "created_at":
                out[f] = _iso(self.created_at)
            elif f == "verified_type":
                out[f] = "blue" if self.verified else "none"
            elif f == "public_metrics":
                out[f] = {"followers_count": 0, "following_count": 0, "tweet_count": 0, "listed_count": 0}
            elif f == "profile_image_url":
                out[f] = f"https://pbs.twimg.com/profile_images/{self.id}/normal.png"
        return out


@dataclasses.dataclass
class XMedia:
    id: str
    media_key: str
    data: bytes
    mime_type: str
    category: str
    owner_id: str
    width: int | None
    height: int | None
    created: float
    expires_after_secs: int = 86400

    def render(self, fields: Iterable[str]) -> dict[str, Any]:
        out: dict[str, Any] = {"media_key": self.media_key, "type": "photo"}
        for f in fields:
            if f == "width" and self.width is not None:
                out[f] = self.width
            elif f == "height" and self.height is not None:
                out[f] = self.height
            elif f == "url":
                out[f] = f"https://pbs.twimg.com/media/{self.media_key}.png"
        return out


@dataclasses.dataclass
class XTweet:
    id: str
    text: str
    author_id: str
    created_at: float
    conversation_id: str
    in_reply_to_user_id: str | None = None
    referenced_tweets: list[dict[str, str]] = dataclasses.field(default_factory=list)
    mentions: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    display_start: int = 0
    edit_history_tweet_ids: list[str] = dataclasses.field(default_factory=list)
    media_keys: list[str] = dataclasses.field(default_factory=list)
    lang: str = "en"
    #: Not returned by lookups or timelines (the user deleted it).
    deleted: bool = False
    #: Not yet in timelines (indexing lag); lookups still see it.
    hidden: bool = False
    #: Status a reply to this tweet fails with (403 like X; 404 on request).
    reply_error: int = 403

    @property
    def mention_ids(self) -> set[str]:
        return {m["id"] for m in self.mentions}

    @property
    def replied_to(self) -> str | None:
        return next((r["id"] for r in self.referenced_tweets if r["type"] == "replied_to"), None)

    def render(self, fields: Iterable[str]) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "text": self.text, "edit_history_tweet_ids": self.edit_history_tweet_ids}
        for f in fields:
            if f in ("author_id", "conversation_id", "lang"):
                out[f] = getattr(self, f)
            elif f == "created_at":
                out[f] = _iso(self.created_at)
            elif f == "in_reply_to_user_id" and self.in_reply_to_user_id:
                out[f] = self.in_reply_to_user_id
            elif f == "referenced_tweets" and self.referenced_tweets:
                out[f] = [dict(r) for r in self.referenced_tweets]
            elif f == "entities" and self.mentions:
                out[f] = {"mentions": [dict(m) for m in self.mentions]}
            elif f == "display_text_range":
                out[f] = [self.display_start, len(self.text)]
            elif f == "possibly_sensitive":
                out[f] = False
            elif f == "attachments" and self.media_keys:
                out[f] = {"media_keys": list(self.media_keys)}
            elif f == "reply_settings":
                out[f] = "everyone"
            elif f == "edit_controls":
                out[f] = {"edits_remaining": 5, "is_edit_eligible": True, "editable_until": _iso(self.created_at + 1800)}
            elif f == "public_metrics":
                out[f] = {"retweet_count": 0, "reply_count": 0, "like_count": 0, "quote_count": 0}
        return out


@dataclasses.dataclass
class RecordedXRequest:
    method: str
    path: str
    route: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    auth: str  # "user:<id>", "app", "none" or "invalid"
    status: int = 0
    response: Any = None
    response_headers: dict[str, str] = dataclasses.field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)


@dataclasses.dataclass
class XFault:
    """An injected failure: ``status`` for ``count`` requests or until ``until``."""

    route: str  # a RATE_LIMITS key, or "*"
    status: int
    count: int | None
    until: float | None
    reset_at: float | None = None
    hits: int = 0
    #: A 429 with ``x-rate-limit-*`` headers (False: none, as X sometimes answers).
    rate_headers: bool = True
    #: The body of a status-200 fault: a partial error (``errors`` and no ``data``).
    body: dict[str, Any] | None = None

    def matches(self, route: str, now: float) -> bool:
        if self.route not in ("*", route):
            return False
        if self.count is not None:
            return self.hits < self.count
        return self.until is None or now < self.until


@dataclasses.dataclass
class XHang:
    """An injected stall: the next ``count`` requests to ``route`` get no answer until
    :meth:`release` (or the server stops, or ``seconds`` of real time pass); then they are
    handled as usual, as a slow X may still act on a request its client gave up on."""

    route: str  # a RATE_LIMITS key, or "*"
    count: int
    seconds: float
    held: int = 0  # requests held so far
    released: threading.Event = dataclasses.field(default_factory=threading.Event)

    def matches(self, route: str) -> bool:
        return self.route in ("*", route) and self.held < self.count

    def release(self) -> None:
        self.released.set()


class _ApiError(Exception):
    def __init__(self, status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status, body)
        self.status = status
        self.body = body
        self.headers = dict(headers or {})


def _problem(status: int, title: str, detail: str, type_: str = "about:blank", **extra: Any) -> _ApiError:
    return _ApiError(status, {"title": title, "detail": detail, "type": type_, "status": status, **extra})


def _invalid(param: str, value: str, message: str) -> _ApiError:
    return _ApiError(
        400,
        {
            "errors": [{"parameters": {param: [value]}, "message": message}],
            "title": "Invalid Request",
            "detail": "One or more parameters to your request was invalid.",
            "type": "https://api.twitter.com/2/problems/invalid-request",
        },
    )


def _image_info(data: bytes) -> tuple[str, int | None, int | None]:
    """MIME type and size of a PNG/JPEG/GIF/WEBP, from its header."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24:
        w, h = struct.unpack(">II", data[16:24])
        return "image/png", w, h
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg", None, None
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        w, h = struct.unpack("<HH", data[6:10])
        return "image/gif", w, h
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp", None, None
    raise _invalid("media", "<bytes>", "media is not a supported image (JPG, PNG, GIF, WEBP)")


class FakeX:
    """In-memory X API v2 with a scripting API; see the module docstring.

    All public methods are thread-safe: the server runs in its own thread.
    ``clock`` (Unix seconds) drives ids, timestamps, rate-limit windows and
    injected resets, so tests can pass a settable clock.
    """

    def __init__(
        self,
        *,
        bot_username: str = "dalle_mini_bot",
        bearer_token: str = "fake-bearer-token",
        consumer_key: str = "fake-consumer-key",
        consumer_secret: str = "fake-consumer-secret",
        access_token: str = "fake-access-token",
        access_token_secret: str = "fake-access-token-secret",
        clock: Callable[[], float] = time.time,
        reject_duplicate_text: bool = True,
        require_summoned_replies: bool = True,
        verify_signatures: bool = True,
        rate_limits: Mapping[str, tuple[int, int | None]] | None = None,
        daily_limits: Mapping[str, tuple[int | None, int | None]] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.bearer_token = bearer_token
        self.consumer_key = consumer_key
        self.consumer_secret = consumer_secret
        self.access_token = access_token
        self.access_token_secret = access_token_secret
        self.clock = clock
        self.reject_duplicate_text = reject_duplicate_text
        self.require_summoned_replies = require_summoned_replies
        self.verify_signatures = verify_signatures
        #: Per-route (user, app) limits per 15 minutes; override some in tests.
        self.rate_limits = {**RATE_LIMITS, **(rate_limits or {})}
        #: Per-route (per-user, per-app) limits per 24 hours (None: no such limit); none by default.
        self.daily_limits = dict(daily_limits or {})
        #: Posts made through POST /2/tweets stay out of timelines until :meth:`reveal` (indexing lag).
        self.hide_new_posts = False
        self.host = host
        self.port = port

        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self.users: dict[str, XUser] = {}
        self.tweets: dict[str, XTweet] = {}
        self.media: dict[str, XMedia] = {}
        self.requests: list[RecordedXRequest] = []
        self.faults: list[XFault] = []
        self.hangs: list[XHang] = []
        self.late_answers: list[XHang] = []
        self._windows: dict[tuple[str, str], tuple[float, int]] = {}
        self._day_windows: dict[tuple[str, str], tuple[float, int]] = {}
        self._redeliver: dict[str, int] = {}
        self._nonces: set[tuple[str, str]] = set()
        self.bot = self.add_user(bot_username, name="DALL·E mini bot")

        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.app = self._build_app()

    # ------------------------------------------------------------------ lifecycle

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def credentials(self) -> dict[str, str]:
        """Keyword arguments for ``tweepy.Client``/``requests_oauthlib.OAuth1`` use."""
        return {
            "bearer_token": self.bearer_token,
            "consumer_key": self.consumer_key,
            "consumer_secret": self.consumer_secret,
            "access_token": self.access_token,
            "access_token_secret": self.access_token_secret,
        }

    def start(self, timeout: float = 10.0) -> FakeX:
        """Serve on ``host:port`` (port 0: ephemeral) from a daemon thread."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_level="warning", lifespan="off", ws="none", http="h11", access_log=False
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="fake-x", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("fake X server did not start")
            time.sleep(0.005)
        self._sock = sock
        return self

    def stop(self, timeout: float = 10.0) -> None:
        for hang in [*self.hangs, *self.late_answers]:
            hang.release()  # held requests finish, so the server can shut down
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout)
            self._server = self._thread = None
            self._sock.close()

    def __enter__(self) -> FakeX:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ scripting API

    def add_user(self, username: str, *, name: str | None = None, protected: bool = False,
                 verified: bool = False) -> XUser:
        with self._lock:
            user = XUser(id=snowflake(self.clock()), username=username, name=name or username.title(),
                         protected=protected, verified=verified, created_at=self.clock())
            self.users[user.id] = user
            return user

    def user_by_name(self, username: str) -> XUser | None:
        with self._lock:
            return next((u for u in self.users.values() if u.username.lower() == username.lower()), None)

    def add_tweet(self, author: XUser, text: str, *, reply_to: XTweet | None = None, hidden: bool = False,
                  tweet_id: str | None = None, created_at: float | None = None) -> XTweet:
        """Post a tweet as ``author``.  A reply gets X's ``@parent_author`` prefix,
        which ``display_text_range`` skips."""
        with self._lock:
            now = self.clock() if created_at is None else created_at
            display_start = 0
            referenced: list[dict[str, str]] = []
            in_reply_to_user_id = None
            tid = tweet_id or snowflake(now)
            conversation_id = tid
            if reply_to is not None:
                parent_author = self.users[reply_to.author_id]
                prefix = f"@{parent_author.username} "
                if not text.startswith(prefix):
                    text = prefix + text
                display_start = len(prefix)
                referenced = [{"type": "replied_to", "id": reply_to.id}]
                in_reply_to_user_id = reply_to.author_id
                conversation_id = reply_to.conversation_id
            tweet = XTweet(
                id=tid, text=text, author_id=author.id, created_at=now, conversation_id=conversation_id,
                in_reply_to_user_id=in_reply_to_user_id, referenced_tweets=referenced,
                mentions=self._entities(text), display_start=display_start, edit_history_tweet_ids=[tid],
                hidden=hidden,
            )
            self.tweets[tid] = tweet
            self._changed.notify_all()
            return tweet

    def add_mention(self, author: XUser, text: str, *, reply_to: XTweet | None = None, hidden: bool = False,
                    tweet_id: str | None = None, created_at: float | None = None) -> XTweet:
        """A tweet from ``author`` mentioning the bot: ``text`` gets a leading
        ``@bot`` unless it already mentions it.  ``hidden=True`` keeps it out of
        timelines until :meth:`reveal` (an out-of-order arrival: its id is older
        than mentions the bot may already have seen).  ``tweet_id`` forces an id,
        e.g. one older than the bot's ``since_id``."""
        if f"@{self.bot.username}".lower() not in text.lower():
            text = f"@{self.bot.username} {text}"
        return self.add_tweet(author, text, reply_to=reply_to, hidden=hidden, tweet_id=tweet_id,
                              created_at=created_at)

    def reveal(self, tweet: XTweet) -> None:
        with self._lock:
            tweet.hidden = False
            self._changed.notify_all()

    def edit_tweet(self, tweet: XTweet, new_text: str) -> XTweet:
        """Edit like X does: a new post id, with the edit chain in
        ``edit_history_tweet_ids`` (oldest first) on both versions."""
        with self._lock:
            now = self.clock()
            new = dataclasses.replace(
                tweet, id=snowflake(now), text=new_text, created_at=now, mentions=self._entities(new_text),
                edit_history_tweet_ids=[*tweet.edit_history_tweet_ids],
            )
            new.edit_history_tweet_ids.append(new.id)
            tweet.edit_history_tweet_ids = list(new.edit_history_tweet_ids)
            self.tweets[new.id] = new
            self._changed.notify_all()
            return new

    def delete_tweet(self, tweet: XTweet, *, reply_error: int = 403) -> None:
        """The author deletes ``tweet``: lookups miss it, replies fail with
        ``reply_error`` (403, "deleted or not visible", as X answers; or 404)."""
        with self._lock:
            tweet.deleted = True
            tweet.reply_error = reply_error

    def protect_user(self, user: XUser, protected: bool = True) -> None:
        """Protect ``user``'s account: the bot no longer sees their tweets and
        replies to them fail with 403."""
        with self._lock:
            user.protected = protected

    def redeliver(self, tweet: XTweet, times: int = 1) -> None:
        """Return ``tweet`` in the next ``times`` mentions responses even where
        ``since_id`` excludes it: a duplicate delivery."""
        with self._lock:
            self._redeliver[tweet.id] = self._redeliver.get(tweet.id, 0) + times

    def inject_rate_limit(self, route: str = "*", *, count: int | None = 1, reset_after: float = 1.0,
                          rate_headers: bool = True) -> XFault:
        """Answer 429 on ``route`` (a ``RATE_LIMITS`` key like
        ``"GET /2/users/:id/mentions"``, or ``"*"``) for the next ``count``
        requests, or for every request until the reset when ``count`` is None.
        ``x-rate-limit-reset`` is ``now + reset_after`` in epoch seconds;
        ``rate_headers=False`` sends the 429 with no ``x-rate-limit-*`` headers."""
        with self._lock:
            reset_at = self.clock() + reset_after
            fault = XFault(route, 429, count, reset_at if count is None else None, reset_at,
                           rate_headers=rate_headers)
            self.faults.append(fault)
            return fault

    def inject_hang(self, route: str = "*", *, count: int = 1, seconds: float = 30.0) -> XHang:
        """Hold the next ``count`` requests to ``route`` unanswered until the returned
        :class:`XHang` is released (or ``seconds`` pass, or the server stops): a hung X.
        :meth:`wait_for` sees each request as it is held (``hang.held``)."""
        with self._lock:
            hang = XHang(route, count, seconds)
            self.hangs.append(hang)
            return hang

    def inject_late_answer(self, route: str = "*", *, count: int = 1, seconds: float = 30.0) -> XHang:
        """Handle the next ``count`` requests to ``route`` at once (a post is made and listed), but
        hold their answers until the returned :class:`XHang` is released (or ``seconds`` pass, or the
        server stops): X acting on a call whose client gives up waiting (a read timeout)."""
        with self._lock:
            late = XHang(route, count, seconds)
            self.late_answers.append(late)
            return late

    def inject_server_error(self, route: str = "*", *, status: int = 503, count: int | None = 1,
                            duration: float | None = None) -> XFault:
        """Answer ``status`` (5xx) on ``route`` for ``count`` requests, or for
        ``duration`` seconds when ``count`` is None."""
        with self._lock:
            until = None if duration is None else self.clock() + duration
            fault = XFault(route, status, count, until)
            self.faults.append(fault)
            return fault

    def inject_partial_error(self, route: str = "*", *, count: int | None = 1,
                             errors: list[dict[str, Any]] | None = None) -> XFault:
        """Answer ``route`` with status 200 and only an ``errors`` list (no ``data``) for the next
        ``count`` requests (or all, when None), as X does when it cannot do what was asked but the
        request itself was fine (e.g. a user it cannot find, or an upload it failed to process)."""
        with self._lock:
            body = {"errors": errors or [{"title": "Service Unavailable", "type": "about:blank",
                                          "detail": "Something went wrong; try again later."}]}
            fault = XFault(route, 200, count, None, body=body)
            self.faults.append(fault)
            return fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()
            for hang in [*self.hangs, *self.late_answers]:
                hang.release()
            self.hangs.clear()
            self.late_answers.clear()

    def replies_to(self, tweet: XTweet | str) -> list[XTweet]:
        tid = tweet if isinstance(tweet, str) else tweet.id
        with self._lock:
            return [t for t in self.tweets.values() if t.replied_to == tid and not t.deleted]

    def tweets_by(self, user: XUser) -> list[XTweet]:
        with self._lock:
            return sorted((t for t in self.tweets.values() if t.author_id == user.id), key=lambda t: int(t.id))

    def requests_to(self, route: str) -> list[RecordedXRequest]:
        with self._lock:
            return [r for r in self.requests if r.route == route]

    def wait_for(self, predicate: Callable[[FakeX], Any], timeout: float = 5.0) -> Any:
        """Block until ``predicate(self)`` is truthy (checked after every request);
        return its value or raise ``TimeoutError``.  From async code use
        ``await asyncio.to_thread(fake.wait_for, ...)``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not (result := predicate(self)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("condition not met on the fake X server")
                self._changed.wait(left)
            return result

    # ------------------------------------------------------------------ internals

    def _entities(self, text: str) -> list[dict[str, Any]]:
        out = []
        for m in _MENTION_RE.finditer(text):
            user = self.user_by_name(m.group(1))
            if user is not None:
                out.append({"start": m.start(), "end": m.end(), "username": user.username, "id": user.id})
        return out

    def _visible_to_bot(self, tweet: XTweet) -> bool:
        author = self.users.get(tweet.author_id)
        return not tweet.deleted and not (author and author.protected and author.id != self.bot.id)

    def _build_app(self) -> Starlette:
        r = self._route
        routes = [
            Route("/2/users/me", r("GET /2/users/me", self._get_me), methods=["GET"]),
            Route("/2/users/by/username/{username}", r("GET /2/users/by/username/:username", self._get_user_by_name),
                  methods=["GET"]),
            Route("/2/users/{id}/mentions", r("GET /2/users/:id/mentions", self._get_mentions), methods=["GET"]),
            Route("/2/users/{id}/tweets", r("GET /2/users/:id/tweets", self._get_user_tweets), methods=["GET"]),
            Route("/2/users/{id}", r("GET /2/users/:id", self._get_user), methods=["GET"]),
            Route("/2/tweets", r("POST /2/tweets", self._post_tweet, user_only=True), methods=["POST"]),
            Route("/2/tweets/{id}", r("GET /2/tweets/:id", self._get_tweet), methods=["GET"]),
            Route("/2/tweets/{id}", r("DELETE /2/tweets/:id", self._delete_tweet, user_only=True),
                  methods=["DELETE"]),
            Route("/2/media/upload", r("POST /2/media/upload", self._upload_v2, user_only=True), methods=["POST"]),
            Route("/1.1/media/upload.json", r("POST /1.1/media/upload.json", self._upload_v11, user_only=True),
                  methods=["POST"]),
            Route("/_fake/mentions", self._control_add_mention, methods=["POST"]),
            Route("/_fake/state", self._control_state, methods=["GET"]),
        ]
        return Starlette(routes=routes)

    def _route(self, key: str, handler: Callable[..., Any], *, user_only: bool = False) -> Callable[..., Any]:
        async def endpoint(request: Request) -> Response:
            body = await request.body()
            with self._lock:
                hang = next((h for h in self.hangs if h.matches(key)), None)
                if hang is not None:
                    hang.held += 1
                    self._changed.notify_all()
            if hang is not None:  # a hung server: no answer until released (the loop serves others)
                await asyncio.to_thread(hang.released.wait, hang.seconds)
            form = None
            ctype = request.headers.get("content-type", "")
            if ctype.startswith("multipart/form-data") or ctype.startswith("application/x-www-form-urlencoded"):
                form = await request.form()
            rec = RecordedXRequest(
                method=request.method, path=request.url.path, route=key, query=dict(request.query_params),
                headers=dict(request.headers), body=body, auth="none",
            )
            with self._lock:
                now = self.clock()
                headers: dict[str, str] = {}
                try:
                    identity = self._authenticate(request, form, user_only=user_only)
                    rec.auth = identity
                    headers = self._rate_headers(key, identity, now)
                    self._daily_headers(key, identity, now, headers)
                    self._apply_faults(key, now, headers)
                    status, payload = handler(request, identity, rec, form)
                except _ApiError as e:
                    status, payload = e.status, e.body
                    headers.update(e.headers)
                rec.status, rec.response, rec.response_headers = status, payload, dict(headers)
                self.requests.append(rec)
                late = next((h for h in self.late_answers if h.matches(key)), None)
                if late is not None:
                    late.held += 1
                self._changed.notify_all()
            if form is not None:
                await form.close()
            if late is not None:  # handled, but the answer comes late (or never, for a client that gave up)
                await asyncio.to_thread(late.released.wait, late.seconds)
            return JSONResponse(payload, status_code=status, headers=headers)

        return endpoint

    def _authenticate(self, request: Request, form: Any, *, user_only: bool) -> str:
        header = request.headers.get("authorization", "")
        if header.startswith("Bearer "):
            if not hmac.compare_digest(header[7:], self.bearer_token):
                raise _problem(401, "Unauthorized", "Unauthorized")
            if user_only:
                raise _problem(
                    403, "Unsupported Authentication",
                    "Authenticating with OAuth 2.0 Application-Only is forbidden for this endpoint.  Supported "
                    "authentication types are [OAuth 1.0a User Context, OAuth 2.0 User Context].",
                    "https://api.twitter.com/2/problems/unsupported-authentication",
                )
            return "app"
        if header.startswith("OAuth "):
            self._verify_oauth1(request, header, form)
            return f"user:{self.bot.id}"
        raise _problem(401, "Unauthorized", "Unauthorized")

    def _verify_oauth1(self, request: Request, header: str, form: Any) -> None:
        bad = _problem(401, "Unauthorized", "Unauthorized")
        try:
            params = {k: oauth_utils.unescape(v) for k, v in oauth_utils.parse_authorization_header(header)}
        except (ValueError, IndexError):
            raise bad from None
        required = {"oauth_consumer_key", "oauth_nonce", "oauth_signature", "oauth_signature_method",
                    "oauth_timestamp", "oauth_token", "oauth_version"}
        if not required <= params.keys() or params["oauth_version"] != "1.0":
            raise bad
        if params["oauth_signature_method"] != "HMAC-SHA1":
            raise bad
        if params["oauth_consumer_key"] != self.consumer_key or params["oauth_token"] != self.access_token:
            raise bad
        if not self.verify_signatures:
            return
        if abs(int(params["oauth_timestamp"]) - time.time()) > 300:
            raise bad
        nonce = (params["oauth_nonce"], params["oauth_timestamp"])
        if nonce in self._nonces:
            raise bad
        url = request.headers.get(ORIGINAL_URL_HEADER) or str(request.url)
        query = url.split("?", 1)[1] if "?" in url else ""
        body = None
        if form is not None and request.headers.get("content-type", "").startswith(
                "application/x-www-form-urlencoded"):
            body = [(k, v) for k, v in form.multi_items()]
        collected = oauth_signature.collect_parameters(
            uri_query=query, body=body, headers={"Authorization": header}, exclude_oauth_signature=True,
        )
        base = oauth_signature.signature_base_string(
            request.method.upper(), oauth_signature.base_string_uri(url),
            oauth_signature.normalize_parameters(collected),
        )
        secrets = types.SimpleNamespace(client_secret=self.consumer_secret,
                                        resource_owner_secret=self.access_token_secret)
        expected = oauth_signature.sign_hmac_sha1_with_client(base, secrets)
        if not hmac.compare_digest(expected, params["oauth_signature"]):
            _log.info("OAuth1 signature mismatch for %s %s", request.method, url)
            raise bad
        self._nonces.add(nonce)

    def _rate_headers(self, key: str, identity: str, now: float) -> dict[str, str]:
        user_limit, app_limit = self.rate_limits[key]
        limit = app_limit if identity == "app" else user_limit
        assert limit is not None  # app context was refused by _authenticate
        start, used = self._windows.get((key, identity), (now, 0))
        if now >= start + RATE_WINDOW_S:
            start, used = now, 0
        reset = str(int(start + RATE_WINDOW_S))
        if used >= limit:
            raise _ApiError(429, {"title": "Too Many Requests", "detail": "Too Many Requests",
                                  "type": "about:blank", "status": 429},
                            {"x-rate-limit-limit": str(limit), "x-rate-limit-remaining": "0",
                             "x-rate-limit-reset": reset})
        self._windows[(key, identity)] = (start, used + 1)
        return {"x-rate-limit-limit": str(limit), "x-rate-limit-remaining": str(limit - used - 1),
                "x-rate-limit-reset": reset}

    def _daily_headers(self, key: str, identity: str, now: float, headers: dict[str, str]) -> None:
        """The 24-hour windows of ``key`` (user and app): their headers, or a 429 when one is spent."""
        if key not in self.daily_limits:
            return
        spent = False
        windows = []
        for scope, who, limit in (("user", identity, self.daily_limits[key][0]),
                                  ("app", "app", self.daily_limits[key][1])):
            if limit is None:
                continue
            start, used = self._day_windows.get((key, who), (now, 0))
            if now >= start + DAY_WINDOW_S:
                start, used = now, 0
            spent = spent or used >= limit
            windows.append((scope, who, limit, start, used))
        for scope, who, limit, start, used in windows:
            if not spent:
                used += 1
                self._day_windows[(key, who)] = (start, used)
            headers.update({f"x-{scope}-limit-24hour-limit": str(limit),
                            f"x-{scope}-limit-24hour-remaining": str(max(0, limit - used)),
                            f"x-{scope}-limit-24hour-reset": str(int(start + DAY_WINDOW_S))})
        if spent:
            raise _ApiError(429, {"title": "Too Many Requests", "detail": "Too Many Requests",
                                  "type": "about:blank", "status": 429}, headers)

    def _apply_faults(self, key: str, now: float, headers: dict[str, str]) -> None:
        for fault in self.faults:
            if not fault.matches(key, now):
                continue
            fault.hits += 1
            if fault.status == 200:
                raise _ApiError(200, dict(fault.body or {}), headers)
            if fault.status == 429:
                headers["x-rate-limit-remaining"] = "0"
                headers["x-rate-limit-reset"] = str(int(fault.reset_at or now))
                if not fault.rate_headers:
                    for name in ("x-rate-limit-limit", "x-rate-limit-remaining", "x-rate-limit-reset"):
                        headers.pop(name, None)
                raise _ApiError(429, {"title": "Too Many Requests", "detail": "Too Many Requests",
                                      "type": "about:blank", "status": 429}, headers)
            raise _ApiError(fault.status, {"title": "Service Unavailable", "detail": "Service Unavailable",
                                           "type": "about:blank", "status": fault.status}, headers)

    # ---- field selection

    @staticmethod
    def _fields(request: Request, name: str, allowed: frozenset[str]) -> list[str]:
        raw = request.query_params.get(name)
        if not raw:
            return []
        fields = raw.split(",")
        for f in fields:
            if f not in allowed:
                raise _invalid(name, f, f"The `{name}` query parameter value [{f}] is not one of "
                                        f"[{','.join(sorted(allowed))}]")
        return fields

    def _render_tweets(self, request: Request, tweets: list[XTweet]) -> tuple[list[dict], dict[str, list]]:
        tweet_fields = self._fields(request, "tweet.fields", TWEET_FIELDS)
        user_fields = self._fields(request, "user.fields", USER_FIELDS)
        media_fields = self._fields(request, "media.fields", MEDIA_FIELDS)
        expansions = self._fields(request, "expansions", EXPANSIONS)
        data = [t.render(tweet_fields) for t in tweets]
        user_ids: dict[str, None] = {}
        ref_tweets: dict[str, XTweet] = {}
        media_keys: dict[str, None] = {}
        for t in tweets:
            if "author_id" in expansions:
                user_ids[t.author_id] = None
            if "in_reply_to_user_id" in expansions and t.in_reply_to_user_id:
                user_ids[t.in_reply_to_user_id] = None
            if "entities.mentions.username" in expansions:
                user_ids.update(dict.fromkeys(m["id"] for m in t.mentions))
            if "attachments.media_keys" in expansions:
                media_keys.update(dict.fromkeys(t.media_keys))
            if "referenced_tweets.id" in expansions or "referenced_tweets.id.author_id" in expansions:
                for ref in t.referenced_tweets:
                    parent = self.tweets.get(ref["id"])
                    if parent is not None and self._visible_to_bot(parent):
                        ref_tweets[parent.id] = parent
                        if "referenced_tweets.id.author_id" in expansions:
                            user_ids[parent.author_id] = None
        includes: dict[str, list] = {}
        if user_ids:
            includes["users"] = [self.users[u].render(user_fields) for u in user_ids if u in self.users]
        if ref_tweets:
            includes["tweets"] = [t.render(tweet_fields) for t in ref_tweets.values()]
        if media_keys:
            by_key = {m.media_key: m for m in self.media.values()}
            includes["media"] = [by_key[k].render(media_fields) for k in media_keys if k in by_key]
        return data, includes

    def _timeline(self, request: Request, candidates: list[XTweet], *, forced: Iterable[XTweet] = ()) -> dict:
        q = request.query_params
        self._render_tweets(request, [])  # validates the field and expansion names even for empty pages
        max_results = q.get("max_results", "10")
        if not max_results.isdigit() or not 5 <= int(max_results) <= 100:
            raise _invalid("max_results", max_results,
                           f"The `max_results` query parameter value [{max_results}] is not between 5 and 100")
        since_id, until_id = q.get("since_id"), q.get("until_id")
        for name, value in (("since_id", since_id), ("until_id", until_id)):
            if value is not None and not value.isdigit():
                raise _invalid(name, value, f"The `{name}` query parameter value [{value}] is not valid")
        if since_id and until_id and int(since_id) >= int(until_id):
            raise _invalid("since_id", since_id, "since_id must be less than until_id")
        start = _parse_time(q["start_time"]) if "start_time" in q else None
        end = _parse_time(q["end_time"]) if "end_time" in q else None
        token = q.get("pagination_token")
        if token is not None and not (token.startswith("p_") and token[2:].isdigit()):
            raise _invalid("pagination_token", token, "The `pagination_token` query parameter value is invalid")

        def selected(t: XTweet) -> bool:
            return ((since_id is None or int(t.id) > int(since_id))
                    and (until_id is None or int(t.id) < int(until_id))
                    and (start is None or t.created_at >= start) and (end is None or t.created_at < end))

        ordered = sorted(candidates, key=lambda t: int(t.id), reverse=True)
        matching = [t for t in ordered if selected(t)]
        if token is None:
            extra = [t for t in forced if t not in matching]
            matching = sorted(matching + extra, key=lambda t: int(t.id), reverse=True)
        else:
            matching = [t for t in matching if int(t.id) < int(token[2:])]
        page, rest = matching[: int(max_results)], matching[int(max_results):]
        if not page:
            return {"meta": {"result_count": 0}}
        data, includes = self._render_tweets(request, page)
        body: dict[str, Any] = {"data": data}
        if includes:
            body["includes"] = includes
        meta: dict[str, Any] = {"result_count": len(page), "newest_id": page[0].id, "oldest_id": page[-1].id}
        if rest:
            meta["next_token"] = f"p_{page[-1].id}"
        body["meta"] = meta
        return body

    # ---- handlers: each returns (status, payload) with the lock held

    def _get_me(self, request: Request, identity: str, rec: RecordedXRequest, form: Any) -> tuple[int, dict]:
        if not identity.startswith("user:"):
            raise _problem(403, "Unsupported Authentication", "OAuth 2.0 Application-Only is forbidden here.",
                           "https://api.twitter.com/2/problems/unsupported-authentication")
        return 200, {"data": self.bot.render(self._fields(request, "user.fields", USER_FIELDS))}

    def _lookup_user(self, user_id: str) -> XUser:
        user = self.users.get(user_id)
        if user is None:
            raise _ApiError(200, {"errors": [{"value": user_id, "detail": f"Could not find user with id: [{user_id}].",
                                              "title": "Not Found Error", "resource_type": "user",
                                              "parameter": "id", "resource_id": user_id,
                                              "type": "https://api.twitter.com/2/problems/resource-not-found"}]})
        return user

    def _get_user(self, request: Request, identity: str, rec: RecordedXRequest, form: Any) -> tuple[int, dict]:
        user = self._lookup_user(request.path_params["id"])
        return 200, {"data": user.render(self._fields(request, "user.fields", USER_FIELDS))}

    def _get_user_by_name(self, request: Request, identity: str, rec: RecordedXRequest,
                          form: Any) -> tuple[int, dict]:
        name = request.path_params["username"]
        user = self.user_by_name(name)
        if user is None:
            return 200, {"errors": [{"value": name, "detail": f"Could not find user with username: [{name}].",
                                     "title": "Not Found Error", "resource_type": "user", "parameter": "username",
                                     "type": "https://api.twitter.com/2/problems/resource-not-found"}]}
        return 200, {"data": user.render(self._fields(request, "user.fields", USER_FIELDS))}

    def _get_mentions(self, request: Request, identity: str, rec: RecordedXRequest, form: Any) -> tuple[int, dict]:
        user = self._lookup_user(request.path_params["id"])
        mentions = [t for t in self.tweets.values()
                    if user.id in t.mention_ids and not t.hidden and self._visible_to_bot(t)]
        mentions = sorted(mentions, key=lambda t: int(t.id), reverse=True)[:MAX_MENTIONS_VISIBLE]
        forced = []
        if request.query_params.get("pagination_token") is None:
            for tid, left in list(self._redeliver.items()):
                tweet = self.tweets.get(tid)
                if tweet is not None and left > 0:
                    forced.append(tweet)
                    self._redeliver[tid] = left - 1
        return 200, self._timeline(request, mentions, forced=forced)

    def _get_user_tweets(self, request: Request, identity: str, rec: RecordedXRequest,
                         form: Any) -> tuple[int, dict]:
        user = self._lookup_user(request.path_params["id"])
        exclude = set(filter(None, request.query_params.get("exclude", "").split(",")))
        if not exclude <= {"replies", "retweets"}:
            raise _invalid("exclude", ",".join(exclude), "exclude must be one of [replies,retweets]")
        tweets = [t for t in self.tweets.values()
                  if t.author_id == user.id and self._visible_to_bot(t) and not t.hidden
                  and not ("replies" in exclude and t.replied_to)]
        return 200, self._timeline(request, tweets)

    def _get_tweet(self, request: Request, identity: str, rec: RecordedXRequest, form: Any) -> tuple[int, dict]:
        tid = request.path_params["id"]
        tweet = self.tweets.get(tid)
        if tweet is None or not self._visible_to_bot(tweet):
            detail = (f"Sorry, you are not authorized to see the Tweet with id: [{tid}]."
                      if tweet is not None and not tweet.deleted else f"Could not find tweet with id: [{tid}].")
            return 200, {"errors": [{"value": tid, "detail": detail, "title": "Not Found Error",
                                     "resource_type": "tweet", "parameter": "id", "resource_id": tid,
                                     "type": "https://api.twitter.com/2/problems/resource-not-found"}]}
        data, includes = self._render_tweets(request, [tweet])
        return 200, {"data": data[0], **({"includes": includes} if includes else {})}

    def _delete_tweet(self, request: Request, identity: str, rec: RecordedXRequest,
                      form: Any) -> tuple[int, dict]:
        tweet = self.tweets.get(request.path_params["id"])
        if tweet is None or tweet.author_id != self.bot.id:
            raise _problem(403, "Forbidden", "You are not allowed to delete this Tweet.")
        tweet.deleted = True
        return 200, {"data": {"deleted": True}}

    def _post_tweet(self, request: Request, identity: str, rec: RecordedXRequest, form: Any) -> tuple[int, dict]:
        try:
            body = json.loads(rec.body or b"{}")
        except ValueError:
            raise _invalid("body", "", "Request body is not valid JSON") from None
        text = body.get("text")
        media_ids = list(body.get("media", {}).get("media_ids", []))
        reply = body.get("reply") or {}
        if text is None and not media_ids:
            raise _invalid("text", "", "One of text or media is required")
        if text is not None and len(text) > 280:
            raise _invalid("text", text[:20], "Your Tweet text is too long.")
        if len(media_ids) > 4 or not all(isinstance(m, str) for m in media_ids):
            raise _invalid("media.media_ids", str(media_ids), "media_ids must be 1-4 strings")
        for mid in media_ids:
            media = self.media.get(mid)
            if media is None or media.owner_id != self.bot.id or self.clock() > media.created + media.expires_after_secs:
                raise _invalid("media.media_ids", mid, f"Your media IDs are invalid: [{mid}]")
        parent = None
        if reply:
            parent_id = str(reply.get("in_reply_to_tweet_id", ""))
            parent = self.tweets.get(parent_id)
            if parent is None or not self._visible_to_bot(parent):
                status = parent.reply_error if parent is not None else 403
                raise _problem(status, "Forbidden" if status == 403 else "Not Found Error",
                               "You attempted to reply to a Tweet that is deleted or not visible to you.")
            if self.require_summoned_replies and parent.author_id != self.bot.id and (
                    self.bot.id not in parent.mention_ids):
                raise _problem(403, "Forbidden",
                               "Reply to this conversation is not allowed because you have not been mentioned or "
                               "otherwise engaged by the author of the post you are replying to.")
        if self.reject_duplicate_text and text and any(
                t.author_id == self.bot.id and t.text.removeprefix(self._reply_prefix(t)) == text
                and not t.deleted for t in self.tweets.values()):
            raise _problem(403, "Forbidden", "You are not allowed to create a Tweet with duplicate content.")
        bot = self.bot
        tweet = self.add_tweet(bot, text or "", reply_to=parent, hidden=self.hide_new_posts)
        tweet.media_keys = [self.media[m].media_key for m in media_ids]
        return 201, {"data": {"id": tweet.id, "text": tweet.text, "edit_history_tweet_ids": [tweet.id]}}

    def _reply_prefix(self, tweet: XTweet) -> str:
        return tweet.text[: tweet.display_start]

    def _store_media(self, data: bytes, category: str | None, declared_type: str | None) -> XMedia:
        if not data:
            raise _invalid("media", "", "media is required")
        if len(data) > MAX_IMAGE_BYTES:
            raise _invalid("media", "<bytes>", "Image file size must be <= 5242880 bytes")
        mime, w, h = _image_info(data)
        if declared_type and declared_type != mime:
            raise _invalid("media_type", declared_type, f"media_type {declared_type} does not match the content")
        mid = snowflake(self.clock())
        media = XMedia(id=mid, media_key=f"3_{mid}", data=data, mime_type=mime, category=category or "tweet_image",
                       owner_id=self.bot.id, width=w, height=h, created=self.clock())
        self.media[mid] = media
        return media

    def _upload_v2(self, request: Request, identity: str, rec: RecordedXRequest, form: Any) -> tuple[int, dict]:
        if form is not None:
            upload = form.get("media")
            data = upload.file.read() if hasattr(upload, "file") else (upload or "").encode()
            category, mtype = form.get("media_category"), form.get("media_type")
        else:
            try:
                body = json.loads(rec.body or b"{}")
                data = base64.b64decode(body.get("media", ""), validate=True)
            except (ValueError, binascii.Error):
                raise _invalid("media", "", "media must be base64 in a JSON body, or multipart") from None
            category, mtype = body.get("media_category"), body.get("media_type")
        if category not in ("tweet_image", "tweet_gif", "dm_image", "subtitles", "amplify_video", "tweet_video"):
            raise _invalid("media_category", str(category), "media_category is required (e.g. tweet_image)")
        media = self._store_media(data, str(category), mtype)
        return 200, {"data": {"id": media.id, "media_key": media.media_key, "size": len(media.data),
                              "expires_after_secs": media.expires_after_secs,
                              "image": {"image_type": media.mime_type, "w": media.width, "h": media.height}}}

    def _upload_v11(self, request: Request, identity: str, rec: RecordedXRequest, form: Any) -> tuple[int, dict]:
        if form is None:
            raise _ApiError(400, {"errors": [{"code": 38, "message": "media parameter is missing."}]})
        upload = form.get("media")
        if hasattr(upload, "file"):
            data = upload.file.read()
        elif form.get("media_data"):
            data = base64.b64decode(form["media_data"])
        else:
            raise _ApiError(400, {"errors": [{"code": 38, "message": "media parameter is missing."}]})
        media = self._store_media(data, form.get("media_category"), None)
        return 200, {"media_id": int(media.id), "media_id_string": media.id, "media_key": media.media_key,
                     "size": len(media.data), "expires_after_secs": media.expires_after_secs,
                     "image": {"image_type": media.mime_type, "w": media.width, "h": media.height}}

    # ---- control API for standalone use

    async def _control_add_mention(self, request: Request) -> Response:
        body = await request.json()
        user = self.user_by_name(body["username"]) or self.add_user(body["username"])
        tweet = self.add_mention(user, body["text"])
        return JSONResponse({"id": tweet.id, "text": tweet.text})

    async def _control_state(self, request: Request) -> Response:
        with self._lock:
            return JSONResponse({
                "bot": dataclasses.asdict(self.bot),
                "users": [dataclasses.asdict(u) for u in self.users.values()],
                "tweets": [{**dataclasses.asdict(t)} for t in sorted(self.tweets.values(), key=lambda t: int(t.id))],
                "media": [{"id": m.id, "size": len(m.data), "type": m.mime_type} for m in self.media.values()],
            })


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the fake X API v2 server on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--bot-username", default="dalle_mini_bot")
    parser.add_argument("--mention", action="append", default=[], metavar="USER: TEXT",
                        help="seed a mention (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    fake = FakeX(bot_username=args.bot_username, port=args.port)
    for spec in args.mention:
        username, _, text = spec.partition(":")
        fake.add_mention(fake.user_by_name(username.strip()) or fake.add_user(username.strip()), text.strip())
    fake.start()
    print(f"fake X API at {fake.base_url}; bot @{fake.bot.username} id {fake.bot.id}")
    print("credentials:", json.dumps(fake.credentials()))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        fake.stop()


if __name__ == "__main__":
    main()
