"""PostgreSQL restarted under load: the worker rides it out and finishes, with no request lost or
posted twice. Restarts the real server on 127.0.0.1:5432 (as CI's root user may)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

from PIL import Image

from bot.platforms.local import LocalPlatform
from bot.worker import Worker
from storage import db as dbmod
from storage.queue import Queue, QueuePolicy
from storage.states import Status


class SlowGenerator:
    def generate(self, jobs):  # type: ignore[no-untyped-def]
        time.sleep(0.2)
        return [[Image.new("RGB", (16, 16), (j.seed % 256, 0, 0))] * j.n_images for j in jobs]


def restart_postgres() -> None:
    version = sorted(os.listdir("/etc/postgresql"))[0]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"], check=True,
                   capture_output=True, timeout=120)


def test_worker_survives_a_postgres_restart(pg_schema_url: str, tmp_path: Path) -> None:
    db = dbmod.connect(pg_schema_url)
    dbmod.upgrade(db)
    queue = Queue(db, QueuePolicy(lease_seconds=30, retry_base_seconds=0.1, retry_max_seconds=0.5))
    local = LocalPlatform(tmp_path / "outbox")
    ids = [local.submit(queue, f"a red circle {i}", user=f"u{i % 3}", n_images=1).request.id for i in range(24)]
    worker = Worker(queue, SlowGenerator(), {"local": local}, tmp_path / "images", batch_size=2,
                    db_outage_seconds=120)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            worker.drain(max_wait=5)
        except BaseException as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    while worker.stats.posted < 4:  # under load
        assert t.is_alive() and not errors
        time.sleep(0.05)
    restart_postgres()
    t.join(timeout=180)
    assert not t.is_alive() and errors == []
    assert worker.stats.posted >= len(ids) - 2  # a batch in flight at the restart may be redone elsewhere
    for i in ids:
        rec = queue.get(i)
        assert rec.status == Status.POSTED, (i, rec.status, rec.error)
        assert (tmp_path / "outbox" / str(i) / "reply.json").exists()
    db.dispose()


def test_service_rides_out_a_postgres_restart(pg_schema_url: str, tmp_path: Path, caplog) -> None:
    """`dallebot serve --role worker`'s scheduler jobs under a restart: no crash, one warning, and
    the requests still get posted."""
    import asyncio
    import dataclasses
    import logging

    from bot.app import open_app
    from bot.config import load_settings
    from bot.service import Service

    settings = load_settings(env={"DALLEBOT_DATA_DIR": str(tmp_path), "DALLEBOT_DATABASE_URL": pg_schema_url})
    settings = dataclasses.replace(settings, queue=dataclasses.replace(settings.queue, batch_size=2, lease_seconds=30),
                                   safety=dataclasses.replace(settings.safety, nsfw_enabled=False))
    db = dbmod.connect(pg_schema_url)
    dbmod.upgrade(db)
    db.dispose()
    app = open_app(settings)
    app.__dict__["generator"] = SlowGenerator()  # the model boundary (App.generator is a cached property)
    ids = [app.local.submit(app.queue, f"a red circle {i}", user=f"u{i % 3}", n_images=1).request.id
           for i in range(16)]
    service = Service(app, roles=("worker",))
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_until_complete, args=(service.run(handle_signals=False),))
    with caplog.at_level(logging.WARNING, logger="bot.service"):
        t.start()
        deadline = time.monotonic() + 60
        while app.queue.stats()["posted"] < 3:
            assert time.monotonic() < deadline and t.is_alive()
            time.sleep(0.1)
        restart_postgres()
        while app.queue.stats()["posted"] < len(ids):
            assert time.monotonic() < deadline + 120 and t.is_alive(), app.queue.stats()
            time.sleep(0.2)
        loop.call_soon_threadsafe(service.stopping.set)
        t.join(timeout=30)
    assert not t.is_alive()
    loop.close()
    outage_lines = [r.getMessage() for r in caplog.records if "database unavailable" in r.getMessage()]
    assert 1 <= len(outage_lines) <= 3  # logged when it happens, not once a second
    assert all(app.queue.get(i).status == Status.POSTED for i in ids)
    app.close()


def test_a_killed_connection_on_the_prepared_hot_path_is_an_outage_then_recovers(pg_schema_url: str) -> None:
    """claim and complete_many run through the driver (prepared statements): a connection the server
    dropped surfaces as DatabaseUnavailable, is thrown away, and the next call works on a new one."""
    import psycopg
    import pytest

    from storage.errors import DatabaseUnavailable
    from storage.records import Generated, NewRequest
    from tests.conftest import pg_dsn

    db = dbmod.connect(pg_schema_url)
    dbmod.upgrade(db)
    queue = Queue(db)
    try:
        for i in range(3):
            queue.enqueue(NewRequest("local", f"m{i}", "u", "a red circle", "a red circle"))
        first = queue.claim("w", 1)
        assert len(first) == 1 and first.requests[0].options == {} and first.requests[0].image_paths == []
        with db.lease.connect() as conn:  # the pool the hot path uses
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        with psycopg.connect(pg_dsn(), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        time.sleep(0.2)
        with pytest.raises(DatabaseUnavailable, match="lost the database"):
            queue.claim("w", 1)
        second = queue.claim("w", 2)  # a fresh connection
        assert len(second) == 2
        assert queue.complete_many(second, [Generated(r.id, [f"{r.id}.png"]) for r in second.requests]) == second.ids
        assert queue.get(second.ids[0]).image_paths == [f"{second.ids[0]}.png"]
    finally:
        db.dispose()


def test_only_lease_transitions_commit_without_waiting_for_the_disk(pg_schema_url: str) -> None:
    """The workers' claim and completion commit asynchronously (a lost lease commit is recovered by
    the lease itself); intake, delivery and moderation keep synchronous commits. The URL's own
    options (here the test schema's search_path) survive on the lease connections."""
    db = dbmod.connect(pg_schema_url)
    try:
        schema = pg_schema_url.rsplit("%3D", 1)[1]
        assert db.run_prepared("SELECT current_setting('synchronous_commit'), current_setting('search_path')",
                               {}) == [("off", schema)]
        for engine in (db.write, db.read, db.single):
            with engine.connect() as conn:
                assert conn.exec_driver_sql("SHOW synchronous_commit").scalar_one() == "on"
    finally:
        db.dispose()


def test_the_claim_walks_its_index_in_order_even_with_stale_statistics(pg_schema_url: str) -> None:
    """Never analysed, the requests table looks nearly empty to the planner, which then prefers to
    read and sort every queued row per claim; the lease pool's settings keep the ordered index walk."""
    import datetime as dt

    from storage.queue import _PG_CLAIM
    from storage.records import Generated, NewRequest
    from storage.states import Status

    db = dbmod.connect(pg_schema_url)
    dbmod.upgrade(db)
    try:
        with db.write.begin() as conn:  # no ANALYZE behind the test's back: the statistics stay stale
            conn.exec_driver_sql("ALTER TABLE requests SET (autovacuum_enabled = false)")
        queue = Queue(db)
        for k in range(0, 4000, 1000):
            queue.enqueue_many([(NewRequest("local", f"m{i}", f"u{i % 7}", "a red circle", "a red circle"),
                                 Status.QUEUED, None) for i in range(k, k + 1000)])
        for _ in range(40):  # half drained, as during a benchmark
            claim = queue.claim("w", 50)
            queue.complete_many(claim, [Generated(r.id, []) for r in claim.requests])
        now = dt.datetime(2030, 1, 1)
        params = dict(owner="w", token="t", expires=now, now=now, limit=50, actor="worker:w")
        with db.write.connect() as conn:  # an ordinary connection: the planner's own choice
            plain = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + _PG_CLAIM, params))
        leased = "\n".join(r[0] for r in db.run_prepared("EXPLAIN " + _PG_CLAIM, params))
        assert "Sort" in plain  # the trap this guards against (if the planner ever stops falling in, drop this)
        assert "Index Scan using ix_requests_claim" in leased and "Sort" not in leased, leased
    finally:
        db.dispose()
