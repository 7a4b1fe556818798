"""`dallebot bench queue`: enqueue, claim and complete throughput, side by side with pgqueuer.

For each backend (a SQLite file; PostgreSQL in a fresh schema) and each worker count:
1. ``enqueue``: N requests through :meth:`Queue.enqueue`, one transaction each, as intake does
   (spread over the same number of processes);
2. ``drain``: W worker processes claim batches with leases and complete them (fenced updates, an
   audit row per transition) until the queue is empty. Throughput = N / wall time of the drain.

pgqueuer does the same work on the same PostgreSQL: N single-job enqueues, then W processes each
looping ``dequeue(batch)`` + ``log_jobs(successful)``. Processes start together (a barrier) and the
clock runs from the barrier to the last process finishing.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import queue as queue_mod
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@dataclass
class Result:
    round: int
    system: str
    backend: str
    workers: int
    n: int
    enqueue_per_s: float
    complete_per_s: float

    def row(self) -> str:
        return (f"| {self.round} | {self.system} | {self.backend} | {self.workers} | {self.n} | "
                f"{self.enqueue_per_s:,.0f} | {self.complete_per_s:,.0f} |")


# ---- process plumbing ------------------------------------------------------------------------

def _run_parallel(target: Callable[..., None], workers: int, args: tuple[Any, ...]) -> tuple[float, list[int]]:
    """Run ``target(i, barrier, out_q, *args)`` in ``workers`` processes; returns (seconds, counts)."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(workers + 1)
    out: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(i, barrier, out, *args)) for i in range(workers)]
    for p in procs:
        p.start()
    barrier.wait()
    t0 = time.perf_counter()
    counts: list[int] = []
    while len(counts) < workers:
        try:
            counts.append(out.get(timeout=1.0))
        except queue_mod.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise click.ClickException(f"a benchmark process failed (exit {dead[0].exitcode})") from None
            if time.perf_counter() - t0 > 900:
                raise click.ClickException("the benchmark made no progress for 15 minutes") from None
    elapsed = time.perf_counter() - t0
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise click.ClickException(f"a benchmark process failed (exit {p.exitcode})")
    return elapsed, counts


def _our_enqueue(i: int, barrier: Any, out: Any, url: str, n: int, workers: int) -> None:
    from storage import db as dbmod
    from storage.queue import Queue
    from storage.records import NewRequest

    db = dbmod.connect(url)
    q = Queue(db)
    mine = range(i, n, workers)
    barrier.wait()
    for k in mine:
        q.enqueue(NewRequest("bench", f"m{k}", f"user{k % 97}", "a red circle", "a red circle"))
    out.put(len(mine))
    db.dispose()


def _our_drain(i: int, barrier: Any, out: Any, url: str, batch: int, results: bool) -> None:
    from storage import db as dbmod
    from storage.queue import Queue
    from storage.records import Generated

    db = dbmod.connect(url)
    q = Queue(db)
    owner = f"bench-{i}"
    barrier.wait()
    done = 0
    while True:
        claim = q.claim(owner, batch)
        if not claim.requests:
            break
        # an acknowledgement (pgqueuer's log_jobs carries no result either), or with --with-results
        # what the worker records for a request of 4 images: their paths, NSFW scores and the seed
        done += len(q.complete_many(claim, [
            Generated(r.id, [f"images/{r.id}/{k}.png" for k in range(4)], [0.01, 0.02, 0.03, 0.04], None, r.id)
            if results else Generated(r.id, []) for r in claim.requests]))
    out.put(done)
    db.dispose()


def _pgq_enqueue(i: int, barrier: Any, out: Any, dsn: str, n: int, workers: int) -> None:
    asyncio.run(_pgq_enqueue_async(i, barrier, out, dsn, n, workers))


async def _pgq_enqueue_async(i: int, barrier: Any, out: Any, dsn: str, n: int, workers: int) -> None:
    import psycopg
    from pgqueuer.db import PsycopgDriver
    from pgqueuer.queries import Queries

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        q = Queries(PsycopgDriver(conn))
        mine = range(i, n, workers)
        barrier.wait()
        for k in mine:
            await q.enqueue("bench", json.dumps({"prompt": "a red circle", "k": k}).encode())
        out.put(len(mine))


def _pgq_drain(i: int, barrier: Any, out: Any, dsn: str, batch: int) -> None:
    asyncio.run(_pgq_drain_async(i, barrier, out, dsn, batch))


async def _pgq_drain_async(i: int, barrier: Any, out: Any, dsn: str, batch: int) -> None:
    import datetime as dt

    import psycopg
    from pgqueuer.db import PsycopgDriver
    from pgqueuer.ports.repository import EntrypointExecutionParameter
    from pgqueuer.queries import Queries

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        q = Queries(PsycopgDriver(conn))
        eps = {"bench": EntrypointExecutionParameter(concurrency_limit=0)}
        qm_id = uuid.uuid4()
        barrier.wait()
        done = 0
        while True:
            jobs = await q.dequeue(batch, eps, qm_id, None, dt.timedelta(seconds=300))
            if not jobs:
                break
            await q.log_jobs([(job, "successful", None) for job in jobs])
            done += len(jobs)
        out.put(done)


# ---- per-system runs -----------------------------------------------------------------------

def _pg_schema(server_url: str) -> tuple[str, str, Callable[[], None]]:
    """A fresh schema on the server: (SQLAlchemy URL, libpq DSN, drop function)."""
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    dsn = server_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in server_url else "?"
    opt = f"options=-csearch_path%3D{schema}"

    def drop() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')

    return f"{server_url}{sep}{opt}", f"{dsn}{sep}{opt}", drop


def run_ours(backend: str, url: str, n: int, workers: int, batch: int, results: bool = False) -> Result:
    from storage import db as dbmod

    db = dbmod.connect(url)
    dbmod.upgrade(db)
    db.dispose()
    t_enq, _ = _run_parallel(_our_enqueue, workers, (url, n, workers))
    t_drain, counts = _run_parallel(_our_drain, workers, (url, batch, results))
    if sum(counts) != n:
        raise click.ClickException(f"dallebot drained {sum(counts)} of {n} requests")
    return Result(0, "dallebot", backend, workers, n, n / t_enq, n / t_drain)


def run_pgqueuer(dsn: str, n: int, workers: int, batch: int) -> Result:
    async def install() -> None:
        import psycopg
        from pgqueuer.db import PsycopgDriver
        from pgqueuer.queries import Queries

        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await Queries(PsycopgDriver(conn)).install()

    asyncio.run(install())
    t_enq, _ = _run_parallel(_pgq_enqueue, workers, (dsn, n, workers))
    t_drain, counts = _run_parallel(_pgq_drain, workers, (dsn, batch))
    if sum(counts) != n:
        raise click.ClickException(f"pgqueuer drained {sum(counts)} of {n} jobs")
    return Result(0, "pgqueuer", "postgresql", workers, n, n / t_enq, n / t_drain)


@click.command()
@click.option("--n", "n", type=int, default=4000, show_default=True, help="Requests per run.")
@click.option("--workers", default="1,4", show_default=True, help="Worker process counts.")
@click.option("--batch", type=int, default=50, show_default=True, help="Requests per claim.")
@click.option("--pg", "pg_url", default=PG_DEFAULT, show_default=True, help="PostgreSQL server for the runs.")
@click.option("--skip-pgqueuer", is_flag=True, help="Only dallebot's queue.")
@click.option("--rounds", type=int, default=1, show_default=True,
              help="Repeat everything, interleaved; the ratios are medians over the rounds.")
@click.option("--with-results", is_flag=True,
              help="Complete with what the worker records (4 image paths, NSFW scores, seed), not a bare ack.")
def bench_queue(n: int, workers: str, batch: int, pg_url: str, skip_pgqueuer: bool, rounds: int,
                with_results: bool) -> None:
    """Queue throughput: enqueue, claim and complete on SQLite and PostgreSQL, vs pgqueuer."""
    import dataclasses
    import statistics

    counts = [int(w) for w in workers.split(",")]
    results: list[Result] = []
    click.echo(f"{n} requests per run, claims of {batch}, cpu count {os.cpu_count()}", err=True)
    for rnd in range(1, rounds + 1):
        for w in counts:
            with tempfile.TemporaryDirectory() as tmp:
                click.echo(f"round {rnd}: dallebot sqlite, {w} worker(s)...", err=True)
                results.append(dataclasses.replace(run_ours("sqlite", f"sqlite:///{tmp}/bench.sqlite3", n, w, batch,
                                                                    with_results),
                                                   round=rnd))
            url, dsn, drop = _pg_schema(pg_url)
            try:
                click.echo(f"round {rnd}: dallebot postgresql, {w} worker(s)...", err=True)
                results.append(dataclasses.replace(run_ours("postgresql", url, n, w, batch, with_results), round=rnd))
            finally:
                drop()
            if not skip_pgqueuer:
                url, dsn, drop = _pg_schema(pg_url)
                try:
                    click.echo(f"round {rnd}: pgqueuer postgresql, {w} worker(s)...", err=True)
                    results.append(dataclasses.replace(run_pgqueuer(dsn, n, w, batch), round=rnd))
                finally:
                    drop()
    click.echo("| round | system | backend | workers | requests | enqueued/s | completed/s |")
    click.echo("|---|---|---|---|---|---|---|")
    for r in results:
        click.echo(r.row())
    for w in counts:
        ratios = []
        for rnd in range(1, rounds + 1):
            ours = next((r for r in results if r.system == "dallebot" and r.backend == "postgresql"
                         and r.workers == w and r.round == rnd), None)
            theirs = next((r for r in results if r.system == "pgqueuer" and r.workers == w and r.round == rnd), None)
            if ours and theirs:
                ratios.append((ours.complete_per_s / theirs.complete_per_s, ours.enqueue_per_s / theirs.enqueue_per_s))
        if ratios:
            click.echo(f"\n{w} worker(s) on PostgreSQL: dallebot/pgqueuer completed/s = "
                       f"{statistics.median(c for c, _ in ratios):.2f} (rounds: {', '.join(f'{c:.2f}' for c, _ in ratios)}), "
                       f"enqueued/s = {statistics.median(e for _, e in ratios):.2f}")
