"""The moderator dashboard: the queue log, request detail, the held-for-review inbox, moderator
actions, bans, the pause switches, live counters and a prompt box on the local platform.

Every route but ``/login`` (and ``/static``, ``/healthz``, ``/metrics``, served by :mod:`bot.web`)
needs a session; every POST needs a valid CSRF token (:class:`Dashboard.guard`). Moderator actions go
through :mod:`bot.moderation`, the one place that decides what they do, with ``moderator:<name>`` as
the actor in the audit log. Database calls run in worker threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

from starlette.convertors import Convertor, register_url_convertor
from starlette.datastructures import FormData, QueryParams
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from bot import moderation
from bot.config import public_origin
from bot.dashboard import auth
from bot.dashboard.render import STATIC_DIR, make_templates
from bot.intake import PromptRejected
from storage import states
from storage.errors import IllegalTransition, NotFound, StorageError
from storage.models import utcnow
from storage.moderators import (SWITCHES, LoginPolicy, Moderators, PasswordHasher, SessionRecord, Switches, activity,
                                user_actions)
from storage.states import Status

if TYPE_CHECKING:  # hints only: the web layer is handed an App by bot.web, it never builds one
    from bot.app import App

_log = logging.getLogger(__name__)

PAGE_SIZE = 50
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
ACTION_TARGETS = {"approve": None, "reject": Status.REJECTED, "requeue": Status.QUEUED,
                  "cancel": Status.CANCELLED, "hold": Status.HELD}
MAX_ID = 2**63 - 1  # request ids are BIGINTs: nothing larger can be in the database


def parse_id(text: str) -> int | None:
    """``text`` as a request id: ASCII digits meaning 1 to :data:`MAX_ID`, else None. (``str.isdigit``
    is true for '²' and other digits ``int`` refuses; a larger number overflows the database.)"""
    if not text.isascii() or not text.isdigit() or len(text.lstrip("0")) > len(str(MAX_ID)):
        return None
    n = int(text)
    return n if 1 <= n <= MAX_ID else None


class NumberConvertor(Convertor[int]):
    """A path number of at most 19 ASCII digits (``{rid:num}``): a longer one matches no route
    (404), where Starlette's ``int`` would let ``int()`` refuse 4301 digits with a 500. Handlers
    check the range of ids (:data:`MAX_ID`) themselves."""

    regex = "[0-9]{1,19}"

    def convert(self, value: str) -> int:
        return int(value)

    def to_string(self, value: int) -> str:
        return str(value)


register_url_convertor("num", NumberConvertor())


def _seen(text: str) -> dt.datetime | None:
    """The ``seen`` time a form carries (naive UTC, as the queue log), or None (an older page)."""
    try:
        t = dt.datetime.fromisoformat(text) if text else None
        return t.astimezone(dt.UTC).replace(tzinfo=None) if t is not None and t.tzinfo else t
    except (ValueError, OverflowError):
        return None


def nul_field(params: QueryParams, form: FormData | None) -> str | None:
    """The name of the first query or form field with a NUL character in it (a password aside: it
    is never stored), or None. PostgreSQL cannot store NUL in text; no sane input has one."""
    fields = [*params.multi_items(), *(form.multi_items() if form is not None else [])]
    for key, value in fields:
        if "\x00" in key or (key != "password" and isinstance(value, str) and "\x00" in value):
            return key.replace("\x00", "\\0")[:40]
    return None


@dataclass
class Visit:
    """What the guard learned about one request."""

    session: SessionRecord | None
    seed: str | None  # the session (or pre-session) token that the CSRF token is derived from
    new_pre: str | None = None  # a pre-session token to set as a cookie
    form: FormData | None = None

    @property
    def actor(self) -> str:
        assert self.session is not None
        return self.session.moderator.actor

    def field(self, name: str, limit: int = 2000) -> str:
        value = self.form.get(name) if self.form is not None else None
        return value.strip()[:limit] if isinstance(value, str) else ""


Handler = Callable[[Request, Visit], Awaitable[Response]]


def _run(fn: Callable[..., Any], *args: Any, **kw: Any) -> Awaitable[Any]:
    return asyncio.to_thread(fn, *args, **kw)


class Dashboard:
    def __init__(
        self,
        app: App,
        *,
        clock: Callable[[], dt.datetime] = utcnow,
        hasher: PasswordHasher | None = None,
        login_policy: LoginPolicy | None = None,
        refresh_ms: int = 3000,
        search_window: int = 10_000,
    ) -> None:
        self.app = app
        self.clock = clock
        self.mods = Moderators(app.queue, clock=clock, hasher=hasher, policy=login_policy)
        self.switches = Switches(app.queue, clock=clock)
        self.signer = auth.Signer(auth.load_secret(app.settings.server.session_secret, app.settings.data_dir))
        # behind a reverse proxy: the origin moderators' browsers use (checked at config load)
        url = app.settings.server.public_url
        self.public = public_origin(url) if url else None
        self.templates = make_templates()
        self.refresh_ms = refresh_ms
        self.search_window = search_window
        self.image_roots = [Path(app.settings.images_dir).resolve(), Path(app.settings.outbox_dir).resolve()]

    # ---- guard, rendering, redirects ---------------------------------------------------------

    def guard(self, handler: Handler, *, login: bool = True,
              touch: bool = True) -> Callable[[Request], Awaitable[Response]]:
        """Wrap a handler: load the session (redirect to /login without one), check CSRF on POST.
        ``touch=False``: a background poll, which does not count as activity for the idle timeout."""

        async def endpoint(request: Request) -> Response:
            token = self.signer.unsign(request.cookies.get(auth.SESSION_COOKIE))
            session = await _run(self.mods.session, token, touch=touch) if token else None
            visit = Visit(session=session, seed=token if session else None)
            if session is None and login:
                if request.method not in ("GET", "HEAD"):
                    return await self.logged_out(request, visit)
                if request.url.path.startswith("/api/"):
                    return JSONResponse({"error": "login required"}, status_code=401)
                here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse("/login?" + urlencode({"next": here}), status_code=303)
            if not login:
                # The login form's token always comes from the pre-session cookie, even for a visitor
                # with a session: a link from another site (chat, e-mail) arrives without the
                # SameSite=Strict session cookie, so the form is shown, and posted with the cookie.
                visit.seed = self.signer.unsign(request.cookies.get(auth.PRE_COOKIE))
                if visit.seed is None and request.method in ("GET", "HEAD"):
                    visit.seed = visit.new_pre = secrets.token_urlsafe(32)
            if request.method == "POST":
                form = await request.form()
                given = form.get(auth.CSRF_FIELD) or request.headers.get(auth.CSRF_HEADER)
                if not auth.same_origin(request, self.public) or not self.signer.csrf_ok(
                        visit.seed, given if isinstance(given, str) else None):
                    _log.warning("refused POST %s from %s: missing or invalid CSRF token or foreign origin",
                                 request.url.path, auth.client_ip(request))
                    return PlainTextResponse("Refused: the form's security token is missing or wrong. "
                                             "Reload the page and try again.", status_code=403)
                visit.form = form
            bad = nul_field(request.query_params, visit.form)
            if bad is not None:
                _log.warning("refused %s %s from %s: a NUL character in %r", request.method, request.url.path,
                             auth.client_ip(request), bad)
                return PlainTextResponse(f"Refused: the field {bad!r} contains a NUL character (\\0), which no "
                                         "text here may contain.", status_code=400)
            response = await handler(request, visit)
            if visit.new_pre:
                auth.set_cookie(response, request, auth.PRE_COOKIE, self.signer.sign(visit.new_pre), 3600,
                                self.public)
            return response

        return endpoint

    async def logged_out(self, request: Request, visit: Visit) -> Response:
        """A form posted after the session ended (idle timeout, logout, account removed): nothing is
        done; a page that says so and leads through the login form back to the page of the form."""
        referer = urlsplit(request.headers.get("referer") or "")
        same = f"{referer.scheme}://{referer.netloc}" in auth.own_origins(request, self.public)
        page = auth.local_path(referer.path + (f"?{referer.query}" if referer.query else "") if same else None)
        return await self.render(
            request, visit, "error.html", status=403, title="Logged out",
            message="Your session has ended (you logged out, or it was idle for too long), so nothing was "
                    "done. Log in again, then repeat it.", link=("/login?" + urlencode({"next": page}), "Log in"))

    async def render(self, request: Request, visit: Visit, template: str, *, status: int = 200,
                     headers: dict[str, str] | None = None, **context: Any) -> Response:
        flash = None
        switches: dict[str, bool] = {}
        if visit.session is not None:
            if visit.session.flash:
                flash = visit.session.flash.split("|", 1)
                await _run(self.mods.set_flash, visit.session.id, None)
            switches = await _run(self.switches.all)
        base = {
            "moderator": visit.session.moderator.name if visit.session else None,
            "csrf": self.signer.csrf_token(visit.seed) if visit.seed else "",
            "flash": flash,
            "switches": switches,
            "path": request.url.path + (f"?{request.url.query}" if request.url.query else ""),
        }
        return self.templates.TemplateResponse(request, template, {**base, **context}, status_code=status,
                                               headers=headers)

    async def back(self, visit: Visit, default: str, message: str, *, error: bool = False) -> Response:
        """Redirect (303) to the form's ``back`` path or ``default``, with a message shown there."""
        assert visit.session is not None
        await _run(self.mods.set_flash, visit.session.id, ("error|" if error else "ok|") + message[:500])
        return RedirectResponse(auth.local_path(visit.field("back", 1000), default), status_code=303)

    # ---- login -----------------------------------------------------------------------------

    async def login_form(self, request: Request, visit: Visit) -> Response:
        nxt = auth.local_path(request.query_params.get("next"))
        if visit.session is not None:
            return RedirectResponse(nxt, status_code=303)
        return await self.render(request, visit, "login.html", next=nxt, error=None, login_name="")

    async def login(self, request: Request, visit: Visit) -> Response:
        replaced, visit.session = visit.session, None  # a new login ends the session this browser had
        name, password = visit.field("name", 64), visit.form.get("password") if visit.form else None
        password = password if isinstance(password, str) else ""
        nxt = auth.local_path(visit.field("next", 1000))
        ip = auth.client_ip(request)
        # Counted before it is checked, under a keyed hash of the name: throttling needs only equality,
        # and a password typed into the name field must not be kept readable in login_attempts.
        wait, attempt = await _run(self.mods.begin_attempt, self.signer.mac("login-name", name), ip)
        if wait > 0:
            _log.warning("dashboard login throttled from %s (retry in %.0fs)", ip, wait)
            return await self.render(
                request, visit, "login.html", status=429, headers={"Retry-After": str(int(wait) + 1)},
                next=nxt, login_name=name,
                error=f"Too many failed attempts. Try again in {int(wait) + 1} seconds.")
        mod = await _run(self.mods.authenticate, name, password, ip=ip, attempt=attempt)
        if mod is None:
            _log.warning("failed dashboard login from %s", ip)
            return await self.render(request, visit, "login.html", status=401, next=nxt, login_name=name,
                                     error="Wrong name or password.")
        if replaced is not None:
            await _run(self.mods.end_session, self.signer.unsign(request.cookies.get(auth.SESSION_COOKIE)) or "")
        token = await _run(self.mods.create_session, mod)
        _log.info("moderator %s logged in from %s", mod.name, ip)
        response = RedirectResponse(nxt, status_code=303)
        auth.set_cookie(response, request, auth.SESSION_COOKIE, self.signer.sign(token),
                        int(self.mods.session_lifetime.total_seconds()), self.public)
        auth.clear_cookie(response, request, auth.PRE_COOKIE, self.public)
        return response

    async def logout(self, request: Request, visit: Visit) -> Response:
        token = self.signer.unsign(request.cookies.get(auth.SESSION_COOKIE))
        if token:
            await _run(self.mods.end_session, token, actor=visit.actor)
        response = RedirectResponse("/login", status_code=303)
        auth.clear_cookie(response, request, auth.SESSION_COOKIE, self.public)
        return response

    # ---- the queue log and the held inbox ---------------------------------------------------------

    @staticmethod
    def _filters(params: QueryParams) -> tuple[dict[str, Any], list[str]]:
        errors: list[str] = []
        statuses = []
        for s in params.getlist("status"):
            if s in Status._value2member_map_:
                statuses.append(s)
            elif s:
                errors.append(f"unknown status {s[:40]!r}")
        f: dict[str, Any] = {
            "status": statuses,
            "platform": (params.get("platform") or "").strip()[:16],
            "user": (params.get("user") or "").strip()[:160],
            "q": (params.get("q") or "").strip()[:200],
            "since": (params.get("since") or "").strip()[:40],
            "until": (params.get("until") or "").strip()[:40],
        }
        times: dict[str, dt.datetime | None] = {}
        for key in ("since", "until"):
            times[key] = None
            if f[key]:
                try:
                    t = dt.datetime.fromisoformat(f[key])
                    times[key] = t.astimezone(dt.UTC).replace(tzinfo=None) if t.tzinfo else t
                except ValueError:
                    errors.append(f"{key}: not a date and time (use YYYY-MM-DD HH:MM, UTC)")
                except OverflowError:  # e.g. 0001-01-01T00:00+01:00 is before the year 1 in UTC
                    errors.append(f"{key}: out of range (years 1 to 9999, UTC)")
        before = params.get("before") or ""
        f["before"] = parse_id(before)
        if before and f["before"] is None:
            errors.append(f"before: not a request id (a whole number from 1 to {MAX_ID})")
        f["_since"], f["_until"] = times["since"], times["until"]
        return f, errors

    async def _list(self, f: dict[str, Any]) -> tuple[list[Any], bool]:
        rows = await _run(
            self.app.queue.list, status=f["status"] or None, platform=f["platform"] or None,
            user=f["user"] or None, text=f["q"] or None, since=f["_since"], until=f["_until"],
            before_id=f["before"], limit=PAGE_SIZE + 1)
        return rows[:PAGE_SIZE], len(rows) > PAGE_SIZE

    def _search_window(self, f: dict[str, Any]) -> tuple[int, int] | None:
        """For a text search, the id range ``(floor, top]`` of the newest ``search_window`` requests
        below ``before``, narrowing ``f``'s time range to it; None when no window is needed.

        A substring search cannot use an index, so without a bound it reads the whole log when
        matches are rare. Ids and creation times rise together, and a range on both ends of
        ``created_at`` is an index range on SQLite and PostgreSQL alike, so each page reads at most
        ``search_window`` requests; "search older" moves the window down."""
        if not f["q"] or f["user"]:
            return None
        q = self.app.queue
        newest = q.list(before_id=f["before"], limit=1)
        if not newest:
            return None
        top = newest[0]
        below = q.list(before_id=top.id - self.search_window + 1, limit=1)
        if not below:
            return None  # the window reaches the oldest request: nothing to bound
        floor = below[0]
        until = top.created_at + dt.timedelta(microseconds=1)
        f["_since"] = max(f["_since"], floor.created_at) if f["_since"] else floor.created_at
        f["_until"] = min(f["_until"], until) if f["_until"] else until
        return floor.id, top.id

    async def queue_page(self, request: Request, visit: Visit) -> Response:
        f, errors = self._filters(request.query_params)
        keep = {k: v for k, v in f.items() if not k.startswith("_") and k != "before"}
        window = await _run(self._search_window, f)
        rows, more = await self._list(f)
        next_page = {**keep, "before": rows[-1].id} if more else None
        if window and not more:
            next_page = {**keep, "before": window[0]}  # search the next (older) window
        counters = await _run(activity, self.app.queue, self.clock())
        return await self.render(
            request, visit, "queue.html", status=400 if errors else 200, rows=rows, more=more, filters=keep,
            errors=errors, next_page=next_page, paged=f["before"] is not None, window=window,
            statuses=[s.value for s in Status], platforms=sorted({"local", "x", "discord", *self.app.platforms}),
            counters=counters, refresh_ms=self.refresh_ms, has_local="local" in self.app.platforms,
            max_images=self.app.settings.queue.max_images, default_images=self.app.settings.queue.default_images)

    async def held_page(self, request: Request, visit: Visit) -> Response:
        before = request.query_params.get("before") or ""
        f = {"status": [Status.HELD.value], "platform": "", "user": "", "q": "", "_since": None,
             "_until": None, "before": parse_id(before)}
        if before and f["before"] is None:
            return await self.render(request, visit, "error.html", status=400, title="Bad request",
                                     message=f"before: not a request id (a whole number from 1 to {MAX_ID}).")
        seen = self.app.queue.clock().isoformat()  # the time of the queue log, as its entries
        rows, more = await self._list(f)
        return await self.render(request, visit, "held.html", rows=rows, more=more,
                                 next_before=rows[-1].id if more else None, seen=seen)

    # ---- one request ----------------------------------------------------------------------

    async def request_page(self, request: Request, visit: Visit) -> Response:
        rid = request.path_params["rid"]
        seen = self.app.queue.clock().isoformat()  # the time of the queue log, as its entries
        try:
            if rid > MAX_ID:
                raise NotFound(rid)
            rec = await _run(self.app.queue.get, rid)
        except NotFound:
            return await self.render(request, visit, "error.html", status=404, message=f"No request {rid}.")
        trail = await _run(self.app.queue.audit, rid)
        position = await _run(self.app.queue.position, rid)
        try:
            user = await _run(self.app.queue.get_user, rec.user_ref)
        except NotFound:
            user = None
        # the user's bans and notes, newest kept: every request's entries name the user too, and the
        # oldest 100 of those had pushed a heavy user's recent ban off the page
        user_trail = await _run(user_actions, self.app.queue, rec.user_ref, limit=100)
        actions = [a for a, target in ACTION_TARGETS.items()
                   if (rec.status == Status.HELD if a == "approve"
                       else states.allowed(rec.status, target)  # type: ignore[arg-type]
                       and (a != "requeue" or rec.status in states.TERMINAL))]
        images = [(i, rec.nsfw_scores[i] if i < len(rec.nsfw_scores) else None)
                  for i in range(len(rec.image_paths))]
        return await self.render(request, visit, "request.html", r=rec, trail=trail, position=position,
                                 user=user, user_trail=user_trail, actions=actions, images=images, seen=seen)

    async def act(self, request: Request, visit: Visit) -> Response:
        rid = request.path_params["rid"]
        action, reason = visit.field("action", 20), visit.field("reason") or None
        here = f"/requests/{rid}"
        if action not in moderation.ACTIONS:
            return await self.back(visit, here, f"Unknown action {action!r}.", error=True)
        if action == "reject" and not reason:
            return await self.back(visit, here, "Give a reason to reject a request (the requester sees it).",
                                   error=True)
        try:
            if rid > MAX_ID:
                raise NotFound(f"no request with id {rid}")
            rec = await _run(moderation.act, self.app.queue, action, rid, actor=visit.actor, reason=reason,
                             platforms=self.app.platforms,  # a rejection tells the requester at once
                             seen=_seen(visit.field("seen", 40)))  # when the page showed the request
        except (IllegalTransition, NotFound) as exc:
            return await self.back(visit, here, str(exc), error=True)
        _log.info("moderator action %s", action, extra={"request_id": rid, "action": action})
        return await self.back(visit, here, f"Request {rec.id} is now {rec.status.value}.")

    async def image(self, request: Request, visit: Visit) -> Response:
        rid, n = request.path_params["rid"], request.path_params["n"]
        try:
            if rid > MAX_ID:
                raise NotFound(rid)
            rec = await _run(self.app.queue.get, rid)
        except NotFound:
            return PlainTextResponse("Not Found", status_code=404)
        if n >= len(rec.image_paths):
            return PlainTextResponse("Not Found", status_code=404)
        path = Path(rec.image_paths[n]).resolve()   # a relative path (older versions) is from the working folder
        kind = IMAGE_TYPES.get(path.suffix.lower())
        inside = any(path.is_relative_to(root) for root in self.image_roots)
        if kind is None or not inside or not path.is_file():
            _log.warning("refused to serve image %d of request %d: not a PNG/JPEG file under the data folder",
                         n, rid)
            return PlainTextResponse("Not Found", status_code=404)
        return FileResponse(path, media_type=kind, headers={"Cache-Control": "private, max-age=300",
                                                            "Content-Disposition": "inline"})

    # ---- users, switches, prompt box ------------------------------------------------------------

    async def user_action(self, request: Request, visit: Visit) -> Response:
        action = request.path_params["action"]
        if action not in ("ban", "unban"):
            return PlainTextResponse("Not Found", status_code=404)
        ref, note = visit.field("user", 160), visit.field("note") or None
        default = "/?" + urlencode({"user": ref})
        if not ref:
            return await self.back(visit, default, "Which user? (platform:id)", error=True)
        fn = moderation.ban if action == "ban" else moderation.unban
        try:
            user = await _run(fn, self.app.queue, ref, actor=visit.actor, reason=note)
        except (StorageError, ValueError) as exc:
            return await self.back(visit, default, str(exc), error=True)
        return await self.back(visit, default, f"User {user.ref} is {'banned' if user.banned else 'no longer banned'}.")

    async def set_switch(self, request: Request, visit: Visit) -> Response:
        name, value = visit.field("name", 64), visit.field("value", 8)
        if name not in SWITCHES or value not in ("on", "off"):
            return await self.back(visit, "/", "Unknown switch.", error=True)
        changed = await _run(self.switches.set, name, value == "on", actor=visit.actor,
                             reason=visit.field("reason") or None)
        what = {"intake_paused": "Intake", "generation_paused": "Generation"}[name]
        state = "paused" if value == "on" else "running"
        return await self.back(visit, "/", f"{what} is {state}." if changed else f"{what} was already {state}.")

    async def submit(self, request: Request, visit: Visit) -> Response:
        assert visit.session is not None
        qc = self.app.settings.queue
        if "local" not in self.app.platforms:
            return await self.back(visit, "/", "The local platform is disabled ([local] enabled = false).",
                                   error=True)
        n_text = visit.field("n", 4)
        n = (parse_id(n_text) or 0) if n_text else qc.default_images
        if not 1 <= n <= qc.max_images:
            return await self.back(visit, "/", f"Ask for 1 to {qc.max_images} images.", error=True)
        name = visit.session.moderator.name
        try:
            res = await _run(self.app.local.submit, self.app.queue, visit.field("prompt", 4000),
                             user=f"dashboard-{name}", user_name=name, n_images=n, max_chars=qc.max_prompt_chars,
                             actor=visit.actor)
        except PromptRejected as exc:
            return await self.back(visit, "/", str(exc), error=True)
        rec = res.request
        return await self.back(visit, f"/requests/{rec.id}", f"Request {rec.id} is {rec.status.value}.")

    async def counters(self, request: Request, visit: Visit) -> Response:
        data: dict[str, Any] = await _run(activity, self.app.queue, self.clock())
        data.update(await _run(self.switches.all))
        return JSONResponse(data)

    # ---- routes -----------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        g = self.guard
        return [
            Route("/login", g(self.login_form, login=False), methods=["GET"]),
            Route("/login", g(self.login, login=False), methods=["POST"]),
            Route("/logout", g(self.logout), methods=["POST"]),
            Route("/", g(self.queue_page), methods=["GET"]),
            Route("/held", g(self.held_page), methods=["GET"]),
            Route("/requests/{rid:num}", g(self.request_page), methods=["GET"]),
            Route("/requests/{rid:num}/act", g(self.act), methods=["POST"]),
            Route("/requests/{rid:num}/images/{n:num}", g(self.image), methods=["GET"]),
            Route("/users/{action:str}", g(self.user_action), methods=["POST"]),
            Route("/switches", g(self.set_switch), methods=["POST"]),
            Route("/submit", g(self.submit), methods=["POST"]),
            Route("/api/counters", g(self.counters, touch=False), methods=["GET"]),  # polled by the page
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ]
