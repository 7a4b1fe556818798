"""The web server of `dallebot serve`: the moderator dashboard, ``/healthz`` and ``/metrics``.

``/healthz`` and ``/metrics`` need no login and reveal no prompts, users or secrets; everything else
is the dashboard (:mod:`bot.dashboard.app`), behind login. Every response carries the security headers
of :class:`bot.dashboard.auth.SecurityHeaders` (CSP without inline script, ``frame-ancestors 'none'``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from bot.app import App
from bot.dashboard.app import Dashboard
from bot.dashboard.auth import SecurityHeaders
from storage.errors import StorageError
from storage.models import utcnow
from storage.moderators import SWITCHES, activity

_log = logging.getLogger(__name__)


def create_web_app(app: App, *, clock: Callable[[], dt.datetime] = utcnow, **dashboard_options: Any) -> Starlette:
    """The ASGI app. ``dashboard_options`` go to :class:`Dashboard` (tests pass a clock, a cheaper
    password hasher, a faster counter refresh)."""
    dashboard = Dashboard(app, clock=clock, **dashboard_options)
    registry = CollectorRegistry()
    requests_g = Gauge("dallebot_requests", "Requests by status", ["status"], registry=registry)
    images_g = Gauge("dallebot_images_per_second", "Images generated per second over the last minute",
                     registry=registry)
    failures_g = Gauge("dallebot_failures_last_hour", "Failed generation or delivery attempts in the last hour",
                       registry=registry)
    refusals_g = Gauge("dallebot_refusals_last_hour", "Requests refused in the last hour", registry=registry)
    paused_g = Gauge("dallebot_paused", "1 when a pause switch is on", ["switch"], registry=registry)

    async def healthz(request: Request) -> Response:
        model_loaded = "generator" in vars(app)  # App.generator is loaded lazily, by the worker
        try:
            counts = await asyncio.to_thread(app.queue.stats)
        except StorageError:
            _log.warning("healthz: database unreachable", exc_info=True)
            return JSONResponse({"ok": False, "database": "unreachable", "model_loaded": model_loaded},
                                status_code=503)
        return JSONResponse({
            "ok": True,
            "database": "ok",
            "model_loaded": model_loaded,
            "queue_depth": counts["queued"] + counts["running"],
            "queued": counts["queued"],
            "running": counts["running"],
            "held_for_review": counts["held_for_review"],
        })

    async def metrics(request: Request) -> Response:
        try:
            counts = await asyncio.to_thread(app.queue.stats)
            act = await asyncio.to_thread(activity, app.queue, clock())
            switches = await asyncio.to_thread(dashboard.switches.all)
        except StorageError:  # as /healthz: the scrape fails, the target shows as down
            _log.warning("metrics: database unreachable", exc_info=True)
            return PlainTextResponse("database unreachable\n", status_code=503)
        for status, n in counts.items():
            requests_g.labels(status=status).set(n)
        images_g.set(act["images_per_s"])
        failures_g.set(act["failures"])
        refusals_g.set(act["refusals"])
        for name in SWITCHES:
            paused_g.labels(switch=name).set(1 if switches[name] else 0)
        body = generate_latest(registry) + generate_latest(app.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    routes = [Route("/healthz", healthz), Route("/metrics", metrics), *dashboard.routes()]
    web = Starlette(routes=routes, middleware=[Middleware(SecurityHeaders)])
    web.state.dashboard = dashboard
    return web
