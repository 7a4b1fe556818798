"""`dallebot bench dashboard`: how fast the dashboard's queue page answers with a big queue log.

For each backend (a SQLite file; PostgreSQL in a fresh schema) it fills N requests (default 100,000:
mostly posted, some queued, held, rejected, failed; three platforms, 5,000 users, 30 days) with two
audit rows each, logs in as a moderator, and times the pages a moderator opens (newest first, each
filter, a deep page, the held inbox, the live counters) through the real ASGI app in-process: session
check, queries, template rendering. Prints median and p95 per page as a Markdown table.
"""

from __future__ import annotations

import datetime as dt
import random
import re
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
WORDS = ("red", "blue", "green", "circle", "square", "triangle", "cat", "dog", "lighthouse", "forest",
         "city", "night", "sunset", "robot", "castle", "ocean", "mountain", "painting", "photo", "tiny")
STATUSES = (("posted", 85), ("queued", 4), ("rejected", 4), ("held_for_review", 2), ("failed", 2),
            ("generated", 1), ("dead", 1), ("cancelled", 1))


def fill(db, n: int, *, seed: int = 0, now: dt.datetime | None = None) -> None:  # type: ignore[no-untyped-def]
    """Insert ``n`` requests, their users and two audit rows each, in bulk (benchmark data only)."""
    from sqlalchemy import insert

    from storage.models import AuditEntry, Request, User

    rng = random.Random(seed)
    now = now or dt.datetime(2026, 1, 31, 12, 0, 0)
    start = now - dt.timedelta(days=30)
    platforms = ("x", "discord", "local")
    weights = [w for _, w in STATUSES]
    names = [s for s, _ in STATUSES]
    users = {(p, f"user{u}") for p in platforms for u in range(5000 // len(platforms) + 1)}
    with db.write.begin() as conn:
        conn.execute(insert(User.__table__), [
            dict(platform=p, platform_user_id=u, name=f"{u} on {p}", banned=False, notes="", next_slot=0,
                 created_at=start, updated_at=start) for p, u in sorted(users)])
    step = (now - start) / n
    chunk = 5000
    for lo in range(0, n, chunk):
        rows, audits = [], []
        for i in range(lo, min(n, lo + chunk)):
            p = platforms[i % 3]
            status = rng.choices(names, weights)[0]
            t = start + step * i
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
            done = status not in ("queued", "generated", "held_for_review")
            rows.append(dict(
                id=i + 1, platform=p, external_id=f"e{i}", channel_id=None, guild_id=None,
                author_id=(author := f"user{rng.randrange(5000 // 3)}"), author_name="someone", prompt_raw=prompt,
                prompt=prompt, n_images=4, seed=i, options={}, status=status, priority=0, slot=i, attempts=1,
                max_attempts=3, run_at=t, error=None, image_paths=[], nsfw_scores=[],
                reply_id=f"r{i}" if status == "posted" else None, reply_url=None, notify=True,
                created_at=t, updated_at=t, finished_at=t if done else None))
            audits.append(dict(request_id=i + 1, user_ref=f"{p}:{author}", actor=f"intake:{p}", action="received",
                               from_status=None, to_status="queued", reason=None, created_at=t))
            audits.append(dict(request_id=i + 1, user_ref=None, actor="worker:bench", action=status,
                               from_status="queued", to_status=status, reason=None,
                               created_at=t + dt.timedelta(seconds=5)))
        with db.write.begin() as conn:
            conn.execute(insert(Request.__table__), rows)
            conn.execute(insert(AuditEntry.__table__), audits)
    if not db.is_sqlite:  # ids were given explicitly: move the sequences past them, refresh statistics
        with db.write.begin() as conn:
            for table in ("requests", "audit_log", "users"):
                conn.exec_driver_sql(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
            conn.exec_driver_sql("ANALYZE")
    else:
        with db.write.begin() as conn:
            conn.exec_driver_sql("ANALYZE")


@contextmanager
def _database(backend: str, pg_url: str) -> Iterator[str]:
    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as d:
            yield f"sqlite:///{Path(d) / 'bench.sqlite3'}"
        return
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    dsn = pg_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        sep = "&" if "?" in pg_url else "?"
        yield f"{pg_url}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


PAGES = (
    ("newest 50", "/"),
    ("status = held_for_review", "/?status=held_for_review"),
    ("status = posted", "/?status=posted"),
    ("platform = x", "/?platform=x"),
    ("one user", "/?user=x:user42"),
    ("text search (common word)", "/?q=lighthouse"),
    ("text search, no match (one 10,000-request window)", "/?q=zeppelin"),
    ("time range (one day)", "/?since=2026-01-15T00:00&until=2026-01-16T00:00"),
    ("deep page (before id n/2)", "/?before={half}"),
    ("all filters", "/?status=posted&platform=discord&q=cat&since=2026-01-10T00:00"),
    ("one request (with its user's bans and notes)", "/requests/{half}"),
    ("held inbox", "/held"),
    ("live counters (JSON)", "/api/counters"),
)


def run_backend(url: str, n: int, repeat: int, data_dir: Path) -> tuple[list[tuple[str, float, float]], float]:
    from argon2 import PasswordHasher
    from starlette.testclient import TestClient

    from bot.app import open_app
    from bot.config import load_settings
    from bot.web import create_web_app
    from storage.moderators import Moderators

    settings = load_settings(env={"DALLEBOT_DATA_DIR": str(data_dir), "DALLEBOT_DATABASE_URL": url})
    now = dt.datetime(2026, 1, 31, 12, 0, 0)
    with open_app(settings, auto_upgrade=True) as app:
        t0 = time.perf_counter()
        fill(app.db, n, now=now)
        fill_s = time.perf_counter() - t0
        hasher = PasswordHasher()
        Moderators(app.queue, hasher=hasher).add("bench", "bench-password", actor="bench")
        web = create_web_app(app, clock=lambda: now, hasher=hasher)
        with TestClient(web) as client:
            page = client.get("/login").text
            csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
            r = client.post("/login", data={"name": "bench", "password": "bench-password", "csrf_token": csrf},
                            follow_redirects=False)
            if r.status_code != 303:
                raise click.ClickException(f"bench login failed: HTTP {r.status_code}")
            results = []
            for label, path in PAGES:
                path = path.format(half=n // 2)
                client.get(path)  # warm caches once
                times = []
                for _ in range(repeat):
                    t = time.perf_counter()
                    resp = client.get(path)
                    times.append((time.perf_counter() - t) * 1000)
                    if resp.status_code != 200:
                        raise click.ClickException(f"{path}: HTTP {resp.status_code}")
                times.sort()
                p95 = times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))]
                results.append((label, statistics.median(times), p95))
    return results, fill_s


@click.command("dashboard")
@click.option("--n", "n", type=int, default=100_000, show_default=True, help="Requests in the database.")
@click.option("--backend", type=click.Choice(["sqlite", "postgres", "both"]), default="both", show_default=True)
@click.option("--pg-url", default=PG_DEFAULT, show_default=True, help="PostgreSQL server (a fresh schema is used).")
@click.option("--repeat", type=int, default=20, show_default=True, help="Timed requests per page.")
def bench_dashboard(n: int, backend: str, pg_url: str, repeat: int) -> None:
    """Time the dashboard's queue page with N requests in the database."""
    backends = ("sqlite", "postgres") if backend == "both" else (backend,)
    click.echo(f"| backend | page | median ms | p95 ms |  (n = {n:,} requests, {repeat} timed requests per page)")
    click.echo("|---|---|---:|---:|")
    worst = 0.0
    for b in backends:
        with _database(b, pg_url) as url, tempfile.TemporaryDirectory() as d:
            results, fill_s = run_backend(url, n, repeat, Path(d))
        for label, med, p95 in results:
            worst = max(worst, p95)
            click.echo(f"| {b} | {label} | {med:.1f} | {p95:.1f} |")
        click.echo(f"<!-- {b}: filled {n:,} requests in {fill_s:.1f}s -->", err=True)
    click.echo(f"\nslowest p95: {worst:.1f} ms (target: under 200 ms)")
