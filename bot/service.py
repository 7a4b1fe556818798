"""`dallebot serve`: one asyncio process running the scheduler jobs and the web server.

Jobs (APScheduler AsyncIOScheduler, each ``max_instances=1, coalesce=True`` so none piles up):
- ``generate``: claim a batch and generate it, in a worker thread (never on the event loop);
- ``deliver``: post generated results, in a worker thread;
- ``reclaim``: return expired leases to the queue;
- ``prune`` (hourly): delete finished requests' images after ``[data] image_retention_days``, and
  stale dashboard login records (:mod:`storage.retention`);
- ``poll-<platform>`` (intake role): one intake round of a polling adapter (X mentions).

Adapters that take events by themselves (:class:`bot.platforms.admission.IntakeSource`: the X poller,
the Discord gateway client) are started on this event loop; Discord delivery from the worker thread
goes back to this loop through ``asyncio.run_coroutine_threadsafe``.

The web server (uvicorn) serves the dashboard, ``/healthz`` and ``/metrics``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import signal
from collections.abc import Callable, Sequence
from typing import Any

from bot.app import App
from storage.errors import DatabaseUnavailable

_log = logging.getLogger(__name__)


class Service:
    def __init__(self, app: App, roles: Sequence[str], host: str = "127.0.0.1", port: int = 8080) -> None:
        from bot.worker import Worker

        self.app = app
        self.roles = tuple(roles)
        self.host, self.port = host, port
        self.worker = (
            Worker(app.queue, app.generator, app.platforms, app.settings.images_dir,
                   batch_size=app.settings.queue.batch_size,
                   classifier=app.classifier, nsfw_threshold=app.settings.safety.nsfw_threshold,
                   metrics=app.metrics, delivery_retry_seconds=app.settings.queue.delivery_retry_seconds)
            if "worker" in self.roles
            else None
        )
        self.stopping = asyncio.Event()
        self.db_down = False

    async def _guarded(self, job: str, fn: Callable[[], Any]) -> Any:
        """Run a blocking step in a worker thread; a database outage is logged once (not a crash,
        not a traceback a second) and the step is simply tried again on the job's next run."""
        try:
            result = await asyncio.to_thread(fn)
        except DatabaseUnavailable as exc:
            if not self.db_down:
                _log.warning("%s: database unavailable (%s); will keep trying", job, exc)
            self.db_down = True
            return None
        if self.db_down:
            _log.warning("database is back")
            self.db_down = False
        return result

    async def _generate(self) -> None:
        assert self.worker is not None
        worker = self.worker
        await self._guarded("generate", worker.resume_stranded)
        while not self.stopping.is_set() and await self._guarded("generate", worker.generate_batch):
            pass

    async def _deliver(self) -> None:
        assert self.worker is not None
        while not self.stopping.is_set() and await self._guarded("deliver", self.worker.deliver_batch):
            pass

    async def _reclaim(self) -> None:
        n = await self._guarded("reclaim", self.app.queue.reclaim_expired)
        if n:
            _log.info("reclaimed %d expired lease(s)", n)

    def prune_once(self) -> None:
        from storage.retention import prune

        settings = self.app.settings
        done = prune(self.app.db, settings.images_dir, image_retention_days=settings.data.image_retention_days,
                     clock=self.app.queue.clock)
        if done.requests or done.login_attempts or done.sessions:
            _log.info("pruned images of %d request(s) (%d files, %.1f MB), %d login attempt(s), %d session(s)",
                      done.requests, done.files, done.bytes / 1e6, done.login_attempts, done.sessions)

    async def _prune(self) -> None:
        await self._guarded("prune", self.prune_once)

    async def run(self, *, handle_signals: bool = True) -> None:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        scheduler = AsyncIOScheduler()
        opts = dict(max_instances=1, coalesce=True, misfire_grace_time=None)
        if self.worker is not None:
            if self.app.generator is None:
                raise RuntimeError("no model")
            scheduler.add_job(self._generate, "interval", seconds=1, id="generate", **opts)
            scheduler.add_job(self._deliver, "interval", seconds=1, id="deliver", **opts)
            scheduler.add_job(self._reclaim, "interval", seconds=15, id="reclaim", **opts)
            # old images (and stale login records) once an hour, the first run a minute after start
            scheduler.add_job(self._prune, "interval", seconds=3600, id="prune",
                              next_run_time=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=60), **opts)
        # Platform adapters that take events by themselves (X poller, Discord gateway): started on
        # this loop; a worker-only process starts them for delivery only (no polling, no gateway).
        from bot.platforms.admission import IntakeSource

        intake = "intake" in self.roles
        started: list[IntakeSource] = []
        for platform in self.app.platforms.values():
            if isinstance(platform, IntakeSource) and (intake or self.worker is not None):
                await platform.start(intake=intake)
                started.append(platform)
                if intake and platform.poll_interval:
                    scheduler.add_job(platform.poll, "interval", seconds=platform.poll_interval,
                                      id=f"poll-{platform.name}", **opts)
        scheduler.start()
        loop = asyncio.get_running_loop()
        if handle_signals:  # SIGTERM/SIGINT: stop taking work, finish what is in flight
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stopping.set)
        server_task = None
        server = None
        if "web" in self.roles:
            import uvicorn

            from bot.web import create_web_app

            config = uvicorn.Config(create_web_app(self.app), host=self.host, port=self.port, log_level="warning",
                                    lifespan="off")
            server = uvicorn.Server(config)
            server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
            server_task = asyncio.create_task(server.serve())
            _log.warning("dashboard on http://%s:%d/", self.host, self.port)
        await self.stopping.wait()
        _log.warning("shutting down")
        scheduler.shutdown(wait=False)
        for platform in started:
            try:
                await platform.stop()
            except Exception:  # shut the rest down anyway
                _log.exception("stopping the %s adapter failed", platform.name)
        if server is not None and server_task is not None:
            server.should_exit = True
            await server_task


def run_service(app: App, roles: Sequence[str], host: str = "127.0.0.1", port: int = 8080) -> None:
    asyncio.run(Service(app, roles, host, port).run())
