"""The X/Twitter adapter: poll mentions, store requests, reply in the thread with the images.

Intake (``poll``; ``dallebot serve`` runs it every ``[x] poll_interval`` seconds)
    * Only one process polls: a lease row in the database (:class:`storage.platform_state.Lease`),
      taken or renewed at each poll; another process takes over once it expires.
    * ``GET /2/users/:id/mentions`` with ``since_id`` = the cursor ``x:since_id`` in the database,
      following ``next_token`` to the end. The cursor moves to the first page's ``newest_id`` only
      after every mention of the round was stored; a crash or a 429 mid-round re-reads the same
      mentions next time, and storing is idempotent on the mention id (the root of its edit chain),
      so a restart neither loses nor repeats any. The first poll ever reads one page only (no
      backfill of 800 old mentions). Each round reads from :data:`CURSOR_OVERLAP_SECONDS` before
      the cursor (ids are timestamps): X can list a mention late, after newer ones moved the cursor
      past its id; re-read mentions are stored already and cost nothing more. A mention edited
      before it was stored is taken in its newest version (prompt and post to reply to).
    * Skipped without a reply: the bot's own posts, retweets, and posts that name the bot only in X's
      reply prefix (replies in a thread the bot is part of).
    * The prompt is the displayed text without the leading @mentions and URLs
      (:func:`bot.platforms.text.extract_x_prompt`). Refused mentions (empty, too long, no words,
      paused, banned, daily budget spent) are stored as ``rejected`` and get one friendly reply,
      within ``[x] daily_refusal_budget`` and only when this poll stored them. A refusal whose
      outcome never reached the queue log (the poller died in between, posting was rate-limited,
      or X failed for a while: 5xx, no connection) stays owed, its budget slot given back: the poller
      sends it at a later round, once (:func:`storage.platform_state.owed_refusals`).
    * A round that fails (5xx, no connection, the bot account not found) is one warning; the poller
      then skips 1, 3, 7... rounds (the wait doubles, up to :data:`POLL_BACKOFF_MAX_S`) and is back
      to every interval after a round that works. Deliveries do not wait for it.
    * A page of mentions is admitted at once (:func:`bot.platforms.admission.admit_many`): one
      enqueue statement on PostgreSQL, rate limits decided from one query per kind of limit.

Delivery (the worker, in a thread)
    One reply to the mention with the images: a 2x2 grid by default (one upload), or up to 4 photos.
    Images go through ``POST /2/media/upload``, OAuth 1.0a signed (:mod:`bot.x_media`; tweepy 4.17
    only wraps the deprecated v1.1 upload). The text has the request id (X refuses duplicate text)
    and no URL or prompt echo. ``[x] daily_post_budget`` replies per UTC day over all processes.
    A post that fails after it may have reached X (a read timeout, a connection lost after sending,
    a 5xx) is a ``maybe_posted`` :class:`DeliveryError`: the worker looks for the reply
    (:meth:`XPlatform.find_delivery`) before posting again, and the budget slot stays counted.

Rate limits
    A response hook on the tweepy session reads ``x-rate-limit-remaining/-reset`` (and the 24-hour
    ``x-user-limit-24hour-*`` and ``x-app-limit-24hour-*`` of ``POST /2/tweets``) of every response;
    a route with nothing left, or a 429, is not called again before its (latest) reset. The poller
    skips rounds until then; a delivery waits up to ``[x] max_rate_limit_wait`` seconds, or hands the
    request back with ``retry_after`` (before uploading any image when posting is the one blocked).
    Deleted or protected tweets (403/404 on the reply) fail without retry. Every call has a timeout
    (:data:`HTTP_TIMEOUT`; tweepy sets none), so a hung X fails the try instead of blocking it.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import requests
import tweepy
import urllib3
from PIL import Image

from bot.config import XConfig
from bot.platforms import text as texts
from bot.platforms.admission import BatchCheck, Check, IntakeEvent, admit_many
from bot.platforms.base import Delivery, DeliveryError
from bot.x_media import upload_image_for_client
from storage.platform_state import DailyCounter, Lease, audit, owed_refusals
from storage.queue import Queue
from storage.records import RequestRecord

_log = logging.getLogger(__name__)

CURSOR = "x:since_id"
LEASE = "x:poller"
POST_BUDGET = "x:budget:posts"
REFUSAL_BUDGET = "x:budget:refusals"
MAX_IMAGE_BYTES = 5 * 1024 * 1024
#: How far back a restarted poller looks for refusals that were stored but never answered (seconds).
REFUSAL_RECOVERY_WINDOW = 3600
#: Seconds between two looks for such refusals.
REFUSAL_SWEEP_INTERVAL = 60.0
#: Mentions stored per transaction (one statement on PostgreSQL): a page of the mentions timeline.
ADMIT_BATCH = 100
#: (connect, read) timeout in seconds of every call to X that does not set its own: tweepy sets none,
#: and a call that never returns would hold the poller or a delivery (whose lease is kept renewed) forever.
HTTP_TIMEOUT = (5.0, 30.0)
#: Most pages of the bot's own posts :meth:`XPlatform.find_delivery` reads: X lists the newest 3,200.
TIMELINE_PAGES = 32
#: Seconds before the cursor that each round reads again: a mention X lists late (indexing lag), with an
#: id older than mentions already read, is still found. X ids carry their time in milliseconds above bit 22.
CURSOR_OVERLAP_SECONDS = 60.0
#: Longest wait (seconds) between two mention polls while X keeps failing (5xx, no connection, the bot
#: account not found): after n failures in a row the poller skips 2**n - 1 rounds, up to this.
POLL_BACKOFF_MAX_S = 300.0

MENTION_PARAMS: dict[str, Any] = dict(
    tweet_fields=["author_id", "conversation_id", "created_at", "in_reply_to_user_id", "referenced_tweets",
                  "entities", "display_text_range", "edit_history_tweet_ids"],
    expansions=["author_id"],
    user_fields=["username", "name"],
    max_results=100,
)


def _route(method: str, url: str) -> str:
    """The rate-limit bucket of a request, as this adapter uses them."""
    path = url.split("?", 1)[0]
    if "/media/upload" in path:
        return "upload"
    if path.endswith("/mentions"):
        return "mentions"
    if method == "POST" and path.endswith("/2/tweets"):
        return "post"
    if "/users/" in path and path.endswith("/tweets"):
        return "timeline"
    return "other"


class XPlatform:
    name = "x"

    def __init__(
        self,
        cfg: XConfig,
        queue: Queue,
        *,
        max_prompt_chars: int = 280,
        checks: Sequence[Check | BatchCheck] = (),
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        lease_seconds: float | None = None,
        http_timeout: tuple[float, float] = HTTP_TIMEOUT,
    ) -> None:
        self.cfg = cfg
        self.queue = queue
        self.max_prompt_chars = max_prompt_chars
        self.checks = list(checks)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.clock = clock
        self.sleep = sleep
        self.poll_interval: float | None = cfg.poll_interval
        self.lease_seconds = lease_seconds or max(60.0, 3 * cfg.poll_interval)
        self.client = tweepy.Client(
            bearer_token=cfg.bearer_token or None, consumer_key=cfg.consumer_key or None,
            consumer_secret=cfg.consumer_secret or None, access_token=cfg.access_token or None,
            access_token_secret=cfg.access_token_secret or None, wait_on_rate_limit=False,
        )
        self.client.session.close()
        self.client.session = _TimeoutSession(http_timeout)
        if cfg.api_base_url:
            from bot.fakes.x_transport import mount_fake_x  # loopback only: it refuses anything else

            mount_fake_x(self.client.session, cfg.api_base_url)
        self.client.session.hooks["response"].append(self._observe)
        self.lease = Lease(queue.db, LEASE, clock=queue.clock)
        self.posts = DailyCounter(queue.db, POST_BUDGET, clock=queue.clock)
        self.refusals = DailyCounter(queue.db, REFUSAL_BUDGET, clock=queue.clock)
        self._blocked: dict[str, float] = {}
        self._next_sweep: dt.datetime | None = None  # next look for owed refusals (queue clock)
        self._blocked_lock = threading.Lock()
        self._local = threading.local()  # the last upload response of this thread (for its errors)
        self._poll_failures = 0  # mention polls failed in a row
        # Requests whose last try may have posted (timed out after sending): the budget slot it took
        # stays counted, and the next try (or the reply found) uses it instead of a second one.
        self._held_slots: set[int] = set()
        self._polls_to_skip = 0  # rounds left to skip before the next try (backoff)
        self._bot: tuple[str, str] | None = (
            (cfg.bot_user_id.strip(), _handle(cfg.bot_username))
            if cfg.bot_user_id.strip() and _handle(cfg.bot_username) else None)

    # ---- rate limits ----------------------------------------------------------------------

    def _observe(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        """requests response hook: remember when a route may be called again."""
        route = _route(response.request.method or "GET", response.request.url or "")
        if route == "upload":
            self._local.upload_response = response
        h = response.headers
        resets = []
        if response.status_code == 429 or h.get("x-rate-limit-remaining") == "0":
            resets.append(h.get("x-rate-limit-reset"))
        for scope in ("user", "app"):  # the 24-hour windows of POST /2/tweets: the bot's and the whole app's
            if h.get(f"x-{scope}-limit-24hour-remaining") == "0":
                resets.append(h.get(f"x-{scope}-limit-24hour-reset"))
        until = max((int(r) for r in resets if r is not None and r.isdigit()), default=None)
        with self._blocked_lock:
            if until is not None:
                self._blocked[route] = float(until) + 1.0  # reset is in whole seconds: keep a margin
            elif response.status_code != 429:
                self._blocked.pop(route, None)
            elif self._blocked.get(route, 0.0) <= self.clock():
                # a 429 with no reset header, and no block still running (an expired one is no
                # block): back off a minute
                self._blocked[route] = self.clock() + 60.0

    def _block(self, route: str, reset_time: int | None) -> None:
        with self._blocked_lock:
            if reset_time is not None:
                self._blocked[route] = max(self._blocked.get(route, 0.0), float(reset_time) + 1.0)
            elif self._blocked.get(route, 0.0) <= self.clock():  # an expired block is no block
                self._blocked[route] = self.clock() + 60.0

    def wait_needed(self, route: str) -> float:
        """Seconds before ``route`` may be called again (0: now)."""
        with self._blocked_lock:
            return max(0.0, self._blocked.get(route, 0.0) - self.clock())

    # ---- identity ---------------------------------------------------------------------------

    def bot_identity(self) -> tuple[str, str]:
        """(user id, handle) of the bot account: from the settings, else ``GET /2/users/me`` once."""
        if self._bot is None:
            resp = self.client.get_me(user_auth=True)
            me = resp.data
            if me is None or not getattr(me, "id", None):  # a 200 with only an errors list
                raise XAnswerError(f"X answered GET /2/users/me without the account: {_errors_text(resp.errors)}")
            self._bot = (self.cfg.bot_user_id.strip() or str(me.id), _handle(self.cfg.bot_username) or me.username)
        return self._bot

    # ---- lifecycle (IntakeSource) ---------------------------------------------------------

    async def start(self, *, intake: bool) -> None:
        import asyncio

        if intake:
            try:
                await asyncio.to_thread(self.bot_identity)
            except (tweepy.Unauthorized, tweepy.Forbidden) as exc:
                _log.error("X: the bot account cannot be looked up (check the [x] credentials); "
                           "polling retries it: %s", exc)
            except (tweepy.TweepyException, requests.RequestException) as exc:
                # X down, rate-limited or unreachable: the service (and other platforms) still start
                _log.warning("X: cannot look up the bot account yet; polling retries it: %s", exc)

    async def poll(self) -> int:
        import asyncio

        return await asyncio.to_thread(self.poll_once)

    async def stop(self) -> None:
        import asyncio

        await asyncio.to_thread(self.lease.release, self.owner)
        self.client.session.close()

    # ---- intake ---------------------------------------------------------------------------

    def poll_once(self) -> int:
        """One round: read new mentions and store them; returns how many new requests were stored."""
        if not self.lease.acquire(self.owner, self.lease_seconds):
            return 0  # another process is the poller
        self._send_owed_refusals()
        if self.wait_needed("mentions") > 0:
            return 0  # waiting out a rate limit
        if self._polls_to_skip > 0:
            self._polls_to_skip -= 1  # backing off: X failed the last round(s)
            return 0
        try:
            bot_id, bot_name = self.bot_identity()
        except (tweepy.TweepyException, requests.RequestException) as exc:
            self._poll_failed("cannot look up the bot account", exc)
            return 0
        since = self.queue.get_cursor(CURSOR)
        read_from = _overlapped(since)
        tweets: dict[int, Any] = {}
        users: dict[str, Any] = {}
        newest: int | None = None
        complete = False
        token: str | None = None
        try:
            while True:
                page = self.client.get_users_mentions(bot_id, since_id=read_from, pagination_token=token,
                                                      **MENTION_PARAMS)
                if not page.data and page.errors:  # e.g. a bot_user_id X does not know: say so
                    _log.warning("X: cannot read the mentions of user %s: %s", bot_id,
                                 "; ".join(_error_text(e) for e in page.errors))
                for t in page.data or []:
                    tweets[int(t.id)] = t
                for u in (page.includes or {}).get("users", []):
                    users[str(u.id)] = u
                meta = page.meta or {}
                if newest is None and meta.get("newest_id"):
                    newest = int(meta["newest_id"])
                token = meta.get("next_token")
                if not token or since is None:
                    complete = True
                    break
        except tweepy.TooManyRequests as exc:
            self._block("mentions", exc.reset_time)
            _log.warning("X: mentions rate-limited until %s", exc.reset_time)
        except (tweepy.TweepyException, requests.RequestException) as exc:
            self._poll_failed("polling mentions failed", exc)
        if complete:
            self._poll_failures = 0
        # A mention edited before it was stored comes with its newer version: only the newest is the
        # request (the prompt as its author corrected it, and the post to reply to).
        superseded = {tid for tid, t in tweets.items()
                      if any(int(v) > tid and int(v) in tweets for v in (t.edit_history_tweet_ids or ()))}
        events = [e for tid in sorted(tweets)  # oldest first: the queue serves in arrival order
                  if tid not in superseded and (e := self._event(tweets[tid], users, bot_id, bot_name)) is not None]
        stored = 0
        for start in range(0, len(events), ADMIT_BATCH):
            for adm in admit_many(self.queue, events[start:start + ADMIT_BATCH], max_chars=self.max_prompt_chars,
                                  checks=[_PostBudget(self), *self.checks]):
                if adm.owes_refusal:
                    self._refuse(adm.request, adm.refusal)
                stored += adm.created
        if complete and newest is not None and (since is None or newest > int(since)):
            self.queue.set_cursor(CURSOR, str(newest))
        return stored

    def _poll_failed(self, what: str, exc: BaseException) -> None:
        """One warning, and skip the next rounds: 1, 3, 7... (the wait doubles), up to
        :data:`POLL_BACKOFF_MAX_S`. Deliveries are not held back (they do not poll)."""
        self._poll_failures += 1
        interval = self.poll_interval or 1.0
        most = max(0, math.ceil(POLL_BACKOFF_MAX_S / interval) - 1)
        self._polls_to_skip = min(2 ** min(self._poll_failures, 30) - 1, most)
        _log.warning("X: %s (%d in a row; next try in %.0fs): %s", what, self._poll_failures,
                     (self._polls_to_skip + 1) * interval, " ".join(str(exc).split()))

    def _event(self, tweet: Any, users: dict[str, Any], bot_id: str, bot_name: str) -> IntakeEvent | None:
        """The request a mention asks for, or None for posts that are not requests."""
        author_id = str(tweet.author_id)
        if author_id == bot_id:
            return None
        refs = tweet.referenced_tweets or []
        if any(r.type == "retweeted" for r in refs):
            return None
        text = tweet.text or ""
        shown = tweet.display_text_range
        if not (_names_in_display(tweet, bot_id) or texts.mentions_in_display(text, shown, bot_name)):
            return None
        history = tweet.edit_history_tweet_ids or [tweet.id]
        author = users.get(author_id)
        return IntakeEvent(
            platform=self.name, external_id=str(history[0]), author_id=author_id,
            author_name=getattr(author, "username", "") or "",
            prompt_raw=_without_bot(texts.extract_x_prompt(text, shown), tweet, bot_id, bot_name),
            channel_id=str(tweet.conversation_id) if tweet.conversation_id else None,
            n_images=self.cfg.images, options={"reply_to": str(tweet.id)},
        )

    def _send_owed_refusals(self) -> None:
        """Refusals not answered yet: a poller stored them and died, X failed for a while, or a
        moderator rejected without sending one (the CLI): sent late, once. Only requests refused
        (at intake or by a moderator) in the last hour and more than a lease ago, so a live
        poller's own replies are not raced.
        Looked for once a minute (not every poll), and again at the next poll when a rate limit cut
        the last look short."""
        now = self.queue.clock()
        if self.wait_needed("post") > 0 or (self._next_sweep is not None and now < self._next_sweep):
            return
        owed = owed_refusals(self.queue.db, self.name, since=now - dt.timedelta(seconds=REFUSAL_RECOVERY_WINDOW),
                             before=now - dt.timedelta(seconds=self.lease_seconds))
        for req in owed:
            _log.info("X: sending a refusal owed since before a restart", extra={"request_id": req.id})
            if not self._refuse(req, texts.refusal_text(req.error)):
                if self.wait_needed("post") > 0:
                    return  # rate-limited: look again at the first poll after the reset
                break  # X is failing: look again in a minute
        self._next_sweep = now + dt.timedelta(seconds=REFUSAL_SWEEP_INTERVAL)

    def _refuse(self, req: RequestRecord, message: str | None) -> bool:
        """Reply once to a refused mention, within the daily refusal budget; record what happened.
        While posting is rate-limited, or when X fails for a while (5xx, no connection), nothing is
        recorded and the budget is given back: the refusal stays owed (:meth:`_send_owed_refusals`
        sends it later). Returns False when it stays owed."""
        actor = f"intake:{self.name}"
        if self.wait_needed("post") > 0:
            return False
        if not self.refusals.take(self.cfg.daily_refusal_budget):
            audit(self.queue.db, request_id=req.id, actor=actor, action="refusal_skipped",
                  reason="daily refusal budget spent", clock=self.queue.clock)
            return True
        reply_to = str(req.options.get("reply_to") or req.external_id)
        try:
            resp = self.client.create_tweet(text=texts.x_refusal(message or texts.GENERIC_REFUSAL, req.id),
                                            in_reply_to_tweet_id=reply_to)
            tweet_id = _created_id(resp)
        except tweepy.TooManyRequests as exc:
            self._block("post", exc.reset_time)
            self.refusals.give_back()
            return False  # still owed
        except (tweepy.TwitterServerError, requests.RequestException, XAnswerError) as exc:
            self.refusals.give_back()
            _log.warning("X: refusal not sent, will try again later: %s", exc, extra={"request_id": req.id})
            return False  # still owed
        except tweepy.TweepyException as exc:  # refused for good (a deleted post, ...)
            if isinstance(exc, tweepy.Forbidden) and "duplicate content" in "; ".join(exc.api_messages):
                # its text carries the request id: it went out at a try X acted on without answering
                audit(self.queue.db, request_id=req.id, actor=actor, action="refusal_posted",
                      reason="posted before (X calls this reply a duplicate)", clock=self.queue.clock)
                return True
            self.refusals.give_back()  # nothing was posted
            audit(self.queue.db, request_id=req.id, actor=actor, action="refusal_failed", reason=str(exc)[:500],
                  clock=self.queue.clock)
            return True
        except BaseException:
            self.refusals.give_back()  # nothing was posted
            raise
        audit(self.queue.db, request_id=req.id, actor=actor, action="refusal_posted",
              reason=f"reply {tweet_id}", clock=self.queue.clock)
        return True

    # ---- delivery -------------------------------------------------------------------------

    def _images(self, images: list[Path]) -> list[bytes]:
        from inference.images import make_grid, png_bytes

        paths = images[:4]
        if self.cfg.reply_layout == "separate" or len(paths) == 1:
            out = [Path(p).read_bytes() for p in paths]
        else:
            pics = [Image.open(p).convert("RGB") for p in paths]
            size = pics[0].size
            grid = make_grid([im if im.size == size else im.resize(size) for im in pics])
            out = [png_bytes(grid)]
        for data in out:
            if len(data) > MAX_IMAGE_BYTES:
                raise DeliveryError(f"image of {len(data)} bytes is over X's 5 MB limit", permanent=True)
        return out

    def _call(self, route: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call the API, honouring the route's rate limit: wait a short reset out, else hand back."""
        for _ in range(3):
            wait = self.wait_needed(route)
            if wait > 0:
                if wait > self.cfg.max_rate_limit_wait:
                    raise DeliveryError(f"X rate limit on {route}: resets in {wait:.0f}s", retry_after=wait)
                self.sleep(wait)
            try:
                return fn(*args, **kwargs)
            except tweepy.TooManyRequests as exc:
                self._block(route, exc.reset_time)
            except (tweepy.Forbidden, tweepy.NotFound) as exc:
                detail = "; ".join(exc.api_messages) or str(exc)
                if "duplicate content" in detail:
                    raise _DuplicateContent(detail) from exc
                status = exc.response.status_code
                # A reply to a deleted, protected or invisible post: no retry will help.
                raise DeliveryError(f"X refused ({status}): {detail}", permanent=route == "post") from exc
            except tweepy.BadRequest as exc:
                raise DeliveryError(f"X rejected the request: {exc}", permanent=True) from exc
            except (tweepy.TweepyException, requests.RequestException) as exc:
                # A post X may have made without answering (a timeout or a connection lost after it
                # was sent, a 5xx): the worker looks for it before posting again.
                raise DeliveryError(f"X call failed: {exc}", maybe_posted=route == "post" and _maybe_sent(exc)) from exc
        raise DeliveryError(f"X rate limit on {route}", retry_after=max(1.0, self.wait_needed(route)))

    def deliver(self, request: RequestRecord, images: list[Path]) -> Delivery:
        if not images:
            raise DeliveryError("no images to post", permanent=True)
        if request.id not in self._held_slots and not self.posts.take(self.cfg.daily_post_budget):
            raise DeliveryError("the daily X posting budget is spent", retry_after=self.posts.seconds_to_reset())
        self._held_slots.discard(request.id)
        reply_to = str(request.options.get("reply_to") or request.external_id)
        try:
            wait = self.wait_needed("post")
            if wait > self.cfg.max_rate_limit_wait:  # known before uploading: spend no upload on it
                raise DeliveryError(f"X rate limit on post: resets in {wait:.0f}s", retry_after=wait)
            payloads = self._images(images)
            media_ids = [self._call("upload", self._upload, data).id for data in payloads]
            resp = self._call("post", self.client.create_tweet, text=texts.x_result(request.id, len(images[:4]),
                                                                                    request.seed),
                              in_reply_to_tweet_id=reply_to, media_ids=media_ids)
            tweet_id = _created_id(resp)
        except _DuplicateContent as exc:  # posted before (a crash, or X acted on a try it did not answer)
            try:
                found = self.find_delivery(request)
            except BaseException:
                self.posts.give_back()
                raise
            if found is not None:
                return found
            self.posts.give_back()
            # The text carries the request id: that reply exists. X lists a new post among the bot's
            # only after a moment, so this is a try to repeat (with backoff), not a failure for good.
            raise DeliveryError(f"X says this reply was posted already ({exc}), but it is not among the bot's "
                                "posts yet") from exc
        except XAnswerError as exc:  # a 200 without the post: nothing to show for it, try again
            self.posts.give_back()
            raise DeliveryError(str(exc)) from exc
        except DeliveryError as exc:
            if exc.maybe_posted:  # the reply may be out: its slot stays counted until we know
                self._held_slots.add(request.id)
            else:
                self.posts.give_back()  # nothing was posted: a failed try does not spend the budget
            raise
        except BaseException:
            self.posts.give_back()  # nothing was posted: a failed try does not spend the budget
            raise
        return self._delivery(tweet_id)

    def _upload(self, data: bytes) -> Any:
        """One image through ``POST /2/media/upload``; a 200 that carries only ``errors`` (no media id)
        is an :class:`XAnswerError` naming them, where it was a bare KeyError."""
        self._local.upload_response = None
        try:
            return upload_image_for_client(self.client, data)
        except (KeyError, TypeError) as exc:  # UploadedMedia.from_response: no data (or no id) in a 200
            response = getattr(self._local, "upload_response", None)
            try:
                errors = response.json().get("errors") if response is not None else None
            except (ValueError, AttributeError):
                errors = None
            raise XAnswerError(f"X answered the media upload without a media id: {_errors_text(errors)}") from exc

    def deliver_refusal(self, request: RequestRecord, message: str) -> Delivery:
        """A moderator rejected ``request``: reply with ``message`` (within the refusal budget)."""
        if not self.refusals.take(self.cfg.daily_refusal_budget):
            raise DeliveryError("the daily X refusal budget is spent", permanent=True)
        reply_to = str(request.options.get("reply_to") or request.external_id)
        try:
            resp = self._call("post", self.client.create_tweet, text=texts.x_refusal(message, request.id),
                              in_reply_to_tweet_id=reply_to)
            tweet_id = _created_id(resp)
        except XAnswerError as exc:
            self.refusals.give_back()
            raise DeliveryError(str(exc)) from exc
        except _DuplicateContent as exc:
            self.refusals.give_back()
            raise DeliveryError(f"X refused the refusal as duplicate content: {exc}", permanent=True) from exc
        except BaseException:
            self.refusals.give_back()  # nothing was posted: a failed try does not spend the budget
            raise
        return self._delivery(tweet_id)

    def _delivery(self, tweet_id: str) -> Delivery:
        name = self._bot[1] if self._bot else "i"
        return Delivery(reply_id=tweet_id, reply_url=f"https://x.com/{name}/status/{tweet_id}")

    def find_delivery(self, request: RequestRecord) -> Delivery | None:
        """A reply with media to this mention among the bot's posts since the mention, if any: every
        page of them (a busy bot posts more than one page, 100, before a retry comes round)."""
        reply_to = str(request.options.get("reply_to") or request.external_id)
        token: str | None = None
        for _ in range(TIMELINE_PAGES):
            try:
                bot_id, _ = self._call("other", self.bot_identity)
                resp = self._call("timeline", self.client.get_users_tweets, bot_id, since_id=reply_to,
                                  max_results=100, pagination_token=token,
                                  tweet_fields=["referenced_tweets", "attachments"], user_auth=True)
            except _DuplicateContent:  # not raised by reads
                return None
            for t in resp.data or []:
                replied = any(r.type == "replied_to" and str(r.id) == reply_to for r in (t.referenced_tweets or []))
                if replied and (t.attachments or {}).get("media_keys"):
                    self._held_slots.discard(request.id)  # the slot a timed-out try kept is this reply's
                    return self._delivery(str(t.id))
            token = (resp.meta or {}).get("next_token")
            if not token:
                break
        return None


def _names_in_display(tweet: Any, user_id: str) -> bool:
    """Whether a mention entity of account ``user_id`` is in the displayed text (not in X's reply
    prefix): by id, so a renamed bot account (or a handle misspelt in the settings) still counts."""
    rng = tweet.display_text_range
    start = int(rng[0]) if rng and len(rng) == 2 else 0
    mentions = (tweet.entities or {}).get("mentions") or []
    return any(str(m.get("id")) == user_id and int(m.get("start", -1)) >= start for m in mentions)


def _without_bot(prompt: str, tweet: Any, bot_id: str, bot_name: str) -> str:
    """``prompt`` without @mentions of the bot anywhere in it ("a red fox @bot" is a red fox): the
    handle would go to the model as words, and count against the prompt's length."""
    names = {bot_name} | {str(m.get("username")) for m in (tweet.entities or {}).get("mentions") or []
                          if str(m.get("id")) == bot_id and m.get("username")}
    pattern = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.sub(rf"(?i)\s*(?<![\w@])[@\uff20](?:{pattern})\b", "", prompt).strip()


def _handle(name: str) -> str:
    """The bot's handle as X spells it in mentions: without a leading @ (as people write it)."""
    return name.strip().lstrip("@\uff20")


def _error_text(error: Any) -> str:
    """One error object of an X response (a partial error: HTTP 200 with ``errors``) as text."""
    if isinstance(error, dict):
        return str(error.get("detail") or error.get("message") or error.get("title") or error)
    return str(error)


def _errors_text(errors: Any) -> str:
    """The ``errors`` of an X response as one line (or a note that there were none)."""
    if not errors:
        return "no data and no errors in the answer"
    if not isinstance(errors, list):
        errors = [errors]
    return "; ".join(_error_text(e) for e in errors)[:500]


def _created_id(resp: Any) -> str:
    """The id of the post ``create_tweet`` made; a 200 without one is an :class:`XAnswerError`."""
    data = resp.data if isinstance(resp.data, dict) else None
    if not data or not data.get("id"):
        raise XAnswerError(f"X answered the post without its id: {_errors_text(resp.errors)}")
    return str(data["id"])


def _maybe_sent(exc: BaseException) -> bool:
    """Whether a call that failed with ``exc`` may have reached X and been acted on: not when no
    connection was made (refused, unresolvable, connect timeout) or X refused it (an answer that
    says so); yes for a read timeout, a connection lost after sending, a broken answer or a 5xx."""
    if isinstance(exc, tweepy.TwitterServerError):
        return True
    if isinstance(exc, (requests.ConnectTimeout, requests.exceptions.ProxyError, requests.exceptions.SSLError)):
        return False
    if isinstance(exc, requests.ConnectionError):
        reason = exc.args[0] if exc.args else None
        reason = getattr(reason, "reason", reason)  # urllib3's MaxRetryError wraps the cause
        return not isinstance(reason, (urllib3.exceptions.NewConnectionError,
                                       urllib3.exceptions.ConnectTimeoutError))
    return isinstance(exc, (requests.Timeout, requests.exceptions.ChunkedEncodingError,
                            requests.exceptions.ContentDecodingError))


def _overlapped(since: str | None) -> str | None:
    """The ``since_id`` of a round: :data:`CURSOR_OVERLAP_SECONDS` before the cursor ``since``."""
    if since is None:
        return None
    return str(max(1, int(since) - (int(CURSOR_OVERLAP_SECONDS * 1000) << 22)))


class _PostBudget:
    """Intake check: refuse new requests once today's posting budget is spent (one lookup a batch)."""

    def __init__(self, x: XPlatform) -> None:
        self.x = x

    def check_many(self, events: Sequence[IntakeEvent]) -> list[str | None]:
        spent = self.x.posts.used() >= self.x.cfg.daily_post_budget
        return [texts.DAILY_LIMIT if spent else None for _ in events]


class _DuplicateContent(Exception):
    pass


class XAnswerError(tweepy.TweepyException):
    """X answered 200 without the data asked for (only an ``errors`` list): a passing failure on its
    side, retried like a 5xx."""


class _TimeoutSession(requests.Session):
    """A session whose requests time out (``timeout``, as requests takes it) unless the caller sets
    its own: tweepy calls ``session.request`` with no timeout, which waits forever on a hung server."""

    def __init__(self, timeout: tuple[float, float]) -> None:
        super().__init__()
        self.timeout = timeout

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        if len(args) < 7 and kwargs.get("timeout") is None:  # (timeout is Session.request's 9th parameter)
            kwargs["timeout"] = self.timeout
        return super().request(method, url, *args, **kwargs)

