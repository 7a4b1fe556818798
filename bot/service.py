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

The web server (uvicorn) serves the dashboard, ``/healthz`` and ``/metrics`` (role ``web``), or only
``/healthz`` and ``/metrics`` (role ``metrics``: ``serve --role worker``). Its socket is bound before
any job or adapter starts, so a port in use is a one-line :class:`ServiceError`, not a crash. Its log
records go through the root handler (the configured format and the secret scrubber).

Stopping (SIGTERM/SIGINT, or :attr:`Service.stopping`): no new job runs are started; the runs in flight
(a batch being generated or delivered in its thread) are waited for, at most ``stop_timeout`` seconds
(:data:`STOP_TIMEOUT_SECONDS`); only then are the adapters and the web server closed. Runs still going
after that are left: their claims return to the queue when their leases expire.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import functools
import logging
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from bot.app import App
from storage.errors import DatabaseUnavailable

_log = logging.getLogger(__name__)

#: On stop, the longest wait for the generate/deliver (and other job) runs in flight to finish.
STOP_TIMEOUT_SECONDS = 60.0
#: The paths the ``metrics`` role serves (a worker machine: no moderator pages).
METRICS_PATHS = frozenset({"/healthz", "/metrics"})


class _QuietTicks(logging.Filter):
    """APScheduler's chatter about every tick of the 1 s interval jobs, dropped unless DEBUG is on:
    "skipped: maximum number of running instances reached" (a WARNING each second for as long as a
    generate or deliver run is busy, which is how those jobs work: one run drains while there is
    work, max_instances=1 skips the ticks meanwhile) and the executor's "Running job" / "executed
    successfully" lines (several a second at INFO while the queue is idle). Errors still get through."""

    def filter(self, record: logging.LogRecord) -> bool:
        if logging.getLogger("apscheduler").isEnabledFor(logging.DEBUG):
            return True
        if record.name == "apscheduler.scheduler":
            return "maximum number of running instances" not in str(record.msg)
        return record.levelno > logging.INFO


_QUIET_TICKS = _QuietTicks()


def _quiet_scheduler_ticks() -> None:
    for name in ("apscheduler.scheduler", "apscheduler.executors.default"):
        logger = logging.getLogger(name)
        if _QUIET_TICKS not in logger.filters:
            logger.addFilter(_QUIET_TICKS)


class ServiceError(Exception):
    """The service cannot start for a reason the operator can fix (e.g. the port is in use)."""


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket for the web server, bound now (as uvicorn would bind it), so that a port
    in use is found before anything starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        import errno

        where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise ServiceError(f"cannot listen on {where}: port {port} is in use "
                               "(stop the other process, or choose another with --port or [server] port)") from None
        reason = exc.strerror or str(exc)
        raise ServiceError(f"cannot listen on {where}: {reason} (check --host/--port or [server] host/port)") from None
    sock.set_inheritable(True)
    return sock


async def _in_thread(name: str, fn: Callable[[], Any]) -> Any:
    """``asyncio.to_thread(fn)`` on a daemon thread of its own: when a stop gives up waiting for it,
    the process can still exit, leaving the step's claims to lease expiry (recoverable, and a delivery
    is then checked on the platform before it is posted again) instead of running it on against
    closed adapters."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()
    ctx = contextvars.copy_context()  # as to_thread: log_context() fields carry over

    def settle(result: Any, exc: BaseException | None) -> None:
        if done.done():  # the waiting job was cancelled
            return
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(result)

    def target() -> None:
        result: Any = None
        exc: BaseException | None = None
        try:
            result = ctx.run(fn)
        except BaseException as e:  # noqa: BLE001  (handed to the awaiting job)
            exc = e
        try:
            loop.call_soon_threadsafe(settle, result, exc)
        except RuntimeError:  # the event loop is closed: the service has stopped
            pass

    threading.Thread(target=target, name=f"dallebot-{name}", daemon=True).start()
    return await done


class Service:
    def __init__(self, app: App, roles: Sequence[str], host: str = "127.0.0.1", port: int = 8080,
                 *, sock: socket.socket | None = None, stop_timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """``sock``: the listening socket, already bound (:func:`bind_socket`); else :meth:`run` binds
        ``host``:``port`` itself before starting anything."""
        from bot.worker import Worker

        self.app = app
        self.roles = tuple(roles)
        self.host, self.port = host, port
        self.stop_timeout = stop_timeout
        self.sock = sock
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
        self._running: set[asyncio.Task[Any]] = set()  # job runs in flight

    def _job(self, fn: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[None]]:
        """A scheduler job: no new run once stopping; its run is tracked so that the stop can wait
        for it; and a run cancelled at the end of a stop that timed out is a normal stop, not an
        error (its thread may still finish; its claims otherwise return when their leases expire)."""

        @functools.wraps(fn)
        async def run() -> None:
            if self.stopping.is_set():
                return
            task = asyncio.current_task()
            assert task is not None
            self._running.add(task)
            try:
                await fn()
            except asyncio.CancelledError:
                _log.debug("job %s cancelled at shutdown", getattr(fn, "__name__", fn))
            finally:
                self._running.discard(task)

        return run

    async def _finish_running_jobs(self) -> None:
        await asyncio.sleep(0)  # runs submitted just before the pause have started (and see `stopping`)
        running = set(self._running)
        if not running:
            return
        _log.warning("waiting up to %g s for %d job run(s) in flight to finish", self.stop_timeout, len(running))
        _, pending = await asyncio.wait(running, timeout=self.stop_timeout)
        if pending:
            _log.warning("%d job run(s) still in flight after %g s; stopping anyway: their claimed requests "
                         "return to the queue when their leases expire", len(pending), self.stop_timeout)

    async def _guarded(self, job: str, fn: Callable[[], Any]) -> Any:
        """Run a blocking step in a worker thread; a database outage is logged once (not a crash,
        not a traceback a second) and the step is simply tried again on the job's next run."""
        try:
            result = await _in_thread(job, fn)
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

    def _web_app(self) -> Any:
        from bot.web import create_web_app

        web = create_web_app(self.app)
        if "web" not in self.roles:  # role "metrics": /healthz and /metrics only, no moderator pages
            web.router.routes[:] = [r for r in web.router.routes if getattr(r, "path", None) in METRICS_PATHS]
        return web

    async def run(self, *, handle_signals: bool = True) -> None:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        from bot.platforms.admission import IntakeSource

        # The listening socket first: a port in use stops the start before any job or adapter runs.
        sock = self.sock or (bind_socket(self.host, self.port) if listens(self.roles) else None)
        if sock is not None:
            self.port = sock.getsockname()[1]  # port 0: the one the system chose
        _quiet_scheduler_ticks()
        scheduler = AsyncIOScheduler()
        started: list[IntakeSource] = []
        server_task: asyncio.Task[None] | None = None
        server = None
        try:
            opts = dict(max_instances=1, coalesce=True, misfire_grace_time=None)
            if self.worker is not None:
                if self.app.generator is None:
                    raise RuntimeError("no model")
                scheduler.add_job(self._job(self._generate), "interval", seconds=1, id="generate", **opts)
                scheduler.add_job(self._job(self._deliver), "interval", seconds=1, id="deliver", **opts)
                scheduler.add_job(self._job(self._reclaim), "interval", seconds=15, id="reclaim", **opts)
                # old images (and stale login records) once an hour, the first run a minute after start
                scheduler.add_job(self._job(self._prune), "interval", seconds=3600, id="prune",
                                  next_run_time=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=60), **opts)
            # Platform adapters that take events by themselves (X poller, Discord gateway): started on
            # this loop; a worker-only process starts them for delivery only (no polling, no gateway).
            # Started side by side: one slow to start (Discord's login waits up to its ready timeout
            # on a host that does not answer) holds up neither the others nor the dashboard for long.
            intake = "intake" in self.roles
            sources = [p for p in self.app.platforms.values()
                       if isinstance(p, IntakeSource) and (intake or self.worker is not None)]
            outcomes = await asyncio.gather(*(p.start(intake=intake) for p in sources), return_exceptions=True)
            started.extend(p for p, out in zip(sources, outcomes) if not isinstance(out, BaseException))
            for out in outcomes:
                if isinstance(out, BaseException):
                    raise out  # the first failure (a refused token...); the started ones are stopped below
            for platform in started:
                if intake and platform.poll_interval:
                    scheduler.add_job(self._job(platform.poll), "interval", seconds=platform.poll_interval,
                                      id=f"poll-{platform.name}", **opts)
            scheduler.start()
            loop = asyncio.get_running_loop()
            if handle_signals:  # SIGTERM/SIGINT: stop taking work, finish what is in flight
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, self.stopping.set)
            if sock is not None:
                import uvicorn

                # log_config=None: uvicorn's records go to the root handler (format, secret scrubber)
                config = uvicorn.Config(self._web_app(), log_level="warning", log_config=None, lifespan="off")
                server = uvicorn.Server(config)
                server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
                server_task = asyncio.create_task(server.serve(sockets=[sock]))
                what = "dashboard" if "web" in self.roles else "/healthz and /metrics"
                _log.warning("%s on http://%s:%d/", what, self.host, self.port)
            await self.stopping.wait()
            _log.warning("shutting down")
            # No new job runs; the runs in flight finish (bounded) while the adapters can still post.
            if scheduler.running:
                scheduler.pause()
                await self._finish_running_jobs()
        finally:
            self.stopping.set()
            if scheduler.running:
                scheduler.shutdown(wait=False)  # cancels only runs that outlived the wait
            for platform in started:
                try:
                    await platform.stop()
                except Exception:  # shut the rest down anyway
                    _log.exception("stopping the %s adapter failed", platform.name)
            if server is not None and server_task is not None:
                server.should_exit = True
                await server_task
            if sock is not None:
                sock.close()


def listens(roles: Sequence[str]) -> bool:
    """Whether a service with these roles serves HTTP (the dashboard, or /healthz and /metrics)."""
    return "web" in roles or "metrics" in roles


def run_service(app: App, roles: Sequence[str], host: str = "127.0.0.1", port: int = 8080) -> None:
    # Bound first: a port in use is reported before the model is loaded or anything starts.
    sock = bind_socket(host, port) if listens(roles) else None
    try:
        asyncio.run(Service(app, roles, host, port, sock=sock).run())
    finally:
        if sock is not None:
            sock.close()
