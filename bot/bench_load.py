"""`dallebot bench load`: a burst of mentions through the fake X, drained by worker processes.

1. A fake X server (``bot.fakes.x_server``) on 127.0.0.1 receives N mentions from N/2 users at once
   (the burst). Nothing else is contacted.
2. W worker processes, each with the shipped model (one onnxruntime thread each) and the real X
   adapter (tweepy, signed media upload), claim batches from a fresh PostgreSQL schema, generate,
   and reply to the fake X.
3. This process is the poller: the real X adapter reads the mentions (paging with since_id) and
   admits them (prompt checks, rate limits, one request per mention).

Reported: intake rate (mentions stored per second, from the first poll to the last stored),
drain rate (images per second, from the first claim to the last reply), mention-to-reply latency
(p50/p95, from the mention's creation on the fake X to its reply's), peak memory (max RSS) of each
process, the number of empty claims a worker made while a request waited in the queue (the same
request queued before and after the claim), the delay from a mention's creation to its request being stored, and
whether every mention got exactly one reply. The NSFW classifier is off in this benchmark (it
would add its own time per image; see docs/benchmarks.md).
"""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp
import queue as queue_mod
import resource
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import click

from bot.bench_queue import PG_DEFAULT, _pg_schema

UNLIMITED = {"POST /2/tweets": (10**9, None), "POST /2/media/upload": (10**9, None),
             "GET /2/users/:id/mentions": (10**9, 10**9), "GET /2/users/:id/tweets": (10**9, 10**9)}


def _x_config(base_url: str, creds: dict[str, str]):  # type: ignore[no-untyped-def]
    from bot.config import XConfig

    return XConfig(enabled=True, api_base_url=base_url, poll_interval=0.2, daily_post_budget=10**7,
                   daily_refusal_budget=10**7, **creds)


def _worker(i: int, url: str, base_url: str, creds: dict[str, str], images: str, batch: int,
            start: Any, stop: Any, out: Any) -> None:
    import sqlalchemy as sa

    from bot.model import PipelineGenerator
    from bot.platforms.x import XPlatform
    from bot.worker import Worker
    from inference.pipeline import Pipeline
    from inference.shipped import SHAPES_BUNDLE
    from storage import db as dbmod
    from storage.queue import Queue, QueuePolicy

    queue = Queue(dbmod.connect(url), QueuePolicy(lease_seconds=120))
    x = XPlatform(_x_config(base_url, creds), queue)
    worker = Worker(queue, PipelineGenerator(Pipeline.load(SHAPES_BUNDLE, threads=1)), {"x": x}, Path(images),
                    owner=f"load-{i}", batch_size=batch)
    start.wait()
    first_claim = last_post = None
    idle_while_waiting = 0
    def oldest_waiting() -> int | None:
        with queue.db.read.connect() as conn:
            return conn.execute(sa.text("SELECT min(id) FROM requests WHERE status = 'queued' AND run_at <= :now"),
                                {"now": queue.clock()}).scalar_one()

    while not stop.is_set():
        waiting = oldest_waiting()
        n = worker.generate_batch()
        if n and first_claim is None:
            first_claim = time.time()
        if not n and waiting is not None and oldest_waiting() == waiting:
            idle_while_waiting += 1  # a request waited through a claim that got nothing
        m = worker.deliver_batch()
        if m:
            last_post = time.time()
        if not n and not m:
            time.sleep(0.05)
    out.put({"worker": i, "generated": worker.stats.generated, "posted": worker.stats.posted,
             "first_claim": first_claim, "last_post": last_post, "idle_while_waiting": idle_while_waiting,
             "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


@click.command()
@click.option("--mentions", type=int, default=2000, show_default=True)
@click.option("--workers", type=int, default=4, show_default=True,
              help="Worker processes (0: intake only, to measure how fast the poller stores a burst).")
@click.option("--batch", type=int, default=8, show_default=True, help="Requests per claim (one decoder batch).")
@click.option("--images", "n_images", type=int, default=4, show_default=True, help="Images per request.")
@click.option("--rate", type=int, default=200, show_default=True, help="Mentions per second in the burst.")
@click.option("--pg", "pg_url", default=PG_DEFAULT, show_default=True)
def bench_load(mentions: int, workers: int, batch: int, n_images: int, rate: int, pg_url: str) -> None:
    """A burst of mentions through the fake X, drained by worker processes on PostgreSQL."""
    from bot.config import LimitsConfig
    from bot.fakes.x_server import FakeX
    from bot.platforms.x import XPlatform
    from bot.ratelimit import RateLimiter
    from storage import db as dbmod
    from storage.limits import LimitCounts
    from storage.queue import Queue

    url, _dsn, drop = _pg_schema(pg_url)
    ctx = mp.get_context("spawn")
    try:
        db = dbmod.connect(url)
        dbmod.upgrade(db)
        queue = Queue(db)
        with FakeX(rate_limits=UNLIMITED) as fake, tempfile.TemporaryDirectory() as tmp:
            x = XPlatform(_x_config(fake.base_url, fake.credentials()), queue,
                          checks=[RateLimiter(LimitCounts(db), LimitsConfig())])
            # X's first poll does not backfill: one mention before the burst sets the since_id cursor
            warmup = fake.add_mention(fake.add_user("early_bird"), "a white circle")
            if x.poll_once() != 1:
                raise click.ClickException("the first poll did not store the warm-up mention")
            start, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
            procs = [ctx.Process(target=_worker, args=(i, url, fake.base_url, fake.credentials(), tmp, batch,
                                                       start, stop, out)) for i in range(workers)]
            for p in procs:
                p.start()
            if workers:
                click.echo(f"{workers} workers loading the model...", err=True)
                time.sleep(5)
            users = [fake.add_user(f"user{i}") for i in range(max(1, mentions // 2))]
            shapes = ["circle", "square", "triangle", "star"]
            colours = ["red", "orange", "yellow", "green", "blue", "purple"]
            burst: list[Any] = []

            def feed() -> None:
                # The burst: `rate` mentions a second, in chunks every 0.1 s. (X's mentions timeline
                # returns at most the newest 800, so a burst is only readable by a poller that keeps up.)
                for k in range(mentions):
                    burst.append(fake.add_mention(
                        users[k % len(users)], f"a {colours[k % 6]} {shapes[(k // 6) % 4]} on a black background {k}"))
                    if k % max(1, rate // 10) == 0:
                        time.sleep(0.1)

            feeder = threading.Thread(target=feed, daemon=True)
            start.set()
            t0 = time.time()
            feeder.start()
            stored, quiet = 0, 0
            while stored < mentions and quiet < 5:
                got = x.poll_once()
                stored += got
                # once the burst is over, polls that find nothing mean the rest can no longer be read
                quiet = quiet + 1 if (got == 0 and not feeder.is_alive()) else 0
                if time.time() - t0 > 600:
                    raise click.ClickException(f"intake stalled at {stored} of {mentions}")
            feeder.join()
            t_intake = time.time() - t0
            click.echo(f"intake: {stored} of {mentions} mentions stored in {t_intake:.1f}s", err=True)
            deadline = time.time() + 3600
            while sum(1 for m in [warmup, *burst] if fake.replies_to(m)) < stored + 1:
                if time.time() > deadline or not any(p.is_alive() for p in procs):
                    break
                time.sleep(1.0)
            stop.set()
            results = []
            for _ in procs:
                try:
                    results.append(out.get(timeout=60))
                except queue_mod.Empty:
                    break
            for p in procs:
                p.join(timeout=30)
            replies = {m.id: fake.replies_to(m) for m in burst}
            once = sum(1 for r in replies.values() if len(r) == 1)
            twice = sum(1 for r in replies.values() if len(r) > 1)
            lat = sorted(r[0].created_at - m.created_at for m in burst if (r := replies[m.id]))
            first = min((r["first_claim"] for r in results if r["first_claim"]), default=0.0)
            last = max((r["last_post"] for r in results if r["last_post"]), default=0.0)
            images = sum(r["generated"] for r in results) * n_images
            stats = queue.stats()
            stored_at = {r.external_id: r.created_at.replace(tzinfo=dt.UTC).timestamp()
                         for r in queue.list(platform="x", limit=mentions + 10)}
            delays = sorted(stored_at[m.id] - m.created_at for m in burst if m.id in stored_at)
        db.dispose()
    finally:
        drop()
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
    qi = statistics.quantiles(delays, n=100) if len(delays) >= 2 else [float("nan")] * 99
    click.echo(f"\n{mentions} mentions, {workers} worker processes (batch {batch}, {n_images} images each), "
               "PostgreSQL, shipped shapes model, NSFW check off")
    click.echo("| metric | value |\n|---|---|")
    click.echo(f"| burst | {mentions} mentions offered at {rate}/s |")
    click.echo(f"| intake | {stored / t_intake:,.0f} mentions/s ({stored} stored in {t_intake:.1f} s from the first mention) |")
    click.echo(f"| mention-to-stored delay | p50 {qi[49]:.2f} s, p95 {qi[94]:.2f} s, max {max(delays, default=0):.2f} s |")
    if workers:
        click.echo(f"| drain | {images / (last - first):,.1f} images/s ({images} images in {last - first:.1f} s) |")
        click.echo(f"| mention-to-reply latency | p50 {q[49]:.1f} s, p95 {q[94]:.1f} s |")
    for r in sorted(results, key=lambda r: r["worker"]):
        click.echo(f"| worker {r['worker']} | {r['generated']} generated, {r['posted']} posted, "
                   f"peak RSS {r['max_rss_mb']:.0f} MB, empty claims while requests waited: "
                   f"{r['idle_while_waiting']} |")
    click.echo(f"| poller (this process) | peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB |")
    if workers:
        click.echo(f"| replies | {once} mentions answered exactly once, {twice} more than once, "
                   f"{mentions - once - twice} not answered |")
    click.echo(f"| queue at the end | {dict((k, v) for k, v in stats.items() if v)} |")
