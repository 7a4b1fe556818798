"""The web server of `dallebot serve`: health, metrics and (read-only, for now) the queue page.

``/healthz`` and ``/metrics`` need no login; they reveal no prompts, users or secrets.
"""

from __future__ import annotations

import asyncio
import html

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from bot.app import App
from storage.errors import StorageError

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def create_web_app(app: App) -> Starlette:
    registry = CollectorRegistry()
    depth = Gauge("dallebot_requests", "Requests by status", ["status"], registry=registry)

    async def healthz(request: Request) -> Response:
        try:
            counts = await asyncio.to_thread(app.queue.stats)
        except StorageError as exc:
            return JSONResponse({"ok": False, "database": str(exc)}, status_code=503)
        return JSONResponse({"ok": True, "database": "ok", "queued": counts["queued"], "running": counts["running"]})

    async def metrics(request: Request) -> Response:
        counts = await asyncio.to_thread(app.queue.stats)
        for status, n in counts.items():
            depth.labels(status=status).set(n)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def index(request: Request) -> Response:
        counts = await asyncio.to_thread(app.queue.stats)
        rows = await asyncio.to_thread(app.queue.list, limit=50)
        e = html.escape
        body = "".join(
            f"<tr><td>{r.id}</td><td>{e(r.status.value)}</td><td>{e(r.user_ref)}</td><td>{e(r.prompt_raw)}</td>"
            f"<td>{r.created_at:%Y-%m-%d %H:%M:%S}</td></tr>"
            for r in rows
        )
        stats = " ".join(f"{e(k)}: {v}" for k, v in counts.items() if v)
        page = (
            "<!doctype html><html><head><meta charset='utf-8'><title>dallebot queue</title></head><body>"
            f"<h1>dallebot queue</h1><p>{stats or 'empty'}</p>"
            "<table><tr><th>id</th><th>status</th><th>user</th><th>prompt</th><th>created</th></tr>"
            f"{body}</table></body></html>"
        )
        return HTMLResponse(page, headers=SECURITY_HEADERS)

    return Starlette(routes=[
        Route("/", index),
        Route("/healthz", healthz),
        Route("/metrics", metrics),
    ])
